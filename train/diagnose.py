"""`python -m train.diagnose LOG [LOG ...] [--json]`: diagnose training logs (HF Trainer / tqdm /
DeepSpeed, 8 ranks interleaved, or ours): setup, step time, projected run time, checkpoint-save
spikes, irregular steps, loss and per-segment trends, grad norm vs clipping, warnings, and a
problem / evidence / impact / priority table. Missing pieces are reported, never fatal.
Step times come from tqdm's elapsed counter (1 s resolution) or from our `step_time_s`.

Our trainer's log format (write it with `train.log_parse.format_vln_record`): one line per record,
`[vln-train] ` followed by one JSON object (may follow a rank prefix; unknown keys are ignored):
  {"event": "setup", "world_size": 8, "per_device_batch": 1, "grad_accum": 8, "total_batch": 64,
   "num_examples": 612492, "num_epochs": 3, "total_steps": 28710, "max_grad_norm": 1.0,
   "num_trainable_params": 7708435200}
  {"event": "step", "step": 12, "step_time_s": 4.81, "samples_per_s": 13.3, "data_wait_s": 0.02,
   "loss": 0.52, "loss_seg_subinstruction": 0.09, "loss_seg_2d": 0.6, "loss_seg_3d": 0.5,
   "loss_seg_action": 0.1, "grad_norm": 3.1, "lr": 2e-05, "gpu_mem_gb": 61.2}
  {"event": "save", "step": 500, "save_s": 34.2}
"event" defaults to "step". step = optimizer step just finished (1-based). step_time_s = wall time
since the previous step record (so a save after step N lands in step N+1, as with tqdm);
data_wait_s = time of that step spent waiting on the data iterator; loss and loss_seg_<name> = mean
per-sample losses over all micro-batches and ranks of the step (not summed over accumulation);
grad_norm = global norm before clipping; gpu_mem_gb = peak allocated GiB on the logging rank.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence

import numpy as np

from train.log_loss import data_wait, grad_clipping, loss_entries, loss_trends
from train.log_parse import ParsedLog, parse_log_file, training_bar
from train.log_report import build_problems, render_text
from train.log_warnings import summarise_warnings

logger = logging.getLogger(__name__)

HF_DEFAULT_MAX_GRAD_NORM = 1.0


def step_durations(log: ParsedLog) -> tuple[dict[int, float], float | None, str]:
    """Per-step seconds, the first step's seconds (start-up) and the source. Ours (`step_time_s`) wins;
    otherwise successive first refreshes of the training bar: duration(n) = elapsed(n) - elapsed(n-1)."""
    ours = {int(r["step"]): float(r["step_time_s"]) for r in log.vln_records
            if r.get("event", "step") == "step" and "step" in r and r.get("step_time_s") is not None}
    if ours:
        first_step_s = ours.pop(1, None)
        return ours, first_step_s, "[vln-train] step_time_s"
    first_elapsed: dict[int, int] = {}
    last_step, last_elapsed = -1, -1
    durations: dict[int, float] = {}
    first_step_s = None
    for update in training_bar(log):
        if update.step < last_step or update.elapsed_s < last_elapsed:
            first_elapsed = {}  # a new bar (restart or resume): elapsed restarts from zero
        last_step, last_elapsed = update.step, update.elapsed_s
        if update.step in first_elapsed:
            continue  # a re-draw of the same step (after a log or save line) is not a step end
        first_elapsed[update.step] = update.elapsed_s
        previous = first_elapsed.get(update.step - 1)
        if previous is None:
            continue
        if update.step == 1:
            first_step_s = float(update.elapsed_s - previous)
        else:
            durations[update.step] = float(update.elapsed_s - previous)
    return durations, first_step_s, "tqdm elapsed counter deltas (1 s resolution)"


def resolve_setup(log: ParsedLog) -> dict:
    """Setup values with sources; world size from explicit lines, rank prefixes, batch arithmetic or
    the number of copies of a once-per-process start-up warning, in that order of trust."""
    setup = dict(log.setup)
    sources = dict(log.setup_source)
    ours = [r for r in log.vln_records if r.get("event") == "setup"]
    for record in ours:
        for key, value in record.items():
            if key != "event":
                setup[key], sources[key] = value, "[vln-train] setup record"
    candidates = {}
    if "world_size" in setup:
        candidates[sources["world_size"]] = setup["world_size"]
    if log.world_info_ranks:
        candidates["DeepSpeed WORLD INFO DICT"] = log.world_info_ranks
    if log.ranks:
        candidates["rank prefixes (max rank + 1)"] = max(log.ranks) + 1
    per_device, grad_accum, total = (setup.get(k) for k in ("per_device_batch", "grad_accum", "total_batch"))
    if per_device and grad_accum and total and total % (per_device * grad_accum) == 0:
        candidates["total batch / (per-device batch x GA)"] = total // (per_device * grad_accum)
    once_per_process = [log.warnings[k] for k in ("eval_strategy_deprecated", "flash_attn_not_on_gpu",
                                                  "slow_image_processor", "tokenizer_deprecated")]
    if max(once_per_process) > 0:  # weakest: a corroboration, chosen only when nothing else says
        candidates["copies of a once-per-process warning"] = max(once_per_process)
    if candidates:
        source, value = next(iter(candidates.items()))
        setup["world_size"], sources["world_size"] = value, source
    setup["world_size_checks"] = candidates
    setup["sources"] = sources
    return setup


def step_time_stats(durations: dict[int, float], first_step_s: float | None, window_steps: int) -> dict:
    """Median / p10 / p90 / mean over steps ≥ 2, start-up, and per-window medians for the trend."""
    if not durations:
        return {}
    values = np.array(list(durations.values()))
    median = float(np.median(values))
    windows = []
    for start in range(0, max(durations) + 1, window_steps):
        inside = [d for s, d in durations.items() if start < s <= start + window_steps]
        if inside:
            windows.append({"steps": [start + 1, start + window_steps], "num_steps": len(inside),
                            "mean_s": round(float(np.mean(inside)), 3), "median_s": float(np.median(inside))})
    change = windows[-1]["median_s"] / windows[0]["median_s"] - 1.0
    trend = "flat" if abs(change) < 0.03 else ("rising" if change > 0 else "falling")
    return {"num_steps": len(values), "median_s": median, "mean_s": round(float(values.mean()), 3),
            "p10_s": float(np.percentile(values, 10)), "p90_s": float(np.percentile(values, 90)),
            "min_s": float(values.min()), "max_s": float(values.max()),
            "first_step_s": first_step_s,
            "startup_overhead_s": None if first_step_s is None else first_step_s - median,
            "windows": windows, "trend": trend, "trend_change_pct": round(100 * change, 2)}


def project_run(log: ParsedLog, setup: dict, durations: dict[int, float], first_step_s: float | None,
                saves: dict) -> dict:
    """Whole run = first step + (total - 1) x mean of non-save steps + saves x mean save extra (so an
    excerpt that happens to contain a save is not over-weighted); plus tqdm's own ETA."""
    bar = training_bar(log)
    total_steps = setup.get("total_steps") or (bar[-1].total if bar else None)
    result: dict = {"total_steps": total_steps}
    ours = [int(r["step"]) for r in log.vln_records if r.get("event", "step") == "step" and "step" in r]
    if bar:
        last = bar[-1]
        result["last_step"], result["elapsed_s"] = last.step, last.elapsed_s
        if last.remaining_s is not None:
            result["tqdm_eta_total_s"] = last.elapsed_s + last.remaining_s
    if ours:
        result["last_step"] = max(ours)
    slow_steps = {s["slow_step"] for s in saves["saves"]}
    regular = [d for s, d in durations.items() if s not in slow_steps]
    if total_steps and regular:
        mean_regular = float(np.mean(regular))
        num_saves = total_steps // saves["save_interval_steps"] if "mean_extra_s" in saves else 0
        first = first_step_s if first_step_s is not None else mean_regular
        seconds = first + (total_steps - 1) * mean_regular + num_saves * saves.get("mean_extra_s", 0.0)
        result.update(mean_regular_step_s=round(mean_regular, 3), num_saves=num_saves,
                      projected_total_s=round(seconds), projected_total_h=round(seconds / 3600, 1),
                      projected_total_days=round(seconds / 86400, 2))
        total_batch, world = setup.get("total_batch"), setup.get("world_size")
        if total_batch:
            median = float(np.median(list(durations.values())))
            result["samples_per_s"] = round(total_batch / median, 3)
            if world:
                result["gpu_s_per_sample"] = round(median * world / total_batch, 2)
    return result


