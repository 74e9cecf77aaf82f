"""prep.vggt_stage: features stored by the build equal the online trainer's VGGT pass; manifest tags; idempotent
re-runs; a changed checkpoint file recomputes features; the trainer-side tag check; Ray actors = local bytes."""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prep.build import build
from prep.vggt_stage import (FLOP_PER_SAMPLE, FeatureStage, cpu_seconds_per_sample, to_storage, vggt_inputs,
                             warn_if_slow)
from schemas import stored
from schemas.config import BuildConfig
from schemas.errors import SchemaError
from schemas.manifest import VggtTags, check_vggt_tags
from shards_manifest import shard_io
from train.collate import Collator, _as_tensor
from train.online import OnlineDataset
from train.pixels import PixelDecoder, collate_frames
from train.vggt import VGGTAggregator, load_aggregator, sample_features, tiny_config

TINY_FEATURE_DIM = 2 * tiny_config().embed_dim  # 128; VGGT-1B's is 2048


def make_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = VGGTAggregator(tiny_config())
    with torch.no_grad():  # non-zero camera/register tokens, so slot 0 vs 1 and the reference frame matter
        model.camera_token.normal_()
        model.register_token.normal_()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def episode_subset(root: Path, episodes_dir: Path, names: tuple[str, ...]) -> Path:
    """A folder with only some fixture episodes: the tiny aggregator costs ≈ 2.7 s per 644² sample on 2 cores."""
    root.mkdir()
    for name in names:
        (root / name).symlink_to(episodes_dir / name, target_is_directory=True)
    return root


def vggt_config(tmp: Path, episodes_dir: Path, tokenizer_dir: Path, names=("ep_b", "ep_c"), **changes) -> BuildConfig:
    base = BuildConfig(input=str(episode_subset(tmp / "episodes", episodes_dir, names)), model_path=str(tokenizer_dir),
                       output=str(tmp / "out"), episodes_per_shard=1, max_reject_fraction=0.5, progress=False,
                       vggt_model=str(make_checkpoint(tmp / "tiny.safetensors", seed=1)), vggt_config="tiny",
                       vggt_dtype="float32", vggt_batch_samples=2, reference_frame="last")
    return base.replace(**changes)


def stored_features(output: str) -> dict[str, np.ndarray]:
    manifest = shard_io.read_manifest(f"{output}/manifest.json")
    return {r.sample_id: r.vggt_features for s in manifest.shards for r in shard_io.iter_shard(f"{output}/{s.name}")
            if isinstance(r, stored.StoredSample)}


def shard_files(output: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(output).glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory, episodes_dir, tokenizer_dir):
    config = vggt_config(tmp_path_factory.mktemp("vggt"), episodes_dir, tokenizer_dir)
    summary = build(config)
    return config, summary


def test_stored_features_equal_online_vggt(built, tokenizer_dir):
    config, summary = built
    assert summary["samples"] == 3 and summary["vggt_shards_computed"] == 2
    features = stored_features(config.output)
    # the training-time path: online dataset (source PNGs) → collator → PixelDecoder → aggregator, one batch of 3
    online = OnlineDataset(config.input, tokenizer_dir)
    batch = PixelDecoder()(Collator()([online[i] for i in range(len(online))]))
    model = load_aggregator(config.vggt_model, tiny_config())
    with torch.no_grad():
        expected = sample_features(model, torch.stack(batch["images_vggt"]), "last")
    assert sorted(features) == sorted(batch["sample_id"])
    for sample_id, feature in zip(batch["sample_id"], expected):
        assert features[sample_id].dtype == np.float32 and features[sample_id].shape == (46 * 46, TINY_FEATURE_DIM)
        np.testing.assert_allclose(features[sample_id], feature.numpy(), rtol=0, atol=1e-6)
    values = list(features.values())  # per-sample features, not one map tiled
    assert all(np.abs(a - b).max() > 1e-4 for i, a in enumerate(values) for b in values[i + 1:])


def test_rewrite_keeps_every_frame_member_byte_for_byte(built, tmp_path, episodes_dir, tokenizer_dir):
    """The stage copies frames as stored (never re-encodes them): its shards hold exactly the frame members of
    the same build without features."""
    config, _ = built
    plain = config.replace(vggt_model="", output=str(tmp_path / "plain"))
    build(plain)

    def frame_members(output: str) -> dict[str, tuple]:
        return {r.key: (r.geometry, r.payload) for name in shard_files(output)
                for r in shard_io.iter_shard(f"{output}/{name}", lazy_frames=True) if isinstance(r, stored.PackedFrame)}
    with_features, without = frame_members(config.output), frame_members(plain.output)
    assert len(with_features) == 4 and with_features == without


def test_manifest_carries_the_tags(built):
    config, _ = built
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    digest = hashlib.sha256(Path(config.vggt_model).read_bytes()).hexdigest()
    assert manifest.vggt == VggtTags(checkpoint_sha256=digest, reference_frame="last", dtype="float32")
    assert manifest.image_mode == "pad"
    assert check_vggt_tags(manifest, {"checkpoint_sha256": digest, "reference_frame": "last", "dtype": "float32",
                                      "image_mode": "pad"}) == manifest.vggt


@pytest.mark.parametrize("field, value", [("reference_frame", "first"), ("dtype", "bfloat16"),
                                          ("checkpoint_sha256", "0" * 64), ("image_mode", "crop")])
