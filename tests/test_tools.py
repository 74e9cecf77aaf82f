"""`dump` against the original's golden tensors for every fixture sample; `show` against the golden sample index
and the README's frame facts; `diff` between builds."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prep.build import build
from schemas.config import BuildConfig
from schemas.manifest import read_manifest, write_manifest
from schemas.stored import StoredSample
from shards_manifest.__main__ import main
from shards_manifest.dump import find_samples, training_tensors
from shards_manifest.inspect import build_summary, diff_builds
from shards_manifest.shard_io import iter_shard
from shards_manifest.verify import verify_build
from train.vggt import VGGTAggregator, tiny_config

GOLDEN_WEIGHTS = (0.5, 1.0, 2.0, 3.0)  # the weights the golden loss_weights were made with (fixtures README)


def make_config(episodes_dir, tokenizer_dir, out: Path, **changes) -> BuildConfig:
    return BuildConfig(input=str(episodes_dir), model_path=str(tokenizer_dir), output=str(out), episodes_per_shard=2,
                       max_reject_fraction=0.5, progress=False).replace(**changes)


@pytest.fixture(scope="module")
def good_build(tmp_path_factory, episodes_dir, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("tools") / "good"
    build(make_config(episodes_dir, tokenizer_dir, out))
    return out


@pytest.fixture(scope="module")
def golden_index(fixtures_dir) -> list[dict]:
    return json.loads((fixtures_dir / "samples" / "index.json").read_text())["samples"]


@pytest.fixture(scope="module")
def found(good_build, golden_index) -> dict:
    manifest = read_manifest(str(good_build / "manifest.json"))
    return find_samples(str(good_build), manifest, [g["id"] for g in golden_index])


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def assert_matches_golden(out: dict, golden) -> None:
    for key in ("input_ids", "labels", "segment_ids"):
        assert out[key].shape == (1, *golden[key].shape) and out[key].dtype == np.int64
        np.testing.assert_array_equal(out[key][0], golden[key], err_msg=key)
    np.testing.assert_array_equal(out["position_ids"], golden["position_ids"])  # both (3, 1, L)
    np.testing.assert_array_equal(out["attention_mask"][0], np.ones(len(golden["input_ids"]), bool))
    assert out["loss_weights"].dtype == np.float32
    np.testing.assert_array_equal(out["loss_weights"][0], golden["loss_weights"])
    np.testing.assert_array_equal(out["action_label"], [golden["action_label"]])
    np.testing.assert_array_equal(out["image_grid_thw"], golden["image_grid_thw"])
    vggt = out["images_vggt"]
    assert vggt.dtype == np.float32 and vggt.shape == golden["images_vggt_u8"].shape
    np.testing.assert_array_equal(np.round(vggt * 255).astype(np.uint8), golden["images_vggt_u8"])
    assert [sha256(image) for image in vggt] == list(golden["images_vggt_f32_sha256_per_image"])
    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == np.float32 and pixel_values.shape == tuple(golden["pixel_values_shape"])
    np.testing.assert_allclose(pixel_values[-2116:], golden["pixel_values_last"], rtol=0, atol=1e-6)
    assert sha256(pixel_values) == str(golden["pixel_values_sha256"])  # in fact bit-exact
    assert "vggt_features" not in out  # this build has no precomputed features


def test_every_fixture_sample_dumps_to_the_golden_tensors(found, golden_index, fixtures_dir):
    assert sorted(found) == sorted(g["id"] for g in golden_index)
    for entry in golden_index:
        with np.load(fixtures_dir / "samples" / f"{entry['sample']}.npz") as z:
            golden = {key: z[key] for key in z.files}
        assert_matches_golden(training_tensors(found[entry["id"]][1], GOLDEN_WEIGHTS), golden)


def test_dump_cli_writes_the_npz_by_sample_id_or_key(good_build, found, fixtures_dir, tmp_path, capsys):
    sample_id = "ep_a/step_8_MOVE_FORWARD.png"
    shard, sample = found[sample_id]
    out = tmp_path / "dump.npz"
    assert main(["dump", str(good_build), sample_id, "--out", str(out), "--weights", "0.5,1,2,3"]) == 0
    assert capsys.readouterr().out.startswith(f"{sample_id} (key {sample['__key__']}, {shard}) → {out}: input_ids (1, ")
    with np.load(out) as z, np.load(fixtures_dir / "samples" / "ep_a__step_8_MOVE_FORWARD.npz") as g:
        assert_matches_golden({k: z[k] for k in z.files}, {k: g[k] for k in g.files})
        assert (str(z["sample_id"]), str(z["key"]), str(z["shard"])) == (sample_id, sample["__key__"], shard)
        np.testing.assert_array_equal(z["loss_weight_values"], GOLDEN_WEIGHTS)
    # by shard key, other weights: all-ones weights give 1.0 on every labelled token, 0 elsewhere
    assert main(["dump", str(good_build / "manifest.json"), sample["__key__"], "--out", str(out),
                 "--weights", "1,1,1,1", "--shard", shard]) == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(z["loss_weights"], (z["labels"] != -100).astype(np.float32))
    assert main(["dump", str(good_build), sample_id, "--out", str(out), "--shard", shard.removesuffix(".tar")]) == 0
    assert main(["dump", str(good_build), sample_id, "--out", str(out), "--shard", "shard-000777"]) == 1
    assert "expected shard names listed in the manifest (like shard-000000.tar), found 'shard-000777.tar'" in \
        capsys.readouterr().err


def test_dump_unknown_sample_fails(good_build, tmp_path, capsys):
    assert main(["dump", str(good_build), "ep_a/step_11_STOP.png", "--out", str(tmp_path / "x.npz")]) == 1
    assert "expected an original sample id (like ep_a/step_8_MOVE_FORWARD.png) or a shard key stored in the 2 " \
           "shards searched, found 'ep_a/step_11_STOP.png'" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
    assert main(["dump", str(good_build), "ep_c/step_0_STOP.png", "--out", str(tmp_path / "x.npz"),
                 "--weights", "1,2"]) == 1


def test_show_matches_golden_index_and_frame_facts(good_build, golden_index):
    manifest = read_manifest(str(good_build / "manifest.json"))
    summary = build_summary(str(good_build), manifest)
    lengths = [g["seq_len"] for g in golden_index]
    labels = [g["num_label_tokens"] for g in golden_index]
    dist = summary["distributions"]
    for key, values in (("sequence_length", lengths), ("label_tokens", labels),
                        ("text_tokens", [n - 9 * 529 for n in lengths])):
        expected = [np.percentile(values, p) for p in (0, 5, 50, 95, 100)] + [np.mean(values)]
        np.testing.assert_allclose(list(dist[key].values()), expected, err_msg=key)
    assert dist["visual_tokens"]["p0"] == dist["visual_tokens"]["p100"] == 9 * 529
    assert dist["images"]["p0"] == dist["images"]["p100"] == 9
    assert summary["scanned"] == {"shards": 2, "samples": 15, "frames": 16}
    assert summary["counts"]["samples"] == 15 and summary["counts"]["shards"] == 2
    assert summary["rejects_by_reason"] == {"empty_landmark_description": 1, "missing_step_json": 1,
                                            "no_milestones_file": 1, "unmatched_file_name": 1}
    assert summary["episode_flags"] == {"ambiguous_subinstruction_mapping": 1}
    # README: 640×480 → 490×644 content (ep_a: 12 frames), 480×640 → 644×490 (ep_b: 3), 333×257 → 504×644 (ep_c: 1)
    raw = (15 * 490 * 644 + 504 * 644) * 3
    storage = summary["storage_scanned_per_sample"]
    assert storage["frame_raw_uint8_bytes"] == pytest.approx(raw / 15)
    assert storage["shard_bytes"] == pytest.approx(manifest.totals.bytes / 15)
    assert 0 < storage["frame_bytes"] < storage["shard_bytes"]


def test_show_cli_text_json_and_manifest_only(good_build, capsys):
    assert main(["show", str(good_build), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "  no_milestones_file          1" in text and "distributions over 15 samples of 2 shards" in text
    assert any(line.split()[:5] == ["sequence", "length", "L", "(tokens)", "4,971.0"] for line in text.splitlines())
    assert main(["show", str(good_build), "--json", "--scan-shards", "0", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "distributions" not in summary and summary["build_config"]["episodes_per_shard"] == 2


def test_diff(good_build, tmp_path, episodes_dir, tokenizer_dir, capsys):
    same = tmp_path / "same"
    shutil.copytree(good_build, same)
    assert main(["diff", str(good_build), str(same)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "identical"
    a = read_manifest(str(good_build / "manifest.json"))
    level = 9 if a.build_config["zstd_level"] != 9 else 5
    other = tmp_path / "other-level"
    build(make_config(episodes_dir, tokenizer_dir, other, zstd_level=level))
    b = read_manifest(str(other / "manifest.json"))
    differences, summary = diff_builds(a, b)
    assert f"config build_config.zstd_level: A {a.build_config['zstd_level']}, B {level}" in differences
    assert f"config build_config_hash: A \"{a.build_config_hash}\", B \"{b.build_config_hash}\"" in differences
    assert f"counts bytes: A {a.totals.bytes}, B {b.totals.bytes}" in differences
    assert not any(line.startswith("counts samples") for line in differences)  # same samples, other compression
    assert summary[-1] == "shards: 0 identical, 2 differ, 0 only in A, 0 only in B"
    assert main(["diff", str(good_build), str(other)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"{len(differences)} differences"
    (same / "manifest.json").write_text("[")
    assert main(["diff", str(good_build), str(same)]) == 2


def test_features_are_verified_against_the_tags_and_dumped(tmp_path, episodes_dir, tokenizer_dir):
    """A build of ep_c with bfloat16 features of a tiny aggregator (~3 s): deep verify passes, the dump carries the
    stored features widened exactly to float32, and features that disagree with the manifest's tags are reported."""
    (tmp_path / "episodes").mkdir()
    (tmp_path / "episodes" / "ep_c").symlink_to(episodes_dir / "ep_c", target_is_directory=True)
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in VGGTAggregator(tiny_config()).state_dict().items()},
              str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "out"
    build(make_config(tmp_path / "episodes", tokenizer_dir, out, vggt_model=str(tmp_path / "tiny.safetensors"),
                      vggt_config="tiny", vggt_dtype="bfloat16"))
    assert verify_build(str(out), deep=True, workers=1).problems == []
    manifest = read_manifest(str(out / "manifest.json"))
    stored, = [r for r in iter_shard(str(out / manifest.shards[0].name)) if isinstance(r, StoredSample)]
    assert stored.vggt_features.dtype == np.uint16  # bfloat16 bits
    dumped = training_tensors(find_samples(str(out), manifest, [stored.sample_id])[stored.sample_id][1])
    widened = (stored.vggt_features.astype(np.uint32) << 16).view(np.float32)  # bfloat16 → float32 by its bits
    np.testing.assert_array_equal(dumped["vggt_features"], widened)
    assert str(dumped["vggt_features_dtype"]) == "bfloat16" and dumped["vggt_features"].shape == (46 * 46, 128)
    storage = build_summary(str(out), manifest)["storage_scanned_per_sample"]
    assert storage["vggt_feature_raw_bytes"] == 46 * 46 * 128 * 2  # reported apart from the frames
    member = f"shard {out}/{manifest.shards[0].name}: member {stored.key}.vggt.npy.zst: expected "
    for tags, problem in ((dataclasses.replace(manifest.vggt, dtype="float16"),
                           "VGGT features (P, C) float16 with P in [2116], found (2116, 128) bfloat16"),
                          (None, "no VGGT features (manifest vggt is null), found a vggt member")):
        write_manifest(str(out / "manifest.json"), dataclasses.replace(manifest, vggt=tags))
        assert verify_build(str(out), deep=True, workers=1).problems == [member + problem]