def save_spikes(log: ParsedLog, durations: dict[int, float], stats: dict) -> dict:
    """Each save after step N shows up in step N+1; extra = that step minus the median step."""
    save_steps = sorted({step for step, _ in log.saves}
                        | {int(r["step"]) for r in log.vln_records if r.get("event") == "save"})
    reported = {int(r["step"]): r.get("save_s") for r in log.vln_records if r.get("event") == "save"}
    saves = []
    for step in save_steps:
        slow = durations.get(step + 1)
        extra = None if slow is None or not stats else slow - stats["median_s"]
        saves.append({"step": step, "slow_step": step + 1, "slow_step_s": slow, "extra_s": extra,
                      "reported_save_s": reported.get(step)})
    result: dict = {"saves": saves}
    extras = [s["extra_s"] for s in saves if s["extra_s"] is not None]
    if extras and stats:
        gaps = np.diff(save_steps)
        interval = int(np.median(gaps)) if len(gaps) else save_steps[0]
        result.update(mean_extra_s=float(np.mean(extras)), save_interval_steps=interval,
                      interval_source="median gap between saves" if len(gaps) else
                      "assumed: every N steps, N = the first save's step",
                      wall_share_pct=round(100 * float(np.mean(extras)) / (interval * stats["mean_s"]), 3))
    return result


