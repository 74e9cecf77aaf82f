"""train.launch / train.trainer on CPU in one process: a tiny JanusVLN trains on a build of the embedded sample
data and its loss goes down; the logged step loss (batch 1 × grad accumulation 2) equals the loss of one
batch holding the same two samples; config handling and derived max_steps; bench/train_step.py runs tiny."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prep.build import build
from prep.sample_data import write_sample_episodes
from schemas.config import BuildConfig
from schemas.errors import SchemaError
from train.callbacks import StepLogCallback, load_loader_state, save_loader_state
from train.collate import BOOKKEEPING_KEYS, Collator
from train.launch import build_dataset, expected_build, load_config, run, training_arguments
from train.loss import LossConfig, compute_loss, summarize
from train.model import JanusConfig, JanusVLN
from train.pixels import PixelDecoder
from train.stream import ShardStream, StreamConfig
from train.trainer import StreamLoader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, tokenizer_dir) -> str:
    """2 synthetic episodes → 26 samples of 2 images (max_history_images 1) in 2 shards."""
    root = tmp_path_factory.mktemp("trainer")
    episodes = write_sample_episodes(root / "episodes", num_episodes=2)
    build(BuildConfig(input=str(episodes), output=str(root / "shards"), model_path=str(tokenizer_dir),
                      max_history_images=1, episodes_per_shard=1, progress=False))
    return str(root / "shards" / "manifest.json")


def tiny_config(manifest: str, output_dir: Path, **training) -> dict:
    config = load_config(REPO / "configs" / "train_tiny.yaml", [f"data.manifest={manifest}"])
    config["training"].update(output_dir=str(output_dir), save_strategy="no", **training)
    return config


def step_records(trainer) -> list[dict]:
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepLogCallback))
    return [r for r in callback.records if r["event"] == "step"]


def test_tiny_model_trains_loss_goes_down_and_step_loss_is_the_whole_step_average(manifest, tmp_path):
    config = tiny_config(manifest, tmp_path, max_steps=8, learning_rate=1.0e-2, max_grad_norm=0.0,
                         per_device_train_batch_size=1, gradient_accumulation_steps=2)
    trainer = run(config)
    records = step_records(trainer)
    assert [r["step"] for r in records] == list(range(1, 9)) and all(r["samples"] == 2 for r in records)
    loader = trainer.get_train_dataloader()  # the stream's own loader: Accelerate never wraps (re-shards) it
    assert type(loader) is StreamLoader and loader.dataset is trainer.train_dataset
    assert json.loads((tmp_path / "launch_config.json").read_text())["derived"]["max_steps"] == 8
    losses = [r["loss"] for r in records]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 1.0, losses
    assert records[-1]["loss_text"] < records[0]["loss_text"] - 2.0

    # Independent reference: the untrained model on ONE batch holding the step's two samples (the stream's first
    # two of epoch 0 on rank 0) gives the same step loss and per-segment losses as the two accumulated halves.
    stream = ShardStream(manifest, StreamConfig(seed=0, num_open_shards=2, batch_size=2, num_workers=0))
    samples = [sample for _, sample in zip(range(2), iter(stream))]
    batch = Collator()(samples)
    batch = {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
    images_per_sample = batch["images_per_sample"]
    batch = {**PixelDecoder()(batch), "images_per_sample": images_per_sample}
    model = JanusVLN.tiny(janus_config=JanusConfig(vggt_dim=128, merger_hidden=128, lam=0.2), seed=0)
    with torch.no_grad():
        parts = compute_loss(model(**batch), batch, LossConfig(), step=0)
    expected = summarize(parts.stats, parts.action_weight)
    assert records[0]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for name in ("subinstruction", "2d", "3d", "action"):
        assert records[0][f"loss_seg_{name}"] == pytest.approx(expected[f"loss_{name}"], rel=1e-5)
    assert all(r["data_wait_s"] < r["step_time_s"] and r["samples_per_s"] == 2 / r["step_time_s"] for r in records)


def test_derived_max_steps_and_required_arguments(manifest, tmp_path):
    total = json.loads(Path(manifest).read_text())["totals"]["samples"]
    training = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3,
                "num_train_epochs": 2, "report_to": "none"}
    dataset, info = build_dataset({"manifest": manifest}, training)
    per_rank = total - total % 6  # one rank, no workers: a multiple of batch × accumulation
    assert (len(dataset), info["batches_per_rank_per_epoch"], info["steps_per_epoch"]) == (per_rank, per_rank // 2,
                                                                                          per_rank // 6)
    args = training_arguments(training, None, info)
    assert args.max_steps == 2 * (per_rank // 6) and info["num_epochs"] == 2
    assert (args.remove_unused_columns, args.ignore_data_skip, args.dataloader_in_order) == (False, True, True)
    assert (args.accelerator_config.dispatch_batches, args.accelerator_config.split_batches) == (False, False)
    for bad in ({"remove_unused_columns": True}, {"accelerator_config": {"dispatch_batches": True}},
                {"ignore_data_skip": False}):
        with pytest.raises(SchemaError):
            training_arguments({**training, **bad}, None, dict(info))


def test_load_config_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: {learning_rate: 1e-3}\nmodel: {tiny: true}\n")
    config = load_config(path, ["training.save_strategy=no", "training.warmup_steps=5", "training.bf16=false",
                                "loss.segment_weights=[1, 2, 0.5, 1]", "data.manifest=m.json"])
    assert config["training"] == {"learning_rate": 1e-3, "save_strategy": "no", "warmup_steps": 5, "bf16": False}
    assert config["loss"]["segment_weights"] == [1, 2, 0.5, 1] and config["data"]["manifest"] == "m.json"
    path.write_text("trainer: {}\n")
    with pytest.raises(SchemaError, match="trainer"):
        load_config(path)


def test_load_config_booleans_nesting_and_deepspeed_path():
    tiny = REPO / "configs" / "train_tiny.yaml"
    config = load_config(tiny, ["training.dataloader_persistent_workers=no", "model.with_vggt=off",
                                "training.save_strategy=no", "deepspeed=zero3.json"])
    assert config["training"]["dataloader_persistent_workers"] is False and config["model"]["with_vggt"] is False
    assert config["training"]["save_strategy"] == "no"  # a string option keeps the word
    assert Path(config["deepspeed"]) == REPO / "configs" / "zero3.json"  # beside the config file
    assert load_config(tiny, ["deepspeed.zero_optimization.stage=2"])["deepspeed"] == {"zero_optimization": {"stage": 2}}
    with pytest.raises(SchemaError, match="no such file"):
        load_config(tiny, ["deepspeed=zero9.json"])
    with pytest.raises(SchemaError, match="training.learning_rate"):
        load_config(tiny, ["training.learning_rate.x=3"])


@pytest.mark.parametrize("key, value, field", [("data.num_open_shards", 1, "num_open_shards"),
                                               ("data.stream", {"mixx": "sequential"}, "mixx"),
                                               ("loss.action_weigth", 0.5, "action_weigth"),
                                               ("training.learning_rat", 0.1, "learning_rat"),
                                               ("training.resume_from_checkpoint", "/nonexistent/checkpoint-4",
                                                "resume_from_checkpoint")])
def test_misspelt_keys_and_missing_checkpoint_are_refused_by_name(manifest, tmp_path, key, value, field):
    config = tiny_config(manifest, tmp_path, max_steps=1)
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(SchemaError, match=field):
        run(config)


def test_build_folder_as_manifest_and_data_seed_zero(manifest, tmp_path):
    trainer = run(tiny_config(str(Path(manifest).parent), tmp_path, max_steps=1))
    assert step_records(trainer)[0]["step"] == 1
    dataset, _ = build_dataset({"manifest": manifest}, {"seed": 5, "data_seed": 0})
    assert dataset.config.seed == 0


def test_bench_train_step_runs_tiny_on_cpu():
    out = subprocess.run([sys.executable, "bench/train_step.py", "--shape", "tiny", "--steps", "3", "--warmup", "1",
                          "--batch", "1", "--images", "2", "--image-size", "112", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps_timed"] == 3 and result["batch"] == 1
    assert result["samples_per_s"] == pytest.approx(1 / result["step_s_median"], rel=1e-6)
    assert 0 <= result["data_wait_share"] < 1 and result["tokens_per_sample"] == result["expected_tokens_per_sample"]
    assert result["step_s_p10"] <= result["step_s_median"] <= result["step_s_p90"]


def test_online_path_feeds_the_same_trainer(tmp_path, tokenizer_dir, manifest):
    """data.online: the original's per-sample path through the same collator, decoder and loss; at random init the
    text loss is the cross-entropy of a near-uniform distribution over the vocabulary, ln(151936)."""
    episodes = Path(manifest).parents[1] / "episodes"
    config = tiny_config(manifest, tmp_path, max_steps=1)
    config["data"] = {"online": {"source": str(episodes), "model_path": str(tokenizer_dir), "max_history_images": 1}}
    records = step_records(run(config))
    assert [(r["step"], r["samples"]) for r in records] == [(1, 2)]
    assert records[0]["loss_text"] == pytest.approx(math.log(151936), abs=0.15)


def test_loader_state_round_trip_and_missing_state_is_an_error(tmp_path):
    class Recorder:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    save_loader_state(Recorder({"epoch": 2, "consumed": [3, 4]}), tmp_path / "checkpoint-7", rank=1)
    restored = Recorder(None)
    load_loader_state(restored, tmp_path / "checkpoint-7", rank=1)
    assert restored.state == {"epoch": 2, "consumed": [3, 4]}
    with pytest.raises(SchemaError, match="loader_state_rank0.json"):
        load_loader_state(restored, tmp_path / "checkpoint-7", rank=0)


def test_build_tokenizer_is_checked_against_model_qwen(manifest, tokenizer_dir, tmp_path, caplog):
    qwen = tmp_path / "Qwen2.5-VL"
    shutil.copytree(tokenizer_dir, qwen)
    data = {"manifest": manifest, "expect": {"max_history_images": 1}}
    expected = expected_build(data, {"qwen": str(qwen)})
    assert expected == {"max_history_images": 1, "tokenizer_hash": json.loads(Path(manifest).read_text())["tokenizer_hash"]}
    ShardStream(manifest, StreamConfig(), expected=expected)  # the same files elsewhere: accepted
    (qwen / "merges.txt").write_text((qwen / "merges.txt").read_text() + "x y\n")
    with pytest.raises(SchemaError, match="tokenizer_hash="):
        ShardStream(manifest, StreamConfig(), expected=expected_build(data, {"qwen": str(qwen)}))
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    assert expected_build({"manifest": manifest}, {"qwen": str(weights_only)}) is None
    assert "has no tokenizer files" in caplog.text


def test_consolidate_refuses_incomplete_checkpoints(tmp_path):
    from train.consolidate import consolidate, main as consolidate_main
    for name in ("config.json", "janus_config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "latest").write_text("global_step3")
    with pytest.raises(SchemaError, match="global_step3/"):  # a half-copied checkpoint: no ZeRO shards
        consolidate(tmp_path, tmp_path / "out")
    assert consolidate_main([str(tmp_path), str(tmp_path / "out")]) == 2


def test_crop_build_with_features_of_two_resolutions_trains_at_batch_3(tmp_path, tokenizer_dir):
    """Crop mode keeps each image's aspect ratio, so stored features differ in patch count between episodes."""
    from PIL import Image
    from safetensors.torch import save_file

    from train.vggt import VGGTAggregator, tiny_config as tiny_vggt
    episodes = write_sample_episodes(tmp_path / "episodes", num_episodes=2)
    for png in (episodes / "episode_001").glob("*.png"):
        Image.open(png).convert("RGB").resize((1280, 720)).save(png)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in VGGTAggregator(tiny_vggt()).state_dict().items()},
              str(tmp_path / "vggt.safetensors"))
    build(BuildConfig(input=str(episodes), output=str(tmp_path / "shards"), model_path=str(tokenizer_dir),
                      image_mode="crop", max_history_images=1, progress=False, vggt_model=str(tmp_path / "vggt.safetensors"),
                      vggt_config="tiny", vggt_dtype="float32"))
    config = tiny_config(str(tmp_path / "shards" / "manifest.json"), tmp_path / "out", max_steps=2,
                         per_device_train_batch_size=3, gradient_accumulation_steps=1)
    config["data"]["stream"] = {"num_open_shards": 2, "mix": "interleave"}
    records = step_records(run(config))
    assert [r["samples"] for r in records] == [3, 3] and all(math.isfinite(r["loss"]) for r in records)
