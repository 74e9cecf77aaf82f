"""Loss-side analysis of a parsed training log for `train.diagnose`: loss entries per logged step
(HF dicts or our `[vln-train]` records), window trends of loss / grad norm / segment losses, the
GA-summed-loss check, grad norm against the clip threshold, and data-wait share (our format only).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

import numpy as np

from train.log_parse import ParsedLog, training_bar


def loss_entries(log: ParsedLog) -> tuple[list[dict], str]:
    """One entry per logged step: loss, grad_norm, lr, epoch and segments {name: loss}."""
    ours = [r for r in log.vln_records if r.get("event", "step") == "step" and "loss" in r]
    if ours:
        return [{"step": int(r["step"]), "loss": r.get("loss"), "grad_norm": r.get("grad_norm"),
                 "lr": r.get("lr"), "segments": {k[len("loss_seg_"):]: v for k, v in r.items()
                                                  if k.startswith("loss_seg_")}} for r in ours], "vln-train"
    bar = training_bar(log)
    entries: dict[int, dict] = {}
    bar_records = [u.record for u in bar]
    for record, values in log.hf_dicts:
        before = bisect.bisect_right(bar_records, record)
        step = bar[before - 1].step if before else 0
        entry = entries.setdefault(step, {"step": step, "segments": {}})
        for key, value in values.items():
            if key == "learning_rate":
                entry["lr"] = value
            elif key in ("loss", "grad_norm", "epoch") or key.startswith("train_"):
                entry[key] = value
            elif key.startswith("loss_"):
                entry["segments"][key[len("loss_"):]] = value
    return [e for _, e in sorted(entries.items()) if "loss" in e or e["segments"]], "hf"


def loss_trends(entries: list[dict], source: str, setup: dict, window_steps: int) -> dict:
    """Per-window means of loss, grad norm and segment losses; flags a loss summed over GA."""
    if not entries:
        return {}
    windows = []
    for start in range(0, entries[-1]["step"] + 1, window_steps):
        inside = [e for e in entries if start < e["step"] <= start + window_steps]
        if inside:
            names = sorted({n for e in inside for n in e["segments"]})
            windows.append({"steps": [start + 1, start + window_steps], "num_entries": len(inside),
                            "loss": mean_of(e.get("loss") for e in inside),
                            "grad_norm": mean_of(e.get("grad_norm") for e in inside),
                            "segments": {n: mean_of(e["segments"].get(n) for e in inside) for n in names}})
    losses = [e["loss"] for e in entries if finite(e.get("loss"))]
    result = {"source": source, "num_entries": len(entries), "windows": windows,
              "first": entries[0], "last": entries[-1], "min_loss": min(losses) if losses else None,
              "num_nonfinite": sum(1 for e in entries if "loss" in e and not finite(e["loss"]))}
    if source == "hf":
        result["ga_sum"] = detect_ga_sum(entries, setup.get("grad_accum"))
        if result["ga_sum"].get("suspected"):
            for window in windows:
                if window["loss"] is not None:
                    window["loss_div_ga"] = round(window["loss"] / setup["grad_accum"], 4)
        result["note"] = ("HF per-segment losses of the original trainer are one micro-batch of the "
                          "main process, not averages over the step")
    return result


def detect_ga_sum(entries: list[dict], grad_accum: int | None) -> dict:
    """Heuristic: a per-micro-batch loss lies within its segment losses; a logged loss above every
    segment loss, at a ratio nearer GA than 1, means the loss was summed over GA micro-batches."""
    pairs = [(e["loss"], [v for k, v in e["segments"].items() if finite(v) and k != "action_head"])
             for e in entries if finite(e.get("loss")) and e["segments"]]
    pairs = [(loss, segs) for loss, segs in pairs if segs and sum(segs) > 0]
    if not grad_accum or grad_accum < 2 or not pairs:
        return {"checked": False, "reason": "needs GA > 1 and loss entries with segment losses"}
    ratio = float(np.median([loss / (sum(segs) / len(segs)) for loss, segs in pairs]))
    above = sum(1 for loss, segs in pairs if loss > max(segs)) / len(pairs)
    suspected = abs(math.log(ratio / grad_accum)) < abs(math.log(ratio)) and above >= 0.8
    return {"checked": True, "suspected": suspected, "grad_accum": grad_accum,
            "median_loss_to_segment_mean": round(ratio, 2), "share_loss_above_all_segments": round(above, 3)}


def grad_clipping(entries: list[dict], max_grad_norm: float, source: str) -> dict:
    """How often the logged (pre-clip) grad norm exceeds the clip threshold."""
    norms = [e["grad_norm"] for e in entries if finite(e.get("grad_norm"))]
    if not norms:
        return {}
    above = sum(1 for n in norms if n > max_grad_norm)
    return {"max_grad_norm": max_grad_norm, "max_grad_norm_source": source, "num_logged": len(norms),
            "num_above": above, "share_above_pct": round(100 * above / len(norms), 1),
            "min": min(norms), "median": float(np.median(norms)), "max": max(norms),
            "median_clip_factor": round(min(1.0, max_grad_norm / float(np.median(norms))), 4)}


def data_wait(log: ParsedLog) -> dict:
    """Share of step time spent waiting for data, and peak GPU memory (our format only)."""
    steps = [r for r in log.vln_records if r.get("event", "step") == "step"]
    waits = [(r["data_wait_s"], r["step_time_s"]) for r in steps
             if finite(r.get("data_wait_s")) and finite(r.get("step_time_s"))]
    memory = [r["gpu_mem_gb"] for r in steps if finite(r.get("gpu_mem_gb"))]
    result = {}
    if waits:
        total = sum(t for _, t in waits)
        result["data_wait_share_pct"] = round(100 * sum(w for w, _ in waits) / total, 2) if total else None
        result["max_data_wait_s"] = max(w for w, _ in waits)
    if memory:
        result["peak_gpu_mem_gb"] = max(memory)
    return result


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_of(values: Iterable) -> float | None:
    kept = [v for v in values if finite(v)]
    return round(float(np.mean(kept)), 4) if kept else None

