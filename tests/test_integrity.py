"""Hostile shards in a build (`..`/absolute member names, zstd bombs, absurd declared sizes) are refused by
`verify --deep` without writing anything or allocating their claimed size; the training loader
(`train.stream.ShardStream`) fed the same corrupt builds raises naming the shard and the member."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard
from crafting import tar_of

from prep.text import IMAGE_PAD_ID
from schemas.errors import SchemaError
from schemas.manifest import read_manifest, write_manifest
from schemas.sample import EncodedText
from schemas.stored import StoredSample, encode_sample
from shards_manifest.shard_io import read_shard, write_shard
from shards_manifest.verify import verify_build
from train.stream import ShardStream, StreamConfig

SHARD0, SHARD1 = "shard-000000.tar", "shard-000001.tar"
COMPRESSOR = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
FRAME_JSON = b'{"canvas_h":28,"canvas_w":28,"h":4,"left":0,"top":0,"w":4}'


@pytest.fixture
def path(good_build, tmp_path) -> Path:
    shutil.copytree(good_build, tmp_path / "build")
    return tmp_path / "build"




def bomb(declared: int | None = None) -> bytes:
    """2 kB of zstd that decompresses to 64 MiB (optionally lying about its size in the frame header)."""
    data = bytearray(COMPRESSOR.compress(bytes(64 << 20)))
    if declared is not None:
        data[6:10] = declared.to_bytes(4, "little")
    return bytes(data)


def sample_members(frame_key: str = "f-x") -> list[tuple[str, bytes]]:
    """A valid sample using `frame_key`, so a loader that keeps frames compressed must unpack that frame."""
    ids = np.array([1, 2, 3, 4])
    tokens = EncodedText(ids, np.array([-100, -100, 3, 4]), np.array([0, 0, 4, 4]), np.tile(np.arange(4), (3, 1)))
    return encode_sample(StoredSample("s", "e/s", "e", (frame_key,), 1, tokens), COMPRESSOR)


def absurd_size_member() -> bytes:
    info = tarfile.TarInfo("f-x.rgb.zst")
    info.size = 7 << 30  # 7 GiB declared, 1 kB present
    return info.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)


def tokens_bomb() -> bytes:
    header = b'{"action_label":1,"episode":"e","frame_keys":["f-x"],"length":10,"sample_id":"e/s"}'
    return tar_of([("f-x.frame.json", FRAME_JSON), ("f-x.rgb.zst", COMPRESSOR.compress(bytes(48))),
                   ("s.sample.json", header), ("s.tokens.npy.zst", COMPRESSOR.compress(bytes(32 << 20)))])


def hostile(kind: str, outside: Path) -> tuple[bytes, str, str]:
    """(shard bytes, member named in the error, problem text)."""
    if kind == "dotdot":
        return tar_of([("../evil.frame.json", FRAME_JSON)]), "../evil.frame.json", "an unsafe or malformed name"
    if kind == "absolute":
        name = f"{outside}/evil.frame.json"
        return tar_of([(name, FRAME_JSON)]), name, "an unsafe or malformed name"
    if kind == "bomb":
        return (tar_of([("f-x.frame.json", FRAME_JSON), ("f-x.rgb.zst", bomb())] + sample_members()), "f-x.rgb.zst",
                "expected 48 decompressed bytes, found a zstd frame declaring 67108864 bytes "
                "(refused before decompressing)")
    if kind == "lying-bomb":
        return (tar_of([("f-x.frame.json", FRAME_JSON), ("f-x.rgb.zst", bomb(declared=48))] + sample_members()),
                "f-x.rgb.zst",
                "Destination buffer is too small")
    if kind == "tokens-bomb":
        return tokens_bomb(), "s.tokens.npy.zst", "expected at most 1264 decompressed bytes"
    assert kind == "absurd-size"
    return absurd_size_member(), "f-x.rgb.zst", "expected at most 1073741824 bytes, found declared size 7516192768"


def install(path: Path, shard: str, data: bytes) -> None:
    """Replace `shard` by `data` and record its size and sha256 in the manifest (counts unchanged)."""
    (path / shard).write_bytes(data)
    manifest = read_manifest(str(path / "manifest.json"))
    shards = tuple(dataclasses.replace(s, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
                   if s.name == shard else s for s in manifest.shards)
    totals = dataclasses.replace(manifest.totals, bytes=sum(s.bytes for s in shards))
    write_manifest(str(path / "manifest.json"), dataclasses.replace(manifest, shards=shards, totals=totals))


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


HOSTILE = ("dotdot", "absolute", "bomb", "lying-bomb", "tokens-bomb", "absurd-size")


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_shard_is_refused_without_writing_or_allocating(path, tmp_path, kind):
    outside = tmp_path / "outside"
    data, member, problem = hostile(kind, outside)
    install(path, SHARD1, data)
    before = tree(tmp_path)
    tracemalloc.start()
    try:
        report = verify_build(str(path), deep=True, workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"shard {path}/{SHARD1}: member {member}: ") and problem in report.problems[0]
    assert peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB while refusing a {kind}"  # the largest good member is 1 MB
    assert tree(tmp_path) == before and not outside.exists() and not (path.parent / "evil.frame.json").exists()


# ---------------------------------------------------------------- the training loader on the same corruptions
def _truncate(path: Path) -> str:
    data = (path / SHARD0).read_bytes()
    cut = len(data) // 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut_member = next(i.name for i in tar.getmembers() if i.offset_data <= cut < i.offset_data + i.size)
    (path / SHARD0).write_bytes(data[:cut])
    return cut_member


def _flip(suffix: str):
    def corrupt(path: Path) -> str:
        data = bytearray((path / SHARD0).read_bytes())
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            info = next(i for i in tar.getmembers() if i.name.endswith(suffix))
        data[info.offset_data + info.size // 2] ^= 0x10
        install(path, SHARD0, bytes(data))
        return info.name
    return corrupt


def _missing(path: Path) -> str:
    (path / SHARD1).unlink()
    return "(after 0 samples)"


def _count(path: Path) -> str:
    manifest = read_manifest(str(path / "manifest.json"))
    shards = tuple(dataclasses.replace(s, samples=2) if s.name == SHARD1 else s for s in manifest.shards)
    totals = dataclasses.replace(manifest.totals, samples=16)
    write_manifest(str(path / "manifest.json"), dataclasses.replace(manifest, shards=shards, totals=totals))
    return "(end of archive)"


def _empty(path: Path) -> str:
    write_shard(str(path / SHARD1), [], [])
    install(path, SHARD1, (path / SHARD1).read_bytes())
    return "(end of archive)"


def _hostile(kind: str):
    def corrupt(path: Path) -> str:
        data, member, _ = hostile(kind, path.parent / "outside")
        install(path, SHARD1, data)
        return member
    return corrupt


SHARD_CORRUPTIONS = {"truncated": _truncate, "flipped-rgb": _flip(".rgb.zst"),
                     "flipped-tokens": _flip(".tokens.npy.zst"), "missing": _missing, "count": _count,
                     "empty": _empty, **{k: _hostile(k) for k in HOSTILE}}


@pytest.mark.parametrize("corruption", sorted(SHARD_CORRUPTIONS))
def test_loader_raises_naming_shard_and_member(path, corruption):
    member = SHARD_CORRUPTIONS[corruption](path)
    shard = SHARD1 if corruption not in ("truncated", "flipped-rgb", "flipped-tokens") else SHARD0
    stream = ShardStream(str(path / "manifest.json"), StreamConfig(), rank=0, world_size=1)
    with pytest.raises(SchemaError) as info:
        list(stream)
    message = str(info.value)
    assert f"shard {path}/{shard}" in message and f"member {member}" in message, message
    assert not verify_build(str(path), deep=True, workers=1).ok  # and verify agrees that the build is bad


@pytest.mark.parametrize(("edit", "field"), [('"schema_version": 2', "schema_version"), ("{", "(document)")])
def test_loader_refuses_unreadable_manifest(path, edit, field):
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"schema_version": 1', edit) if edit != "{" else "{")
    with pytest.raises(SchemaError) as info:
        ShardStream(str(path / "manifest.json"), StreamConfig(), rank=0, world_size=1)
    assert str(info.value).startswith(f"{path}/manifest.json: field {field!r}: expected ")


def test_loader_on_image_tokens_disagreeing_with_frames(path):
    contents = read_shard(str(path / SHARD1))
    sample = contents.samples[0]
    t = sample.tokens
    keep = np.arange(len(t)) != int(np.flatnonzero(t.input_ids == IMAGE_PAD_ID)[-1])
    bad = dataclasses.replace(sample, tokens=EncodedText(t.input_ids[keep], t.labels[keep], t.segment_ids[keep],
                                                         t.position_ids[:, keep]))
    write_shard(str(path / SHARD1), list(contents.frames.values()), [bad])
    install(path, SHARD1, (path / SHARD1).read_bytes())
    with pytest.raises(SchemaError, match=f"{SHARD1}: member {bad.key}.tokens.npy.zst"):
        list(ShardStream(str(path / "manifest.json"), StreamConfig(), rank=0, world_size=1))