def irregular_steps(durations: dict[int, float], stats: dict, skip: set[int]) -> dict:
    """Steps off the median by > max(3 s, 10 %); a slow step followed by a fast one summing to
    2 x median (within max(2 s, 5 %)) is reporting jitter with no net loss."""
    if not stats:
        return {}
    median = stats["median_s"]
    threshold, tolerance = max(3.0, 0.1 * median), max(2.0, 0.05 * median)
    off = {s: d for s, d in sorted(durations.items()) if s not in skip and abs(d - median) > threshold}
    pairs, used = [], set()
    for step, seconds in off.items():
        after = off.get(step + 1)
        if (step not in used and seconds > median and after is not None and after < median
                and abs(seconds + after - 2 * median) <= tolerance):
            pairs.append({"steps": [step, step + 1], "seconds": [seconds, after], "sum_s": seconds + after})
            used.update((step, step + 1))
    others = [{"step": s, "seconds": d, "extra_s": d - median} for s, d in off.items() if s not in used]
    return {"threshold_s": threshold, "jitter_pairs": pairs, "other": others,
            "other_extra_s": float(sum(o["extra_s"] for o in others))}


def diagnose(log: ParsedLog, max_grad_norm: float | None = None, window_steps: int = 250) -> dict:
    """The whole report as a JSON-able dict; sections that cannot be computed are listed in not_found."""
    setup = resolve_setup(log)
    durations, first_step_s, duration_source = step_durations(log)
    stats = step_time_stats(durations, first_step_s, window_steps)
    if stats:
        stats["source"] = duration_source
    saves = save_spikes(log, durations, stats)
    skip = {s["slow_step"] for s in saves["saves"]}
    entries, loss_source = loss_entries(log)
    clip = max_grad_norm if max_grad_norm is not None else setup.get("max_grad_norm")
    clip_source = "command line" if max_grad_norm is not None else (
        "[vln-train] setup record" if clip is not None else "HF default (not in the log)")
    report = {"path": log.path, "num_records": log.num_records, "num_truncated_lines": log.num_truncated,
              "num_unparsed": log.num_unparsed, "setup": setup, "step_time": stats,
              "projection": project_run(log, setup, durations, first_step_s, saves), "checkpoint_saves": saves,
              "irregular_steps": irregular_steps(durations, stats, skip),
              "loss": loss_trends(entries, loss_source, setup, window_steps),
              "grad_norm": grad_clipping(entries, clip if clip is not None else HF_DEFAULT_MAX_GRAD_NORM,
                                         clip_source),
              "data": data_wait(log), "warnings": summarise_warnings(log.warnings, log.warning_examples)}
    report["run_state"] = run_state(log, report)
    report["not_found"] = not_found(log, report)
    report["problems"] = build_problems(report)
    return report


