"""Turn a `train.diagnose` report dict into the problem / evidence / impact / priority table and into
the text the command prints. Priorities: P1 costs days or correctness, P2 worth fixing, P3 low.
"""
from __future__ import annotations

_PRIORITY_ORDER = {"P1": 0, "P2": 1, "P3": 2}


def _row(problem: str, evidence: str, impact: str, priority: str) -> dict:
    return {"problem": problem, "evidence": evidence, "impact": impact, "priority": priority}


def build_problems(report: dict) -> list[dict]:
    """Rules over the report's sections; each row quotes the numbers it rests on."""
    rows = _speed_rows(report) + _loss_rows(report)
    for group in report["warnings"]:
        if group["priority"] in _PRIORITY_ORDER:
            rows.append(_row(group["title"], f"x{group['count']}: {group['example'][:120]}",
                             group["impact"], group["priority"]))
    state = report["run_state"]
    if state["last_step"] is not None and state["total_steps"] and state["last_step"] < state["total_steps"] \
            and not state["finished"]:
        rows.append(_row("log ends before the run finished",
                         f"last step {state['last_step']} of {state['total_steps']} "
                         f"({state['progress_pct']}%), no train_runtime summary",
                         "log copied mid-run or the run stopped; check for a traceback", "P3"))
    return sorted(rows, key=lambda r: _PRIORITY_ORDER[r["priority"]])


def _speed_rows(report: dict) -> list[dict]:
    rows = []
    stats, projection = report["step_time"], report["projection"]
    if stats and "projected_total_h" in projection:
        days = projection["projected_total_days"]
        rate = f", {projection['samples_per_s']} samples/s" if "samples_per_s" in projection else ""
        rows.append(_row("slow training", f"median {stats['median_s']:g} s/step{rate}; "
                         f"{projection['total_steps']} steps -> {projection['projected_total_h']} h "
                         f"({days} days)", "wall time of the whole run",
                         "P1" if days > 7 else "P2" if days > 2 else "P3"))
    if stats and stats.get("startup_overhead_s") is not None and stats["startup_overhead_s"] > stats["median_s"]:
        rows.append(_row("slow start-up", f"step 1 took {stats['first_step_s']:g} s "
                         f"({stats['startup_overhead_s']:g} s above the median step)",
                         "one-off, paid again on every restart or resume", "P3"))
    saves = report["checkpoint_saves"]
    if "mean_extra_s" in saves:
        steps = ", ".join(str(s["step"]) for s in saves["saves"])
        rows.append(_row("checkpoint-save spike", f"saves at step {steps}: +{saves['mean_extra_s']:g} s per save, "
                         f"{saves['wall_share_pct']}% of wall time (every {saves['save_interval_steps']} steps)",
                         "small" if saves["wall_share_pct"] <= 2 else "saves cost a noticeable share: save less "
                         "often, or only the trainable weights", "P2" if saves["wall_share_pct"] > 2 else "P3"))
    irregular = report["irregular_steps"]
    if irregular.get("jitter_pairs"):
        pairs = ", ".join(f"{p['steps'][0]}-{p['steps'][1]} ({p['seconds'][0]:g}+{p['seconds'][1]:g} s)"
                          for p in irregular["jitter_pairs"][:5])
        rows.append(_row("step-time jitter", f"{len(irregular['jitter_pairs'])} slow+fast pairs summing to "
                         f"2x median: {pairs}", "none: reporting jitter, no net time lost", "P3"))
    if irregular.get("other"):
        rows.append(_row("irregular steps", f"{len(irregular['other'])} steps off the median by "
                         f"> {irregular['threshold_s']:g} s, net {irregular['other_extra_s']:+g} s",
                         "look for stalls (data, I/O, other jobs)", "P2" if irregular["other_extra_s"] > 600 else "P3"))
    share = report["data"].get("data_wait_share_pct")
    if share is not None and share > 5:
        rows.append(_row("data loader stalls", f"{share}% of step time waiting for data",
                         "GPUs idle; more workers, precomputed shards or faster decode", "P1" if share > 20 else "P2"))
    return rows


def _loss_rows(report: dict) -> list[dict]:
    rows = []
    loss, clip = report["loss"], report["grad_norm"]
    ga = loss.get("ga_sum", {}) if loss else {}
    if ga.get("suspected"):
        rows.append(_row("loss summed over gradient accumulation",
                         f"logged loss is {ga['median_loss_to_segment_mean']}x the mean segment loss and above "
                         f"every segment loss in {100 * ga['share_loss_above_all_segments']:.0f}% of entries; GA "
                         f"{ga['grad_accum']}", f"logged loss and gradients are ~{ga['grad_accum']}x a mean; not "
                         "comparable across GA settings, and clipping absorbs the factor", "P1"))
    if loss and loss.get("num_nonfinite"):
        rows.append(_row("non-finite loss", f"{loss['num_nonfinite']} logged losses are nan/inf",
                         "training diverged or a batch is broken", "P1"))
    if clip and clip["share_above_pct"] >= 90:
        rows.append(_row("gradient clipping active on (nearly) every step",
                         f"grad_norm > {clip['max_grad_norm']:g} in {clip['num_above']}/{clip['num_logged']} logged "
                         f"steps (median {clip['median']:.3g}, clip source: {clip['max_grad_norm_source']})",
                         f"updates scaled by ~{clip['median_clip_factor']:g}: the effective learning rate is "
                         "set by the clip, not by the LR schedule", "P1"))
    return rows


