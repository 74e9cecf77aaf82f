"""`prep.build`: counts and rejects, idempotent re-runs, resume after interruption, config guard,
fsspec output, length rejects and the reject budget."""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from prep.build import BuildError, build, parse_args
from prep.ray_executor import check_nodes_see_paths, probe_paths
from prep.sample_data import write_sample_episodes
from schemas.config import TOKENIZER_FILES, BuildConfig, files_hash
from shards_manifest import shard_io
from shards_manifest.verify import quick_verify


@pytest.fixture
def config(episodes_dir, tokenizer_dir, tmp_path) -> BuildConfig:
    return BuildConfig(input=str(episodes_dir), model_path=str(tokenizer_dir), output=str(tmp_path / "out"),
                       episodes_per_shard=2, max_reject_fraction=0.5, progress=False)


def shard_bytes(output: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(output).glob("shard-*.tar"))}


def test_build_fixture_episodes(config, fixtures_dir):
    build(config)
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    # episodes sorted: ep_a, ep_b | ep_c, ep_z_no_milestones  → 2 shards; 12 + 2 + 1 samples
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s.samples for s in manifest.shards] == [14, 1]
    assert manifest.totals.samples == 15 and manifest.totals.episodes == 3
    # unique frames: ep_a 12 images, ep_b steps 0,1,2 (step 3 rejected and not referenced), ep_c 1
    assert [s.frames for s in manifest.shards] == [15, 1]
    assert manifest.totals.visual_tokens == 15 * 9 * 529
    assert manifest.rejects_by_reason == {"empty_landmark_description": 1, "missing_step_json": 1,
                                          "no_milestones_file": 1, "unmatched_file_name": 1}
    assert manifest.episode_flags == {"ambiguous_subinstruction_mapping": 1}
    rejects = [json.loads(line) for line in Path(config.output, "rejects.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rejects} == {"ep_a/step_99_STOP.PNG", "ep_b/step_1_MOVE_FORWARD.png",
                                              "ep_b/step_3_STOP.png", "ep_z_no_milestones"}
    stored = [r.sample_id for s in manifest.shards for r in shard_io.iter_shard(f"{config.output}/{s.name}")
              if hasattr(r, "sample_id")]
    golden = json.loads((fixtures_dir / "samples" / "index.json").read_text())["samples"]
    assert sorted(stored) == sorted(g["id"] for g in golden)
    assert stored[:12] != sorted(stored[:12])  # samples are mixed inside a shard, not in episode order


def test_rerun_is_a_no_op_and_interrupted_build_finishes(config):
    build(config)
    first = shard_bytes(config.output)
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(config.output).glob("shard-*.tar")}
    summary = build(config)
    assert summary["shards_skipped_already_done"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in Path(config.output).glob("shard-*.tar")} == mtimes
    # simulate a crash: one shard and its completion record gone, manifest not yet written
    Path(config.output, "shard-000001.tar").unlink()
    Path(config.output, "_tasks", "shard-000001.tar.json").unlink()
    Path(config.output, "manifest.json").unlink()
    summary = build(config)
    assert summary["shards_skipped_already_done"] == 1
    assert shard_bytes(config.output) == first


def test_corrupted_shard_is_rebuilt(config):
    build(config)
    first = shard_bytes(config.output)
    path = Path(config.output, "shard-000000.tar")
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    summary = build(config)
    assert summary["shards_skipped_already_done"] == 1
    assert shard_bytes(config.output) == first


def test_each_shard_is_hashed_once_per_run(config, monkeypatch):
    """A fresh build hashes the bytes it writes and reads no shard back; a re-run reads each finished shard once
    (to prove it complete). The post-build check trusts those digests; `shards_manifest verify` re-reads."""
    read = []
    real = shard_io.sha256_of
    monkeypatch.setattr(shard_io, "sha256_of", lambda url, *a, **k: read.append(Path(url).name) or real(url, *a, **k))
    build(config)
    assert read == []
    build(config)
    assert sorted(read) == ["shard-000000.tar", "shard-000001.tar"]
    path = Path(config.output, "shard-000001.tar")
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF  # same size: only a hash can tell
    path.write_bytes(bytes(data))
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    assert quick_verify(config.output, manifest, hashes=False) == []
    assert quick_verify(config.output, manifest) == [
        f"shard {config.output}/shard-000001.tar: expected sha256 {manifest.shards[1].sha256} (manifest), "
        f"found {real(str(path))}"]


