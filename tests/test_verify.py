"""`python -m shards_manifest verify`: a good build of the fixture episodes passes quick and deep; each way of
corrupting it gives its specific one-line report (shard, member, expected/found) and a non-zero exit."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from prep.text import IMAGE_PAD_ID
from schemas.manifest import read_manifest, write_manifest
from schemas.sample import CompactFrame, EncodedText
from schemas.stored import StoredSample
from shards_manifest.__main__ import main
from shards_manifest.deep_verify import image_token_problem, sample_problems
from shards_manifest.shard_io import read_shard, write_shard
from shards_manifest.verify import quick_verify, verify_build

REPO = Path(__file__).resolve().parents[1]
SHARD0, SHARD1 = "shard-000000.tar", "shard-000001.tar"  # ep_a + ep_b (14 samples), ep_c (1 sample)


@pytest.fixture
def run(good_build, tmp_path, capsys):
    """A fresh copy of the good build, and `verify(deep) -> (exit code, output lines)` on it (in-process main)."""
    path = tmp_path / "build"
    shutil.copytree(good_build, path)

    def verify(deep: bool = True, *extra: str) -> tuple[int, list[str]]:
        args = ["verify", str(path), "--no-progress", "--workers", "1"] + (["--deep"] if deep else []) + list(extra)
        capsys.readouterr()
        code = main(args)
        return code, capsys.readouterr().out.splitlines()
    verify.path = path  # type: ignore[attr-defined]
    return verify


def problems_of(lines: list[str]) -> list[str]:
    assert lines[-1].startswith(("OK", "FAILED")), lines
    return lines[:-1]


def edit_manifest(path: Path, shard: str | None = None, **changes) -> None:
    """Change one shard record (or top-level fields) and recompute totals so only the intended fault remains."""
    manifest = read_manifest(str(path / "manifest.json"))
    if shard is not None:
        shards = tuple(dataclasses.replace(s, **changes) if s.name == shard else s for s in manifest.shards)
        sums = {k: sum(getattr(s, k) for s in shards) for k in ("episodes", "samples", "frames", "bytes",
                                                                  "text_tokens", "visual_tokens")}
        manifest = dataclasses.replace(manifest, shards=shards, totals=dataclasses.replace(manifest.totals, **sums))
    else:
        manifest = dataclasses.replace(manifest, **changes)
    write_manifest(str(path / "manifest.json"), manifest)


def record_file(path: Path, shard: str) -> None:
    """Make the manifest's size and sha256 of `shard` match the file as it is now (a consistent but bad build)."""
    data = (path / shard).read_bytes()
    edit_manifest(path, shard, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def rewrite_shard(path: Path, shard: str, frames: list[CompactFrame], samples: list[StoredSample]) -> None:
    """Write `shard` with shard_io's writer and record its true counts in the manifest."""
    info = write_shard(str(path / shard), frames, samples)
    pads = sum(int(np.count_nonzero(s.tokens.input_ids == IMAGE_PAD_ID)) for s in samples)
    edit_manifest(path, shard, bytes=info.bytes, sha256=info.sha256, samples=info.samples, frames=info.frames,
                  episodes=len({s.episode for s in samples}), visual_tokens=pads, text_tokens=info.tokens - pads)


def member_span(data: bytes, suffix: str) -> tuple[str, int, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = next(i for i in tar.getmembers() if i.name.endswith(suffix))
        return info.name, info.offset_data, info.size


# ---------------------------------------------------------------- the good build
def test_good_build_passes_quick_and_deep(run, good_build):
    manifest = read_manifest(str(good_build / "manifest.json"))
    for deep in (False, True):
        code, lines = run(deep)
        assert code == 0 and lines[0].startswith(f"OK ({'deep' if deep else 'quick'}): 2 shards, 15 samples"), lines
    report = verify_build(str(good_build / "manifest.json"), deep=True, workers=1)
    assert report.ok and report.num_samples == manifest.totals.samples == 15
    assert report.num_bytes == manifest.totals.bytes
    assert quick_verify(str(good_build), manifest) == []


def test_golden_samples_pass_the_sample_checks(fixtures_dir):
    """Original tokens/positions (golden) agree with 644×644 canvases; a 588×644 canvas would need 483 tokens."""
    golden = np.load(fixtures_dir / "samples" / "ep_a__step_8_MOVE_FORWARD.npz")
    tokens = EncodedText(golden["input_ids"], golden["labels"], golden["segment_ids"], golden["position_ids"][:, 0])
    sample = StoredSample("ep_a__step_8_MOVE_FORWARD_png-0000000000", str(golden["id"]), "ep_a",
                          tuple(f"f{i}" for i in range(9)), 1, tokens)
    square = [(490, 644, 644, 644, 77, 0)] * 9
    problems = sample_problems(sample, square, "mem://s.tar", None)
    assert len(problems) == 1 and "the key derived from sample_id" in problems[0]  # only the made-up key is wrong
    assert image_token_problem(sample, square[:8] + [(490, 644, 588, 644, 49, 0)]) == (
        "483 <|image_pad|> tokens for image 9 of 9 (frame f8, canvas 588×644, Qwen grid 1×42×46)", "529")
    assert image_token_problem(sample, square[:8]) == ("8 <|image_pad|> runs (one per frame_keys entry)", "9")


# ---------------------------------------------------------------- corruptions
def test_truncated_tar(run):
    data = (run.path / SHARD0).read_bytes()
    size = len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the member cut in two
        cut = next(i.name for i in tar.getmembers() if i.offset_data <= size // 2 < i.offset_data + i.size)
    (run.path / SHARD0).write_bytes(data[: size // 2])
    code, lines = run(deep=True)
    problems = problems_of(lines)
    assert code == 1 and len(problems) == 2, problems
    assert problems[0] == (f"shard {run.path}/{SHARD0}: member {cut}: expected a complete tar archive, found "
                           "unexpected end of data (truncated or corrupt shard)")
    assert problems[1] == f"shard {run.path}/{SHARD0}: expected {size} bytes (manifest), found {size // 2}"
    code, lines = run(deep=False)
    assert code == 1 and problems_of(lines) == [problems[1]]


@pytest.mark.parametrize("suffix", [".rgb.zst", ".tokens.npy.zst"])
def test_flipped_byte_in_zstd_member(run, suffix):
    data = bytearray((run.path / SHARD0).read_bytes())
    old_sha = hashlib.sha256(data).hexdigest()
    name, start, size = member_span(bytes(data), suffix)
    data[start + size // 2] ^= 0x10
    (run.path / SHARD0).write_bytes(bytes(data))
    new_sha = hashlib.sha256(data).hexdigest()
    sha_problem = f"shard {run.path}/{SHARD0}: expected sha256 {old_sha} (manifest), found {new_sha}"
    code, lines = run(deep=False)  # quick: caught by the hash
    assert code == 1 and problems_of(lines) == [sha_problem]
    code, lines = run(deep=True)  # deep: caught by decoding too
    member = f"shard {run.path}/{SHARD0}: member {name}: expected a valid zstd frame of "
    assert code == 1 and [p.startswith(member) for p in problems_of(lines)] == [True, False]
    assert problems_of(lines)[1] == sha_problem
    record_file(run.path, SHARD0)  # the manifest agrees with the corrupt file: only decoding can tell
    code, lines = run(deep=True)
    assert code == 1 and len(problems_of(lines)) == 1 and problems_of(lines)[0].startswith(member)
    assert "corrupt data" in problems_of(lines)[0]
    assert run(deep=False)[0] == 0


def test_missing_shard(run):
    size = (run.path / SHARD1).stat().st_size
    (run.path / SHARD1).unlink()
    expected = [f"shard {run.path}/{SHARD1}: missing (the manifest lists it with {size} bytes)"]
    for deep in (False, True):
        code, lines = run(deep)
        assert code == 1 and problems_of(lines) == expected


def test_extra_unknown_shard(run):
    shutil.copy(run.path / SHARD1, run.path / "shard-000002.tar")
    shutil.copy(run.path / SHARD1, run.path / "other.tar")
    expected = [f"shard {run.path}/other.tar: not listed in the manifest (unknown shard beside the build)",
                f"shard {run.path}/shard-000002.tar: not listed in the manifest (unknown shard beside the build)"]
    for deep in (False, True):
        code, lines = run(deep)
        assert code == 1 and problems_of(lines) == expected


def test_manifest_sample_count_disagrees_with_shard(run):
    edit_manifest(run.path, SHARD1, samples=2)  # totals follow: only the shard's contents can tell
    assert run(deep=False)[0] == 0  # quick trusts the counts; it checks files
    code, lines = run(deep=True)
    assert code == 1 and problems_of(lines) == [
        f"shard {run.path}/{SHARD1}: manifest records 2 samples, the shard holds 1"]


def test_manifest_totals_disagree_with_shards(run):
    manifest = read_manifest(str(run.path / "manifest.json"))
    write_manifest(str(run.path / "manifest.json"), dataclasses.replace(
        manifest, totals=dataclasses.replace(manifest.totals, samples=16, visual_tokens=1)))
    code, lines = run(deep=False)
    where = f"manifest {run.path}/manifest.json: "
    assert code == 1 and problems_of(lines) == [where + "totals.samples is 16 but the shards sum to 15",
                                                where + "totals.visual_tokens is 1 but the shards sum to 71415"]


def test_schema_version_newer_than_reader(run):
    text = (run.path / "manifest.json").read_text().replace('"schema_version": 1', '"schema_version": 2')
    (run.path / "manifest.json").write_text(text)
    code, lines = run(deep=True)
    assert code == 1 and problems_of(lines) == [
        f"manifest {run.path}/manifest.json: field 'schema_version': expected a schema version this reader understands "
        "(<= 1); the build is newer than this code, upgrade vln-shards, found 2"]


def test_manifest_not_valid_json(run):
    (run.path / "manifest.json").write_text('{"schema_version": 1, "shards": [')
    code, lines = run(deep=False)
    assert code == 1 and problems_of(lines) == [
        f"manifest {run.path}/manifest.json: field '(document)': expected valid JSON, found "
        "'invalid JSON: Expecting value at line 1 column 34'"]


def drop_one_image_token(sample: StoredSample) -> StoredSample:
    t = sample.tokens
    last_pad = int(np.flatnonzero(t.input_ids == IMAGE_PAD_ID)[-1])
    keep = np.arange(len(t)) != last_pad
    tokens = EncodedText(t.input_ids[keep], t.labels[keep], t.segment_ids[keep], t.position_ids[:, keep])
    return dataclasses.replace(sample, tokens=tokens)


def test_image_tokens_disagree_with_frames(run):
    contents = read_shard(str(run.path / SHARD1))
    bad = drop_one_image_token(contents.samples[0])
    rewrite_shard(run.path, SHARD1, list(contents.frames.values()), [bad])
    assert run(deep=False)[0] == 0
    code, lines = run(deep=True)
    frame = bad.frame_keys[-1]
    assert code == 1 and problems_of(lines) == [
        f"shard {run.path}/{SHARD1}: member {bad.key}.tokens.npy.zst: expected 529 <|image_pad|> tokens for image 9 "
        f"of 9 (frame {frame}, canvas 644×644, Qwen grid 1×46×46), found 528"]


@pytest.mark.parametrize(("canvas", "expected"), [
    ((646, 646), "canvas sides that are multiples of 14 px and at least 28 (a Qwen grid), found canvas 646×646"),
    ((644, 658), "a square canvas (image_mode pad), found canvas 644×658"),
])
def test_frame_geometry_outside_the_image_mode(run, canvas, expected):
    contents = read_shard(str(run.path / SHARD1))
    (key, frame), = contents.frames.items()
    moved = CompactFrame(key, frame.pixels, *canvas, frame.top, frame.left)
    rewrite_shard(run.path, SHARD1, [moved], contents.samples)
    code, lines = run(deep=True)
    assert code == 1 and problems_of(lines) == [f"shard {run.path}/{SHARD1}: member {key}.frame.json: expected {expected}"]


def test_duplicate_sample_keys_across_shards(run):
    first, second = read_shard(str(run.path / SHARD0)), read_shard(str(run.path / SHARD1))
    copied = first.samples[3]
    frames = list(second.frames.values()) + [first.frames[k] for k in dict.fromkeys(copied.frame_keys)]
    rewrite_shard(run.path, SHARD1, frames, second.samples + [copied])
    code, lines = run(deep=True)
    assert code == 1 and problems_of(lines) == [
        f"shard {run.path}/{SHARD1}: duplicate sample key {copied.key!r} across shards: expected each once, "
        f"found it in {SHARD0} too"]


def test_empty_shard(run):
    write_shard(str(run.path / SHARD1), [], [])
    record_file(run.path, SHARD1)  # manifest still says 1 sample
    code, lines = run(deep=True)
    assert code == 1 and problems_of(lines) == [
        f"shard {run.path}/{SHARD1}: empty shard: expected samples (1 in the manifest), found 0 frames and no samples"]
    edit_manifest(run.path, SHARD1, samples=0, frames=0, episodes=0, text_tokens=0, visual_tokens=0)
    listed_empty = f"shard {run.path}/{SHARD1}: empty shard: the manifest lists it with 0 samples"
    code, lines = run(deep=False)
    assert code == 1 and problems_of(lines) == [listed_empty]
    code, lines = run(deep=True)
    assert code == 1 and problems_of(lines)[1:] == [listed_empty]


def test_thread_and_process_executors_give_the_same_report(run):
    data = bytearray((run.path / SHARD0).read_bytes())
    _, start, size = member_span(bytes(data), ".tokens.npy.zst")
    data[start + size // 2] ^= 0x01
    (run.path / SHARD0).write_bytes(bytes(data))
    (run.path / SHARD1).unlink()
    reports = {executor: verify_build(str(run.path), deep=True, workers=2, executor=executor).problems
               for executor in ("thread", "process")}
    assert reports["thread"] == reports["process"] == verify_build(str(run.path), deep=True, workers=1).problems
    assert len(reports["thread"]) == 3


def test_cli_subprocess_exit_code_and_report(run):
    with open(run.path / SHARD0, "r+b") as f:
        f.truncate(20000)
    result = subprocess.run([sys.executable, "-m", "shards_manifest", "verify", str(run.path), "--deep"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"shard {run.path}/{SHARD0}: member ") and "truncated" in lines[0]
    assert lines[-1] == f"FAILED (deep): 2 problems; {run.path}/manifest.json"
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
