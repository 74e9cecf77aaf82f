"""Tests for `python -m train.diagnose`: exact figures on the real log excerpt (hand-read from the log
text), a synthetic 8-rank interleaved log, truncated / empty / setup-less logs, our `[vln-train]`
format, and `--json` round-tripping."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from train.diagnose import diagnose, main
from train.log_parse import format_vln_record, parse_log_file, parse_log_text, split_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def excerpt_path(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "train-log-excerpt.log"


@pytest.fixture(scope="module")
def excerpt(excerpt_path: Path) -> dict:
    return diagnose(parse_log_file(excerpt_path))


def test_excerpt_setup(excerpt: dict) -> None:
    setup = excerpt["setup"]
    # "Instantaneous batch size per device = 1", "Total train batch size ... = 64", "GA steps = 8"
    assert (setup["per_device_batch"], setup["grad_accum"], setup["total_batch"]) == (1, 8, 64)
    assert setup["world_size"] == 8 and setup["world_size_checks"] == {
        "total batch / (per-device batch x GA)": 8, "copies of a once-per-process warning": 8}
    assert (setup["num_examples"], setup["num_epochs"], setup["total_steps"]) == (612_492, 3, 28_710)
    assert setup["num_trainable_params"] == 7_708_435_200


def test_excerpt_step_time(excerpt: dict) -> None:
    stats = excerpt["step_time"]
    # Steps 2-39 (38 deltas: 30x55, 6x56 at 8,14,20,24,27,34, 63 at 29, 47 at 30) = 2096 s;
    # steps 471-500 (23x55, 7x56) = 1657 s; steps 501-529 (90, 57 at 509, 6x56, 21x55) = 1638 s.
    assert stats["num_steps"] == 38 + 30 + 29
    assert (stats["median_s"], stats["p10_s"], stats["p90_s"]) == (55.0, 55.0, 56.0)
    assert (stats["min_s"], stats["max_s"]) == (47.0, 90.0)
    assert stats["mean_s"] == round((2096 + 1657 + 1638) / 97, 3)
    assert stats["first_step_s"] == 377.0  # "1/28710 [06:17<..."
    assert stats["startup_overhead_s"] == 322.0
    assert [w["mean_s"] for w in stats["windows"]] == [round(2096 / 38, 3), round(1657 / 30, 3), round(1638 / 29, 3)]
    assert stats["trend"] == "flat"


def test_excerpt_save_spike_and_projection(excerpt: dict) -> None:
    saves = excerpt["checkpoint_saves"]
    # step 500 at 7:45:07, "Saving model checkpoint to .../checkpoint-500", step 501 at 7:46:37
    assert [(s["step"], s["slow_step"], s["slow_step_s"], s["extra_s"])
            for s in saves["saves"]] == [(500, 501, 90.0, 35.0)]
    assert saves["save_interval_steps"] == 500
    assert saves["wall_share_pct"] == round(100 * 35 / (500 * 5391 / 97), 3)
    projection = excerpt["projection"]
    mean_regular = (5391 - 90) / 96
    assert projection["mean_regular_step_s"] == round(mean_regular, 3)
    assert projection["num_saves"] == 28_710 // 500
    assert projection["projected_total_s"] == round(377 + 28_709 * mean_regular + 57 * 35)
    assert projection["projected_total_h"] == 441.0
    # last refresh "529/28710 [8:12:25<431:53:39, ...]"
    assert projection["last_step"] == 529 and projection["elapsed_s"] == 8 * 3600 + 12 * 60 + 25
    assert projection["tqdm_eta_total_s"] == 29_545 + 431 * 3600 + 53 * 60 + 39
    assert projection["samples_per_s"] == round(64 / 55, 3)


def test_excerpt_irregular_loss_clip_warnings(excerpt: dict) -> None:
    irregular = excerpt["irregular_steps"]
    assert irregular["jitter_pairs"] == [{"steps": [29, 30], "seconds": [63.0, 47.0], "sum_s": 110.0}]
    assert irregular["other"] == []  # step 501 is the save, not an irregularity
    loss = excerpt["loss"]
    assert loss["num_entries"] == 9 and loss["min_loss"] == 3.8885
    assert loss["first"] == {"step": 10, "loss": 11.8008, "grad_norm": 88.16414923357439,
                             "lr": 2.320185614849188e-07, "epoch": 0.0,
                             "segments": {"subinstruction": 0.36328125, "2d": 1.8203125, "3d": 2.46875,
                                          "action": 0.490234375}}
    assert loss["last"]["step"] == 520 and loss["last"]["loss"] == 3.9961
    assert loss["ga_sum"]["suspected"] and loss["ga_sum"]["share_loss_above_all_segments"] == 1.0
    clip = excerpt["grad_norm"]
    assert (clip["num_logged"], clip["num_above"], clip["max_grad_norm"]) == (9, 9, 1.0)
    assert clip["min"] == 16.479966175098323 and clip["max"] == 88.16414923357439
    counts = {w["key"]: w["count"] for w in excerpt["warnings"]}
    assert counts == {"eval_strategy_deprecated": 8, "flash_attn_not_on_gpu": 8, "slow_image_processor": 8,
                      "tokenizer_deprecated": 8, "autocast_deprecated": 9, "checkpoint_no_grad": 9,
                      "ga_mismatch": 1, "newly_initialized": 3, "train_this_model": 8}
    assert excerpt["num_truncated_lines"] == 9
    problems = {p["problem"]: p["priority"] for p in excerpt["problems"]}
    assert problems["loss summed over gradient accumulation"] == "P1"
    assert problems["gradient clipping active on (nearly) every step"] == "P1"
    assert problems["checkpoint-save spike"] == "P3"
    assert excerpt["run_state"] == {"finished": False, "last_step": 529, "total_steps": 28_710,
                                    "progress_pct": round(100 * 529 / 28_710, 2)}


def _eight_rank_log() -> str:
    """Rank 0 runs the HF bar (\\r refreshes); all 8 ranks interleave prefixed warnings between them;
    rank 3 also draws a bar of the same total with other times, which must be ignored."""
    durations = {1: 200} | {s: 30 for s in range(2, 16)} | {6: 42, 9: 36, 10: 24}
    out = [f"[rank{r}]: /x/lib/foo.py:{10 + r}: UserWarning: odd thing {r}\n[rank{r}]:   warnings.warn(\n"
           for r in (5, 2, 7, 0, 1, 6, 3, 4)]
    out.append("[rank0]: ***** Running training *****\n[rank0]:   Num examples = 1,000\n"
               "[rank0]:   Num Epochs = 1\n[rank0]:   Instantaneous batch size per device = 2\n"
               "[rank0]:   Total train batch size (w. parallel, distributed & accumulation) = 64\n"
               "[rank0]:   Gradient Accumulation steps = 4\n[rank0]:   Total optimization steps = 15\n")
    out.append("[rank0]: " + tqdm.format_meter(0, 15, 0))
    elapsed = 0
    for step in range(1, 16):
        elapsed += durations[step]
        out.append("\r[rank0]: " + tqdm.format_meter(step, 15, elapsed))
        out.append(f"\n[rank{step % 8}]: Using a slow image processor as `use_fast` is unset\n")
        out.append("[rank3]: " + tqdm.format_meter(step, 15, elapsed + 100) + "\n")
        if step in (5, 10):
            out.append(f"[rank0]: {{'loss': {2.0 + step / 100}, 'grad_norm': 0.5, 'learning_rate': 1e-05, "
                       f"'epoch': 0.{step}}}\n[rank0]: {{'loss_2d': 0.5, 'loss_3d': 0.45, 'epoch': 0.{step}}}\n")
        if step == 5:
            out.append("[rank0]: Saving model checkpoint to /out/checkpoint-5\n")
    return "".join(out)


def test_synthetic_eight_ranks_interleaved() -> None:
    report = diagnose(parse_log_text(_eight_rank_log()))
    assert report["setup"]["world_size"] == 8
    assert report["setup"]["world_size_checks"]["rank prefixes (max rank + 1)"] == 8
    assert report["setup"]["world_size_checks"]["total batch / (per-device batch x GA)"] == 8
    stats = report["step_time"]
    assert (stats["num_steps"], stats["median_s"], stats["first_step_s"]) == (14, 30.0, 200.0)
    assert [(s["step"], s["extra_s"]) for s in report["checkpoint_saves"]["saves"]] == [(5, 12.0)]
    assert report["irregular_steps"]["jitter_pairs"][0]["steps"] == [9, 10]
    loss = report["loss"]
    assert [(e["step"], e["loss"]) for e in (loss["first"], loss["last"])] == [(5, 2.05), (10, 2.1)]
    assert report["loss"]["ga_sum"]["suspected"]  # 2.05 vs segments 0.5/0.45 with GA 4
    counts = {w["key"]: w["count"] for w in report["warnings"]}
    assert counts["slow_image_processor"] == 15
    assert counts["other: foo.py:N: UserWarning: odd thing N"] == 8
    assert report["grad_norm"]["num_above"] == 0


def test_truncated_log(excerpt_path: Path) -> None:
    raw = excerpt_path.read_bytes()
    cut = raw.index(b" 13/28710 [17:18") + len(b" 13/28710 [17:1")
    report = diagnose(parse_log_text(raw[:cut].decode("utf-8", errors="replace")))
    stats = report["step_time"]
    # steps 2..12 are 55 s except step 8 (12:43 - 11:47 = 56 s)
    assert (stats["num_steps"], stats["median_s"], stats["max_s"]) == (11, 55.0, 56.0)
    assert report["run_state"]["last_step"] == 12
    assert report["loss"]["num_entries"] == 1
    assert "checkpoint saves (none logged)" in report["not_found"]
    # cut inside a multi-byte tqdm block character before the setup lines
    mid_char = raw.index("█".encode()) + 1
    early = diagnose(parse_log_text(raw[:mid_char].decode("utf-8", errors="replace")))
    assert early["step_time"] == {} and early["setup"].get("world_size") == 8  # warning copies only
    assert any(m.startswith("setup value total_steps") for m in early["not_found"])
    assert any(m.startswith("step times") for m in early["not_found"])


def test_log_without_setup_lines(excerpt_path: Path) -> None:
    text = excerpt_path.read_text(encoding="utf-8")
    report = diagnose(parse_log_text(text[text.index("  0%|          | 0/28710"):]))
    assert "world_size" not in report["setup"]
    assert any(m.startswith("world size") for m in report["not_found"])
    assert report["step_time"]["median_s"] == 55.0
    assert report["projection"]["total_steps"] == 28_710  # from the bar's total


def test_empty_log(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "empty.log"
    path.write_bytes(b"")
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "log is empty" in text and "problems: none found" in text
    report = diagnose(parse_log_file(path))
    assert report["step_time"] == {} and report["loss"] == {} and report["problems"] == []


def test_vln_train_format() -> None:
    lines = [format_vln_record({"event": "setup", "world_size": 8, "per_device_batch": 4, "grad_accum": 2,
                                "total_batch": 64, "num_examples": 6400, "num_epochs": 1, "total_steps": 100,
                                "max_grad_norm": 1.0})]
    for step in range(1, 21):
        lines.append(format_vln_record({
            "step": step, "step_time_s": 60.0 if step == 1 else (9.0 if step == 11 else 5.0),
            "samples_per_s": 12.8, "data_wait_s": 1.0, "loss": 1.0 - step / 100, "loss_seg_2d": 0.8,
            "loss_seg_action": 0.3, "grad_norm": 0.5 if step % 2 else 2.0, "lr": 1e-5, "gpu_mem_gb": 60 + step}))
    lines.insert(12, format_vln_record({"event": "save", "step": 10, "save_s": 3.9}))
    report = diagnose(parse_log_text("\n".join(["[rank0]: " + line for line in lines]) + "\n"))
    assert report["setup"]["world_size"] == 8
    assert report["setup"]["sources"]["total_steps"] == "[vln-train] setup record"
    stats = report["step_time"]
    assert (stats["num_steps"], stats["median_s"], stats["first_step_s"]) == (19, 5.0, 60.0)
    assert report["checkpoint_saves"]["saves"] == [{"step": 10, "slow_step": 11, "slow_step_s": 9.0,
                                                    "extra_s": 4.0, "reported_save_s": 3.9}]
    assert report["data"] == {"data_wait_share_pct": round(100 * 20 / (60 + 18 * 5 + 9), 2),
                              "max_data_wait_s": 1.0, "peak_gpu_mem_gb": 80}
    assert report["loss"]["source"] == "vln-train" and "ga_sum" not in report["loss"]
    assert report["loss"]["last"]["segments"] == {"2d": 0.8, "action": 0.3}
    clip = report["grad_norm"]
    assert (clip["num_above"], clip["max_grad_norm_source"]) == (10, "[vln-train] setup record")
    assert {p["problem"]: p["priority"] for p in report["problems"]}["data loader stalls"] == "P2"


def test_split_records_handles_carriage_returns() -> None:
    assert split_records("a\rb\r\nc\nd") == ["a", "b", "c", "d"]


def test_json_round_trip(excerpt_path: Path, excerpt: dict, tmp_path: Path) -> None:
    nan_log = tmp_path / "nan.log"
    nan_log.write_text(format_vln_record({"step": 2, "step_time_s": 5.0, "loss": float("nan")}) + "\n")
    result = subprocess.run([sys.executable, "-m", "train.diagnose", "--json", str(excerpt_path), str(nan_log)],
                            cwd=REPO, capture_output=True, text=True, check=True)
    logs = json.loads(result.stdout)["logs"]
    assert logs[0]["setup"]["world_size"] == 8
    assert logs[0]["checkpoint_saves"]["saves"][0]["extra_s"] == 35.0
    assert logs[0]["step_time"] == json.loads(json.dumps(excerpt["step_time"]))
    assert logs[1]["loss"]["first"]["loss"] is None and logs[1]["loss"]["num_nonfinite"] == 1


@pytest.mark.parametrize("window", ["0", "-5"])
def test_window_steps_below_one_is_a_usage_error(excerpt_path: Path, window: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(excerpt_path), "--window-steps", window])
    assert exit_info.value.code == 2 and "expected an integer ≥ 1" in capsys.readouterr().err