def test_refuses_other_config_unless_overwrite(config):
    build(config)
    other = config.replace(image_mode="crop", zstd_level=3)
    with pytest.raises(FileExistsError, match="another configuration") as refusal:
        build(other)
    assert "differs in image_mode 'pad' → 'crop'; zstd_level 1 → 3)" in str(refusal.value)
    build(other.replace(overwrite=True))
    assert shard_io.read_manifest(f"{config.output}/manifest.json").image_mode == "crop"


def test_tokenizer_identity_is_its_files_not_its_path(config, tmp_path):
    """A moved tokenizer folder is the same build (shards skipped); changed tokenizer files at the same path are
    another build: refused, and never mixed with shards made by the old tokenizer."""
    moved = tmp_path / "tokenizer"
    shutil.copytree(config.model_path, moved)
    build(config)
    summary = build(config.replace(model_path=str(moved)))
    assert summary["shards_skipped_already_done"] == 2
    settings = json.loads((moved / "tokenizer_config.json").read_text())
    settings["model_max_length"] = 1234  # same vocabulary, different file
    (moved / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(FileExistsError, match="another configuration"):
        build(config.replace(model_path=str(moved)))
    summary = build(config.replace(model_path=str(moved), overwrite=True))
    assert summary["shards_skipped_already_done"] == 0
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    assert manifest.tokenizer_hash == files_hash(str(moved), TOKENIZER_FILES)


def test_memory_filesystem_output_matches_local(config):
    build(config)
    remote = config.replace(output="memory://vln-test/out")
    build(remote)
    import fsspec
    fs = fsspec.filesystem("memory")
    for name, data in shard_bytes(config.output).items():
        assert fs.cat_file(f"/vln-test/out/{name}") == data


def test_too_long_samples_are_rejected_not_truncated(config):
    summary = build(config.replace(max_length=5000, max_reject_fraction=1.0))
    manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
    # golden lengths are 4971..5040: the ones above 5000 are rejected whole
    assert manifest.rejects_by_reason["too_long"] >= 1
    assert summary["samples"] + manifest.rejects_by_reason["too_long"] == 15


def test_reject_budget_fails_without_manifest(config):
    with pytest.raises(BuildError, match="more than max_reject_fraction"):
        build(config.replace(max_reject_fraction=0.01))
    assert not Path(config.output, "manifest.json").exists()
    assert Path(config.output, "rejects.jsonl").exists()


def test_cli_flags_and_config_file(tmp_path, episodes_dir, tokenizer_dir):
    path = tmp_path / "build.toml"
    path.write_text(f'input = "{episodes_dir}"\nmodel_path = "{tokenizer_dir}"\nzstd_level = 5\n')
    config = parse_args(["--config", str(path), "--zstd-level", "7", "--no-progress", "--image-mode", "crop"])
    assert (config.zstd_level, config.progress, config.image_mode) == (7, False, "crop")
    with pytest.raises(SystemExit):
        parse_args(["--image-mode", "sideways"])


@pytest.mark.ray
@pytest.mark.slow
def test_ray_executor_gives_byte_identical_shards(config, tmp_path):
    build(config)
    ray_config = config.replace(output=str(tmp_path / "ray"), executor="ray", num_cpus=2)
    build(ray_config)
    assert shard_bytes(ray_config.output) == shard_bytes(config.output)


def test_probe_names_what_a_node_cannot_see(tmp_path):
    (tmp_path / "marker").write_bytes(b"")
    assert probe_paths({"input": str(tmp_path), "unset": ""}, {"output folder": str(tmp_path / "marker")}) == []
    assert probe_paths({"input": str(tmp_path / "nope")}, {"output folder": str(tmp_path / "gone")}) == [
        f"input {tmp_path / 'nope'} does not exist here",
        f"output folder: cannot see {tmp_path / 'gone'}, a file the build driver just wrote there"]


@pytest.mark.ray
def test_ray_preflight_probes_every_node_and_cleans_up(config, tmp_path):
    import ray

    Path(config.output).mkdir(parents=True)
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        check_nodes_see_paths(ray, config)
        address = ray.nodes()[0]["NodeManagerAddress"]
        missing = tmp_path / "no-tokenizer"
        with pytest.raises(FileNotFoundError) as error:
            check_nodes_see_paths(ray, config.replace(model_path=str(missing)))
    finally:
        ray.shutdown()
    assert f"node {address}: tokenizer folder (--model-path) {missing} does not exist here" in str(error.value)
    assert list(Path(config.output).iterdir()) == []  # the probe's marker is gone, also after a failure


def sample_episodes(output: str) -> Counter:
    """Samples per episode over all shards the manifest lists."""
    manifest = shard_io.read_manifest(f"{output}/manifest.json")
    return Counter(r.episode for s in manifest.shards for r in shard_io.read_shard(f"{output}/{s.name}").samples)


def test_rerun_after_the_input_changed_neither_loses_nor_repeats_episodes(tmp_path, tokenizer_dir):
    episodes = write_sample_episodes(tmp_path / "episodes", num_episodes=4)
    aside = tmp_path / "aside"
    aside.mkdir()
    config = BuildConfig(input=str(episodes), model_path=str(tokenizer_dir), output=str(tmp_path / "out"),
                         episodes_per_shard=1, max_history_images=1, progress=False)
    reference = tmp_path / "reference"
    build(config.replace(output=str(reference)))
    shutil.move(episodes / "episode_001", aside / "episode_001")
    build(config)  # episodes 0, 2, 3 in shards 0-2
    shutil.move(aside / "episode_001", episodes / "episode_001")
    summary = build(config)  # 4 episodes again: shards 1-3 now hold other episodes
    assert summary["shards_skipped_already_done"] == 1
    assert shard_bytes(config.output) == shard_bytes(str(reference))
    shutil.move(episodes / "episode_003", aside / "episode_003")
    summary = build(config)  # one episode fewer: shard-000003 is left over from the last run
    assert summary["shards_skipped_already_done"] == 3
    assert sorted(sample_episodes(config.output)) == ["episode_000", "episode_001", "episode_002"]
    assert not Path(config.output, "shard-000003.tar").exists()
    assert not Path(config.output, "_tasks", "shard-000003.tar.json").exists()


def test_failed_rerun_leaves_no_manifest(config):
    build(config)
    with pytest.raises(BuildError, match="No manifest was written"):
        build(config.replace(max_reject_fraction=0.0))  # the budget is not part of the identity: same build
    assert not Path(config.output, "manifest.json").exists()
    assert build(config)["shards_skipped_already_done"] == 2


def test_damaged_records_and_manifest_do_not_block_a_rerun(config):
    build(config)
    first = shard_bytes(config.output)
    record = Path(config.output, "_tasks", "shard-000001.tar.json")
    record.write_text(record.read_text()[:40])  # a write cut short
    assert build(config)["shards_skipped_already_done"] == 1
    assert shard_bytes(config.output) == first
    Path(config.output, "manifest.json").write_text("{not json")
    with pytest.raises(FileExistsError, match="manifest.json is unreadable"):
        build(config)
    assert build(config.replace(overwrite=True))["shards_skipped_already_done"] == 0
    assert shard_bytes(config.output) == first


def test_annotation_input_equals_episode_input_and_rebuilds_when_an_image_changes(tmp_path, tokenizer_dir):
    from PIL import Image

    from prep.episodes import read_samples
    episodes = write_sample_episodes(tmp_path / "episodes", num_episodes=2)
    config = BuildConfig(input=str(episodes), model_path=str(tokenizer_dir), output=str(tmp_path / "from_episodes"),
                         max_history_images=2, max_reject_fraction=0.5, progress=False)
    build(config)
    samples = read_samples(episodes, 2)[0]
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text("".join(json.dumps({
        "id": s.sample_id, "episode": s.episode, "instruction": s.instruction, "subinstruction": s.subinstruction,
        "2D_description": s.description_2d, "3D_description": s.description_3d, "action": s.action,
        "images": list(s.frame_ids)}) + "\n" for s in samples))
    from_annotations = config.replace(input=str(annotations), image_root=str(episodes),
                                      output=str(tmp_path / "from_annotations"))
    build(from_annotations)
    assert shard_bytes(from_annotations.output) == shard_bytes(config.output)
    image = Path(samples[0].frame_paths[-1])
    Image.new("RGB", (320, 240), (200, 10, 10)).save(image)  # same name, other picture
    assert build(from_annotations)["shards_skipped_already_done"] == 0