def test_tag_check_refuses_a_mismatch_naming_the_field(built, field, value):
    config, _ = built
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    expected = {"checkpoint_sha256": manifest.vggt.checkpoint_sha256, "reference_frame": "last", "dtype": "float32",
                "image_mode": "pad", field: value}
    name = field if field == "image_mode" else f"vggt.{field}"
    with pytest.raises(SchemaError, match=rf"field '{name}'.*{value}") as error:
        check_vggt_tags(manifest, expected, where="train.yaml")
    assert error.value.field == name and error.value.where == "train.yaml"
    if field != "image_mode":
        with pytest.raises(SchemaError, match=name):
            check_vggt_tags(manifest, VggtTags(**{k: v for k, v in expected.items() if k != "image_mode"}))


def test_tag_check_refuses_a_build_without_features(built):
    config, _ = built
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    import dataclasses
    with pytest.raises(SchemaError, match="field 'vggt'.*without features"):
        check_vggt_tags(dataclasses.replace(manifest, vggt=None), manifest.vggt)
    with pytest.raises(SchemaError, match="unknown key"):
        check_vggt_tags(manifest, {"reference": "last"})


def test_rerun_skips_the_work(built):
    config, _ = built
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(config.output).glob("shard-*.tar")}
    summary = build(config)
    assert summary["shards_skipped_already_done"] == 2
    assert (summary["vggt_shards_computed"], summary["vggt_shards_skipped_already_done"]) == (0, 2)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(config.output).glob("shard-*.tar")} == before


def test_changed_checkpoint_at_the_same_path_recomputes_features(tmp_path, episodes_dir, tokenizer_dir):
    config = vggt_config(tmp_path, episodes_dir, tokenizer_dir, names=("ep_c",))
    build(config)
    first = stored_features(config.output)
    make_checkpoint(Path(config.vggt_model), seed=2)  # same path, other weights: same config hash
    summary = build(config)
    assert summary["shards_skipped_already_done"] == 1 and summary["vggt_shards_computed"] == 1
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    assert manifest.vggt.checkpoint_sha256 == hashlib.sha256(Path(config.vggt_model).read_bytes()).hexdigest()
    second = stored_features(config.output)
    assert first.keys() == second.keys() and all(np.abs(first[k] - second[k]).max() > 1e-3 for k in first)


def test_stage_refuses_a_checkpoint_other_than_the_hashed_one(tmp_path):
    path = make_checkpoint(tmp_path / "tiny.safetensors", seed=1)
    config = BuildConfig(vggt_model=str(path), vggt_config="tiny", output=str(tmp_path))
    with pytest.raises(SchemaError, match="sha256"):
        FeatureStage(config, "f" * 64).load()


@pytest.mark.parametrize("image_mode", ["pad", "crop"])
def test_stage_input_equals_the_trainers_images_vggt(episodes_dir, image_mode):
    from prep.frames import load_compact_frame
    paths = sorted((episodes_dir / "ep_a").glob("step_*_*.png"))[:4]
    frames = [load_compact_frame(str(p), f"f{i}", image_mode) for i, p in enumerate(paths)]
    samples = [[frames[0], frames[0], frames[1]], [frames[2], frames[3], frames[2]]]
    decoded = PixelDecoder()(collate_frames(samples)._asdict())
    inputs = vggt_inputs(samples, torch.device("cpu"))
    assert len(inputs.images) == 4 and inputs.rows == [[0, 0, 1], [2, 3, 2]]
    ours = inputs.per_sample()
    assert len(ours) == 2 and all(torch.equal(a, b) for a, b in zip(ours, decoded["images_vggt"]))


def test_bfloat16_storage_round_trips_through_the_collator():
    features = torch.randn(6, TINY_FEATURE_DIM)
    array = to_storage(features, "bfloat16")
    assert array.dtype == np.uint16 and array.shape == (6, TINY_FEATURE_DIM)
    assert torch.equal(_as_tensor(array), features.to(torch.bfloat16))
    assert to_storage(features, "float16").dtype == np.float16
    assert np.array_equal(to_storage(features, "float32"), features.numpy())


def test_vggt1b_without_gpu_warns_how_slow(caplog):
    config = BuildConfig(vggt_config="vggt1b", vggt_dtype="float32")
    with caplog.at_level(logging.WARNING, logger="prep.vggt_stage"):
        seconds = warn_if_slow(config, has_gpu=False)
    assert seconds is not None and f"≈ {seconds:.0f} s per sample" in caplog.text
    estimate, flops = cpu_seconds_per_sample("float32")
    assert estimate * flops == pytest.approx(FLOP_PER_SAMPLE)
    assert 0.2 < seconds / estimate < 5  # the same measurement, repeated: same order of magnitude
    assert warn_if_slow(config, has_gpu=True) is None
    assert warn_if_slow(config.replace(vggt_config="tiny"), has_gpu=False) is None


@pytest.mark.ray
@pytest.mark.slow
def test_ray_feature_actors_give_byte_identical_shards(built, tmp_path):
    import ray
    from ray import cloudpickle

    config, _ = built
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        ray_config = config.replace(output=str(tmp_path / "ray"), executor="ray")
        summary = build(ray_config)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert summary["vggt_shards_computed"] == 2
    assert shard_files(ray_config.output) == shard_files(config.output)
    shutil.rmtree(ray_config.output)


def test_launch_refuses_features_of_another_reference_frame_or_checkpoint(built, tmp_path):
    from train.launch import check_precomputed_features
    config, _ = built
    manifest_url = f"{config.output}/manifest.json"
    check_precomputed_features(manifest_url, {"reference_frame": "last", "vggt_checkpoint": config.vggt_model})
    with pytest.raises(SchemaError, match="vggt.reference_frame"):
        check_precomputed_features(manifest_url, {"reference_frame": "first"})
    other = make_checkpoint(tmp_path / "other.safetensors", seed=99)
    with pytest.raises(SchemaError, match="vggt.checkpoint_sha256"):
        check_precomputed_features(manifest_url, {"vggt_checkpoint": str(other)})
