"""Two processes (torchrun, gloo, CPU) of `train.launch` with configs/zero3.json and configs/zero2.json: train 4 steps
saving at 2 and 4;
a fresh run resumes from checkpoint-2 and its steps 3-4 losses equal the uninterrupted run's; per-rank loader
states sit in each checkpoint; `train.consolidate` turns the ZeRO checkpoint into an HF folder equal to the
parameters gathered from the live engine, and the resumed run ends at the same weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prep.build import build
from prep.sample_data import write_sample_episodes
from schemas.config import BuildConfig
from train.consolidate import consolidate, hf_state_dict, load_consolidated
from train.log_parse import parse_log_file

REPO = Path(__file__).resolve().parents[1]

# Run A goes through train.launch.run and then dumps the parameters gathered from the ZeRO-3 engine (reference
# for the consolidation); run B is the plain CLI.
_DRIVER = """
import logging, sys, torch, deepspeed
from train.launch import load_config, run, shutdown_distributed
logging.basicConfig(level=logging.INFO)
trainer = run(load_config(sys.argv[1], [a for a in sys.argv[3:] if a != "--set"]))
params = dict(trainer.model.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values())):
    if trainer.args.process_index == 0:
        torch.save({k: v.detach().clone() for k, v in params.items()}, sys.argv[2])
shutdown_distributed(finished=True)
"""


def torchrun(args: list[str], log: Path, env: dict) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), *args]
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400, check=False)
    assert done.returncode == 0, log.read_text()[-4000:]


def step_losses(log: Path) -> dict[int, dict]:
    return {r["step"]: r for r in parse_log_file(log).vln_records if r.get("event", "step") == "step"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_zero_two_ranks_resume_equals_uninterrupted_and_consolidates(tmp_path, tokenizer_dir, stage):
    episodes = write_sample_episodes(tmp_path / "episodes", num_episodes=2)
    build(BuildConfig(input=str(episodes), output=str(tmp_path / "shards"), model_path=str(tokenizer_dir),
                      max_history_images=1, episodes_per_shard=1, progress=False))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    common = ["--set", f"data.manifest={tmp_path / 'shards' / 'manifest.json'}", "--set", f"deepspeed=configs/zero{stage}.json",
              "--set", "training.max_steps=4", "--set", "training.save_steps=2", "--set", "training.learning_rate=1e-2",
              "--set", "training.save_total_limit=3"]
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    config = str(REPO / "configs" / "train_tiny.yaml")
    torchrun([str(driver), config, str(tmp_path / "params.pt"), *common,
              "--set", f"training.output_dir={tmp_path / 'a'}"], tmp_path / "a.log", env)
    torchrun(["-m", "train.launch", "--config", config, *common, "--set", f"training.output_dir={tmp_path / 'b'}",
              "--set", f"training.resume_from_checkpoint={tmp_path / 'a' / 'checkpoint-2'}"], tmp_path / "b.log", env)

    a, b = step_losses(tmp_path / "a.log"), step_losses(tmp_path / "b.log")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    assert all(r["samples"] == 4 for r in a.values())  # 2 ranks × batch 1 × accumulation 2, no re-sharding
    for step in (3, 4):
        for key in ("loss", "loss_seg_subinstruction", "loss_seg_2d", "loss_seg_3d", "loss_seg_action", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6, rel=0), (step, key)
    assert a[4]["loss_text"] < a[1]["loss_text"]

    for step, consumed in ((2, 4), (4, 8)):
        states = [json.loads((tmp_path / "a" / f"checkpoint-{step}" / f"loader_state_rank{r}.json").read_text())
                  for r in (0, 1)]
        assert [(s["rank"], s["world_size"], sum(s["consumed"])) for s in states] == [(0, 2, consumed), (1, 2, consumed)]
    if stage == 3:
        assert not list((tmp_path / "a" / "checkpoint-4").glob("*.safetensors"))  # no 16-bit gather at save

    live = torch.load(tmp_path / "params.pt", weights_only=True)
    written = consolidate(tmp_path / "a" / "checkpoint-4", tmp_path / "hf_a", include_vggt=True)
    expected = hf_state_dict(live, include_vggt=True)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    on_disk = load_file(str(tmp_path / "hf_a" / "model.safetensors"))
    assert all(torch.equal(on_disk[k], expected[k]) for k in expected)
    resumed = consolidate(tmp_path / "b" / "checkpoint-4", tmp_path / "hf_b", include_vggt=True)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    loaded = load_consolidated(tmp_path / "hf_a").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in live.items())