def run_state(log: ParsedLog, report: dict) -> dict:
    """Finished (HF train_runtime summary) or where the log stops."""
    finished = any("train_runtime" in values for _, values in log.hf_dicts)
    projection = report["projection"]
    last, total = projection.get("last_step"), projection.get("total_steps")
    return {"finished": finished, "last_step": last, "total_steps": total,
            "progress_pct": round(100 * last / total, 2) if last is not None and total else None}


def not_found(log: ParsedLog, report: dict) -> list[str]:
    """What the log did not contain, in words, so that a short or cut log still gives a report."""
    missing = []
    if log.num_records == 0:
        missing.append("log is empty")
    for key in ("num_examples", "per_device_batch", "grad_accum", "total_batch", "total_steps"):
        if key not in report["setup"]:
            missing.append(f"setup value {key} (HF 'Running training' block or [vln-train] setup record)")
    if "world_size" not in report["setup"]:
        missing.append("world size (no world_size line, rank prefix or batch arithmetic)")
    if not report["step_time"]:
        missing.append("step times (no training progress bar with consecutive steps, no step_time_s)")
    elif report["step_time"]["first_step_s"] is None:
        missing.append("first-step start-up time (step 1 not in the log)")
    if not report["loss"]:
        missing.append("loss entries (no {'loss': ...} dicts or [vln-train] loss)")
    elif not any(e["segments"] for e in (report["loss"]["first"], report["loss"]["last"])):
        missing.append("per-segment losses")
    if not report["checkpoint_saves"]["saves"]:
        missing.append("checkpoint saves (none logged)")
    return missing


def json_safe(value: object) -> object:
    """Non-finite floats (a nan loss) become None so that the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 when a log cannot be read)."""
    parser = argparse.ArgumentParser(prog="python -m train.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="training log files (each diagnosed separately)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help=f"clip threshold when the log has none (default {HF_DEFAULT_MAX_GRAD_NORM}, HF's)")
    parser.add_argument("--window-steps", type=int, default=250, help="window for step-time/loss trends (≥ 1)")
    args = parser.parse_args(argv)
    if args.window_steps < 1:
        parser.error(f"--window-steps: expected an integer ≥ 1, found {args.window_steps}")
    reports, status = [], 0
    for path in args.logs:
        try:
            log = parse_log_file(path)
        except OSError as error:
            reports.append({"path": path, "error": f"cannot read log: {error}"})
            status = 2
            continue
        reports.append(diagnose(log, max_grad_norm=args.max_grad_norm, window_steps=args.window_steps))
    if args.json:
        sys.stdout.write(json.dumps(json_safe({"logs": reports}), indent=1, allow_nan=False) + "\n")
    else:
        sys.stdout.write("\n\n".join(render_text(r) for r in reports) + "\n")
    return status


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