def render_text(report: dict) -> str:
    """Human-readable report, one section per topic, then the problem table."""
    if "error" in report:
        return f"== {report['path']}\n{report['error']}"
    parts = [f"== {report['path']}  ({report['num_records']} records, "
             f"{report['num_truncated_lines']} truncated lines, {report['num_unparsed']} unparsed)"]
    parts += [_setup_text(report), _steps_text(report), _saves_text(report),
              _loss_text(report), _warnings_text(report)]
    if report["not_found"]:
        parts.append("-- not found in this log\n" + "\n".join(f"  - {m}" for m in report["not_found"]))
    parts.append("-- problems (problem | evidence | impact | priority)\n" + "\n".join(
        f"  {r['priority']} | {r['problem']} | {r['evidence']} | {r['impact']}" for r in report["problems"])
        if report["problems"] else "-- problems: none found")
    return "\n".join(p for p in parts if p)


def _setup_text(report: dict) -> str:
    setup = report["setup"]
    keys = ("world_size", "per_device_batch", "grad_accum", "total_batch", "num_examples", "num_epochs",
            "total_steps", "num_trainable_params", "max_grad_norm")
    lines = [f"  {k}: {setup[k]:,}  ({setup['sources'].get(k, '')})" for k in keys if k in setup]
    checks = setup.get("world_size_checks", {})
    if len(checks) > 1:
        lines.append("  world size checks: " + "; ".join(f"{s} = {v}" for s, v in checks.items()))
    return "-- setup\n" + ("\n".join(lines) if lines else "  (none found)")


def _steps_text(report: dict) -> str:
    stats, projection, irregular = report["step_time"], report["projection"], report["irregular_steps"]
    if not stats:
        return "-- step time\n  (no step times found)"
    lines = [f"  source: {stats['source']}; {stats['num_steps']} steps",
             f"  median {stats['median_s']:g} s, p10 {stats['p10_s']:g} s, p90 {stats['p90_s']:g} s, "
             f"mean {stats['mean_s']:g} s, min {stats['min_s']:g} s, max {stats['max_s']:g} s",
             f"  first step: {stats['first_step_s']} s (start-up overhead {stats['startup_overhead_s']} s)",
             f"  trend: {stats['trend']} ({stats['trend_change_pct']:+g}% first->last window median); windows: "
             + "; ".join(f"{w['steps'][0]}-{w['steps'][1]}: n={w['num_steps']} median {w['median_s']:g} "
                         f"mean {w['mean_s']:g}" for w in stats["windows"])]
    if "projected_total_h" in projection:
        eta = projection.get("tqdm_eta_total_s")
        lines.append(f"  projected run: {projection['total_steps']} steps x {projection['mean_regular_step_s']:g} s "
                     f"(mean non-save step) + {projection['num_saves']} saves -> {projection['projected_total_h']} h "
                     f"({projection['projected_total_days']} days)"
                     + (f"; tqdm ETA total {eta / 3600:.1f} h" if eta is not None else ""))
    if "samples_per_s" in projection:
        lines.append(f"  throughput: {projection['samples_per_s']} samples/s, "
                     f"{projection.get('gpu_s_per_sample')} GPU-s per sample")
    for pair in irregular.get("jitter_pairs", []):
        lines.append(f"  jitter pair steps {pair['steps']}: {pair['seconds']} s (sum {pair['sum_s']:g})")
    for other in irregular.get("other", [])[:20]:
        lines.append(f"  irregular step {other['step']}: {other['seconds']:g} s ({other['extra_s']:+g} s)")
    return "-- step time\n" + "\n".join(lines)


def _saves_text(report: dict) -> str:
    saves = report["checkpoint_saves"]
    lines = [f"  save after step {s['step']}: step {s['slow_step']} took {s['slow_step_s']} s "
             f"(extra {s['extra_s']} s)" for s in saves["saves"]]
    if "wall_share_pct" in saves:
        lines.append(f"  {saves['wall_share_pct']}% of wall time at one save per "
                     f"{saves['save_interval_steps']} steps ({saves['interval_source']})")
    return "-- checkpoint saves\n" + ("\n".join(lines) if lines else "  (none found)")


def _loss_text(report: dict) -> str:
    loss, clip = report["loss"], report["grad_norm"]
    if not loss:
        return "-- loss\n  (no loss entries found)"
    lines = [f"  {loss['num_entries']} entries ({loss['source']}); min loss {loss['min_loss']}"]
    for w in loss["windows"]:
        segs = ", ".join(f"{n} {v}" for n, v in w["segments"].items())
        per_micro = f" (/GA {w['loss_div_ga']})" if "loss_div_ga" in w else ""
        lines.append(f"  steps {w['steps'][0]}-{w['steps'][1]} (n={w['num_entries']}): loss {w['loss']}{per_micro}, "
                     f"grad_norm {w['grad_norm']}; {segs}")
    ga = loss.get("ga_sum", {})
    if ga.get("suspected"):
        lines.append(f"  loss looks summed over GA={ga['grad_accum']}: divide by {ga['grad_accum']} for the "
                     f"per-micro-batch mean (loss/segment-mean ratio {ga['median_loss_to_segment_mean']})")
    if loss.get("note"):
        lines.append(f"  note: {loss['note']}")
    if clip:
        lines.append(f"  grad_norm {clip['min']:.3g}..{clip['max']:.3g} (median {clip['median']:.3g}) vs "
                     f"max_grad_norm {clip['max_grad_norm']:g} ({clip['max_grad_norm_source']}): above on "
                     f"{clip['share_above_pct']}% of logged steps")
    return "-- loss and grad norm\n" + "\n".join(lines)


def _warnings_text(report: dict) -> str:
    groups = report["warnings"]
    lines = [f"  x{g['count']:<4} [{g['priority']}] {g['title']}: {g['impact']}" for g in groups]
    return "-- warnings (grouped)\n" + ("\n".join(lines) if lines else "  (none found)")
