"""Shard writer/reader: round trips (synthetic, golden fixture tensors, fsspec), determinism, webdataset
compatibility, and refusal of corrupt or hostile shards with the shard and member named."""
from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import webdataset
import zstandard
from crafting import tar_of
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import SchemaError
from schemas.sample import CompactFrame, EncodedText, frame_key
from schemas.stored import (
    PackedFrame,
    ShardError,
    StoredSample,
    encode_frame,
    encode_sample,
)
from shards_manifest.shard_io import (
    iter_shard,
    iter_shard_stream,
    read_shard,
    sha256_of,
    write_shard,
    write_shard_stream,
)

URL = "mem://test-shard.tar"
COMPRESSOR = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)


def make_frame(key: str, rng: np.random.Generator, h: int = 6, w: int = 5, pad: int = 2) -> CompactFrame:
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return CompactFrame(key, pixels, h + 2 * pad, w, pad, 0)


def make_tokens(rng: np.random.Generator, length: int) -> EncodedText:
    ids = rng.integers(0, 151665, length, dtype=np.int64)
    labels = np.where(np.arange(length) >= length // 2, ids, -100)
    segments = np.where(labels != -100, rng.integers(1, 5, length), 0)
    positions = rng.integers(0, 5000, (3, length), dtype=np.int64)
    return EncodedText(ids, labels, segments, positions)


def make_shard(seed: int = 0, vggt: bool = True) -> tuple[list[CompactFrame], list[StoredSample]]:
    rng = np.random.default_rng(seed)
    frames = [make_frame(f"f-ep_{i}-abc", rng, h=4 + i, w=3 + 2 * i) for i in range(4)]
    samples = []
    for j in range(3):
        keys = tuple(frames[k].key for k in (0, 0, j, j + 1))
        features = rng.standard_normal((4, 2048)).astype(np.float16) if vggt and j == 1 else None
        samples.append(StoredSample(f"ep__step_{j}-0123456789", f"ep/step_{j}.png", "ep", keys, j % 4,
                                    make_tokens(rng, 20 + j), features))
    return frames, samples


def shard_bytes(frames, samples) -> bytes:
    out = io.BytesIO()
    write_shard_stream(out, frames, samples)
    return out.getvalue()


def read_bytes(data: bytes, **kwargs) -> list:
    """The records of a shard given as bytes, read as a stream (how pipes and remote URLs are read) and as a
    local file (tarfile's random-access reader): both readers must agree, errors included."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "shard.tar"
        local.write_bytes(data)
        with open(local, "rb") as on_disk:
            for source in (io.BytesIO(data), on_disk):
                try:
                    results.append(list(iter_shard_stream(source, URL, **kwargs)))
                except ShardError as e:
                    results.append(e)
    streamed, random_access = results
    if isinstance(streamed, ShardError) or isinstance(random_access, ShardError):
        assert str(streamed) == str(random_access), (streamed, random_access)
        raise streamed
    assert [(type(r), r.key) for r in streamed] == [(type(r), r.key) for r in random_access]
    return streamed




def members_of(frames, samples) -> list[tuple[str, bytes]]:
    members = [m for f in frames for m in encode_frame(f, COMPRESSOR)]
    return members + [m for s in samples for m in encode_sample(s, COMPRESSOR)]


def assert_same_frame(a: CompactFrame, b: CompactFrame) -> None:
    assert a.key == b.key and a.geometry == b.geometry
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert b.pixels.dtype == np.uint8


def assert_same_sample(a: StoredSample, b: StoredSample) -> None:
    assert (a.key, a.sample_id, a.episode, a.frame_keys, a.action_label) == \
        (b.key, b.sample_id, b.episode, b.frame_keys, b.action_label)
    for name in ("input_ids", "labels", "segment_ids", "position_ids"):
        got = getattr(b.tokens, name)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(getattr(a.tokens, name), got)
    if a.vggt_features is None:
        assert b.vggt_features is None
    else:
        assert b.vggt_features.dtype == a.vggt_features.dtype
        assert b.vggt_features.tobytes() == a.vggt_features.tobytes()


def expect_error(data: bytes, member: str, problem: str, **kwargs) -> ShardError:
    with pytest.raises(ShardError) as info:
        read_bytes(data, **kwargs)
    message = str(info.value)
    assert URL in message and member in message and problem in message, message
    assert isinstance(info.value, SchemaError) and info.value.member.startswith(member)
    return info.value


# ---------------------------------------------------------------- round trips and format
def test_round_trip_local_file(tmp_path: Path) -> None:
    frames, samples = make_shard()
    path = tmp_path / "out" / "shard-000000.tar"
    info = write_shard(str(path), frames, samples)
    data = path.read_bytes()
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest() == sha256_of(str(path))
    assert (info.frames, info.samples, info.tokens) == (4, 3, 20 + 21 + 22)
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-000000.tar"]  # no temporary left behind
    contents = read_shard(str(path))
    assert list(contents.frames) == [f.key for f in frames]
    for frame in frames:
        assert_same_frame(frame, contents.frames[frame.key])
    assert len(contents.samples) == len(samples)
    for want, got in zip(samples, contents.samples):
        assert_same_sample(want, got)


def test_member_layout_and_deterministic_headers() -> None:
    frames, samples = make_shard()
    data = shard_bytes(frames, samples)
    assert data == shard_bytes(*make_shard())  # same input -> byte-identical shard
    assert len(data) % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
        names = [i.name for i in infos]
        assert all((i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) == (0, 0, 0, "", "", 0o644, b"0")
                   for i in infos)
        assert tar.extractfile(f"{frames[2].key}.frame.json").read() == \
            b'{"canvas_h":10,"canvas_w":7,"h":6,"left":0,"top":2,"w":7}'
        rgb = zstandard.ZstdDecompressor().decompress(tar.extractfile(f"{frames[2].key}.rgb.zst").read())
        filtered = np.frombuffer(rgb, np.uint8).reshape(frames[2].pixels.shape)
        assert np.array_equal(np.cumsum(filtered, axis=1, dtype=np.uint8), frames[2].pixels)  # left-delta filter
        tokens = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(
            tar.extractfile(f"{samples[1].key}.tokens.npy.zst").read())))
    t = samples[1].tokens
    assert tokens.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(tokens, np.vstack([t.input_ids, t.labels, t.segment_ids, t.position_ids]))
    expected = [f"{f.key}.{ext}" for f in frames for ext in ("frame.json", "rgb.zst")]
    for s in samples:
        expected += [f"{s.key}.sample.json", f"{s.key}.tokens.npy.zst"]
        expected += [f"{s.key}.vggt.npy.zst"] if s.vggt_features is not None else []
    assert names == expected


def test_webdataset_reads_and_groups_members(tmp_path: Path) -> None:
    frames, samples = make_shard()
    path = tmp_path / "shard-000000.tar"
    write_shard(str(path), frames, samples)
    groups = list(webdataset.WebDataset(str(path), shardshuffle=False))
    assert [g["__key__"] for g in groups] == [f.key for f in frames] + [s.key for s in samples]
    assert all(set(g) - {"__key__", "__url__", "__local_path__"} == {"frame.json", "rgb.zst"} for g in groups[:4])
    assert [sorted(set(g) & {"sample.json", "tokens.npy.zst", "vggt.npy.zst"}) for g in groups[4:]] == \
        [["sample.json", "tokens.npy.zst"], ["sample.json", "tokens.npy.zst", "vggt.npy.zst"],
         ["sample.json", "tokens.npy.zst"]]
    filtered = np.frombuffer(zstandard.ZstdDecompressor().decompress(groups[1]["rgb.zst"]), np.uint8)
    assert np.array_equal(np.cumsum(filtered.reshape(frames[1].pixels.shape), axis=1, dtype=np.uint8), frames[1].pixels)


@pytest.mark.parametrize("prefix", ["memory://bucket/run", "file://{tmp}/run"])
def test_fsspec_round_trip(tmp_path: Path, prefix: str) -> None:
    frames, samples = make_shard(seed=3)
    url = prefix.format(tmp=tmp_path) + "/shard-000001.tar"
    info = write_shard(url, frames, samples)
    assert sha256_of(url) == info.sha256 == hashlib.sha256(shard_bytes(frames, samples)).hexdigest()
    records = list(iter_shard(url, lazy_frames=True))
    assert all(isinstance(r, PackedFrame) for r in records[:4])
    for frame, packed in zip(frames, records[:4]):
        assert_same_frame(frame, packed.unpack())
    for want, got in zip(samples, records[4:]):
        assert_same_sample(want, got)


def test_golden_fixture_tensors_round_trip(fixtures_dir: Path) -> None:
    """Real-size tokens (L≈5k) and 644×644 canvases from the original's golden samples survive unchanged."""
    golden = np.load(fixtures_dir / "samples" / "ep_a__step_12_STOP.npz")
    canvases = golden["images_vggt_u8"][:2].transpose(0, 2, 3, 1)  # (N, 644, 644, 3)
    frames = [CompactFrame(f"f-img{i}", np.ascontiguousarray(c), 644, 644, 0, 0) for i, c in enumerate(canvases)]
    tokens = EncodedText(golden["input_ids"], golden["labels"], golden["segment_ids"], golden["position_ids"][:, 0])
    sample = StoredSample("ep_a__step_12_STOP-0", str(golden["id"]), "ep_a", ("f-img0", "f-img1", "f-img1"),
                          int(golden["action_label"]), tokens)
    records = read_bytes(shard_bytes(frames, [sample]))
    for i, frame in enumerate(records[:2]):
        chw = np.ascontiguousarray(frame.pixels.transpose(2, 0, 1))
        assert hashlib.sha256(chw.tobytes()).hexdigest() == golden["images_vggt_u8_sha256_per_image"][i]
    got = records[2]
    np.testing.assert_array_equal(got.tokens.input_ids, golden["input_ids"])
    np.testing.assert_array_equal(got.tokens.labels, golden["labels"])
    np.testing.assert_array_equal(got.tokens.segment_ids, golden["segment_ids"])
    np.testing.assert_array_equal(got.tokens.position_ids, golden["position_ids"][:, 0])
    assert got.action_label == 0 and got.sample_id == "ep_a/step_12_STOP.png"


def test_golden_samples_pass_token_validation(fixtures_dir: Path) -> None:
    from schemas.stored import token_problem, token_rows
    paths = sorted((fixtures_dir / "samples").glob("ep_*.npz"))
    assert len(paths) == 15
    for path in paths:
        g = np.load(path)
        rows = token_rows(EncodedText(g["input_ids"], g["labels"], g["segment_ids"], g["position_ids"][:, 0]))
        assert token_problem(rows) is None, path.name


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), top=st.integers(0, 3), left=st.integers(0, 3),
       length=st.integers(1, 40), seed=st.integers(0, 2**32 - 1), level=st.integers(1, 19))
def test_codec_round_trip_property(h: int, w: int, top: int, left: int, length: int, seed: int, level: int) -> None:
    rng = np.random.default_rng(seed)
    frame = CompactFrame("f-x", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), h + top + 1, w + left, top, left)
    tokens = make_tokens(rng, length)
    tokens.labels[-1] = tokens.input_ids[-1]  # at least one target even for length 1
    tokens.segment_ids[-1] = 4
    sample = StoredSample("s", "ep/s.png", "ep", ("f-x",), int(rng.integers(0, 4)), tokens)
    out = io.BytesIO()
    write_shard_stream(out, [frame], [sample], zstd_level=level)
    got_frame, got_sample = read_bytes(out.getvalue())
    assert_same_frame(frame, got_frame)
    assert_same_sample(sample, got_sample)


# ---------------------------------------------------------------- corrupt and hostile shards
def member_span(data: bytes, name: str) -> tuple[int, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


def test_truncated_inside_member_names_that_member() -> None:
    frames, samples = make_shard()
    data = shard_bytes(frames, samples)
    name = f"{samples[1].key}.tokens.npy.zst"
    start, size = member_span(data, name)
    expect_error(data[: start + size // 2], name, "truncated")


def test_truncated_at_member_boundary_is_detected() -> None:
    frames, samples = make_shard()
    data = shard_bytes(frames, samples)
    name = f"{samples[0].key}.tokens.npy.zst"
    start, size = member_span(data, name)
    end = start + -(-size // 512) * 512  # tarfile alone would accept this as a shorter, valid archive
    expect_error(data[:end], f"(header after {name})", "end of data")
    expect_error(data[: end + 100], f"(header after {name})", "end of data")
    expect_error(b"", "(header after (start of archive))", "end of data")


@pytest.mark.parametrize("member", ["f-ep_1-abc.rgb.zst", "ep__step_2-0123456789.tokens.npy.zst",
                                    "ep__step_1-0123456789.vggt.npy.zst"])
def test_flipped_byte_inside_zstd_member(member: str) -> None:
    data = bytearray(shard_bytes(*make_shard()))
    start, size = member_span(bytes(data), member)
    data[start + size // 2] ^= 0x10
    expect_error(bytes(data), member, "corrupt data")


def test_flipped_byte_in_lazy_frame_raises_on_unpack() -> None:
    data = bytearray(shard_bytes(*make_shard()))
    start, size = member_span(bytes(data), "f-ep_3-abc.rgb.zst")
    data[start + size - 2] ^= 0x01  # inside the content checksum
    records = read_bytes(bytes(data), lazy_frames=True)
    records[0].unpack()
    with pytest.raises(ShardError, match=r"mem://test-shard\.tar: member f-ep_3-abc\.rgb\.zst: .*checksum"):
        records[3].unpack()


@pytest.mark.parametrize("name", ["../evil.frame.json", "/tmp/evil.frame.json", "a/b.frame.json", "..",
                                  "bad key.frame.json"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str) -> None:
    data = tar_of([(name, b"{}")])
    expect_error(data, name, "a member name <key>.<ext>")
    assert list(tmp_path.iterdir()) == []  # the reader never writes


def test_unknown_extension_is_refused() -> None:
    frames, samples = make_shard()
    members = members_of(frames, samples)
    members.insert(2, ("f-ep_0-abc.txt", b"hello"))
    expect_error(tar_of(members), "f-ep_0-abc.txt", "an extension in")
    expect_error(tar_of([("noext", b"")]), "noext", "an extension in")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE])
def test_links_devices_and_directories_are_refused(kind: bytes) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("f-x.frame.json")
        info.type, info.linkname = kind, "/etc/passwd"
        tar.addfile(info)
    expect_error(out.getvalue(), "f-x.frame.json", "a regular file member")


def test_pax_header_is_refused_before_its_data_is_read() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f-x.frame.json")
        info.pax_headers = {"comment": "x" * 100}
        tar.addfile(info, io.BytesIO(b""))
    expect_error(out.getvalue(), "././@PaxHeader", "tar member type b'x'")


@pytest.mark.parametrize(("name", "size", "problem"), [
    ("f-x.rgb.zst", 7 << 30, "at most 1073741824 bytes"),  # absurd: 7 GiB declared, 1 kB present
    ("f-x.frame.json", 10 << 20, "at most 65536 bytes for .frame.json"),
])
def test_absurd_declared_member_size_is_refused_before_reading(name: str, size: int, problem: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    data = info.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)
    expect_error(data, name, problem)


def bomb_members(declared: int | None) -> list[tuple[str, bytes]]:
    """A 4×4 frame whose rgb member decompresses to 64 MiB (optionally lying about it in the header)."""
    bomb = bytearray(COMPRESSOR.compress(bytes(64 << 20)))
    assert len(bomb) < 4096 and bomb[4] == 0x84  # 4-byte content-size field at bytes 6..9
    if declared is not None:
        bomb[6:10] = declared.to_bytes(4, "little")
    header = b'{"canvas_h":4,"canvas_w":4,"h":4,"left":0,"top":0,"w":4}'
    return [("f-x.frame.json", header), ("f-x.rgb.zst", bytes(bomb))]


def test_zstd_bomb_is_refused_from_its_declared_size() -> None:
    expect_error(tar_of(bomb_members(None)), "f-x.rgb.zst", "declaring 67108864 bytes (refused before decompressing)")


def test_zstd_bomb_lying_about_its_size_stops_at_the_declared_size() -> None:
    expect_error(tar_of(bomb_members(48)), "f-x.rgb.zst", "Destination buffer is too small")


def test_tokens_bomb_is_refused() -> None:
    frames, samples = make_shard(vggt=False)
    members = members_of(frames[:1], [])
    header = b'{"action_label":1,"episode":"e","frame_keys":["f-ep_0-abc"],"length":10,"sample_id":"e/s"}'
    members += [("s.sample.json", header), ("s.tokens.npy.zst", COMPRESSOR.compress(bytes(32 << 20)))]
    expect_error(tar_of(members), "s.tokens.npy.zst", "at most 1264 decompressed bytes")


def test_frame_size_disagreeing_with_geometry_is_refused() -> None:
    header = b'{"canvas_h":4,"canvas_w":4,"h":4,"left":0,"top":0,"w":4}'
    members = [("f-x.frame.json", header), ("f-x.rgb.zst", COMPRESSOR.compress(bytes(47)))]
    expect_error(tar_of(members), "f-x.rgb.zst", "expected 48 decompressed bytes")


def test_frame_reference_missing_from_shard() -> None:
    frames, samples = make_shard()
    members = [m for m in members_of(frames, samples) if not m[0].startswith("f-ep_3-abc.")]
    expect_error(tar_of(members), "ep__step_2-0123456789.sample.json", "missing frames ['f-ep_3-abc']")


@pytest.mark.parametrize(("edit", "member", "problem"), [
    ("drop:f-ep_0-abc.rgb.zst", "f-ep_0-abc.frame.json", "member f-ep_0-abc.rgb.zst next"),
    ("drop:f-ep_0-abc.frame.json", "f-ep_0-abc.rgb.zst", "this member at the start of a record"),
    ("drop:ep__step_2-0123456789.tokens.npy.zst", "ep__step_2-0123456789.sample.json", "tokens.npy.zst next"),
    ("frame-last", "f-late.frame.json", "all frames before the first sample"),
    ("duplicate", "f-ep_1-abc.frame.json", "each key once per shard"),
    ("swap-vggt", "ep__step_1-0123456789.vggt.npy.zst", "members in the order"),
])
def test_member_order_and_completeness(edit: str, member: str, problem: str) -> None:
    frames, samples = make_shard()
    members = members_of(frames, samples)
    if edit.startswith("drop:"):
        members = [m for m in members if m[0] != edit[5:]]
    elif edit == "frame-last":
        members += members_of([make_frame("f-late", np.random.default_rng(1))], [])
    elif edit == "duplicate":
        members = members[:4] + members[2:]
    else:
        i = [n for n, _ in members].index(member)
        members[i - 1], members[i] = members[i], members[i - 1]
    expect_error(tar_of(members), member, problem)


@pytest.mark.parametrize(("member_ext", "payload", "problem"), [
    ("sample.json", b'{"sample_id": "x"', "invalid JSON"),
    ("sample.json", b'{"sample_id":"e/s","episode":"e","frame_keys":[],"action_label":1,"length":3}',
     "a valid 'frame_keys'"),
    ("sample.json", b'{"sample_id":"e/s","episode":"e","frame_keys":["f-ep_0-abc"],"action_label":7,"length":3}',
     "a valid 'action_label'"),
    ("sample.json", b'{"sample_id":"e/s","episode":"e","frame_keys":["f"],"action_label":1,"length":3,"x":1}',
     "exactly the keys"),
    ("tokens.npy.zst", "labels", "labels equal to input_ids or -100"),
    ("tokens.npy.zst", "shape", "int32 tokens of shape (6, 20)"),
    ("tokens.npy.zst", "float", "a 2-d C-order .npy 1.0 array"),
])
def test_invalid_sample_members(member_ext: str, payload, problem: str) -> None:
    frames, samples = make_shard(vggt=False)
    members = members_of(frames, samples[:1])
    rows = np.vstack([samples[0].tokens.input_ids, samples[0].tokens.labels, samples[0].tokens.segment_ids,
                      samples[0].tokens.position_ids]).astype("<i4")
    if payload == "labels":
        rows[1, -1] = rows[0, -1] + 1
    bad = {"labels": rows, "shape": rows[:, :5], "float": rows.astype("<f4")}
    if isinstance(payload, str):
        buffer = io.BytesIO()
        np.save(buffer, bad[payload])
        payload = COMPRESSOR.compress(buffer.getvalue())
    name = f"{samples[0].key}.{member_ext}"
    members = [(n, payload if n == name else d) for n, d in members]
    expect_error(tar_of(members), name, problem)


def test_empty_shard_yields_no_records_and_garbage_is_refused() -> None:
    assert read_bytes(tar_of([])) == []
    expect_error(b"this is not a tar file" * 40, "(header after (start of archive))", "a valid tar header")


def test_writer_refuses_inconsistent_input() -> None:
    frames, samples = make_shard()
    with pytest.raises(SchemaError, match="missing frames"):
        shard_bytes(frames[:2], samples)
    with pytest.raises(SchemaError, match="each frame key once"):
        shard_bytes(frames + frames[:1], samples)
    bad = StoredSample("k", "e/s", "e", (frames[0].key,), 5, samples[0].tokens)
    with pytest.raises(SchemaError, match="action_label"):
        shard_bytes(frames, [bad])
    bad_labels = make_tokens(np.random.default_rng(0), 8)
    bad_labels.labels[-1] += 1
    with pytest.raises(SchemaError, match="labels equal to input_ids"):
        shard_bytes(frames, [StoredSample("k", "e/s", "e", (frames[0].key,), 1, bad_labels)])


def test_keys_of_distinct_ids_never_collide():
    """`/` is shown as `__` in the readable part; the digest is over the id itself."""
    assert frame_key("x/a.png") != frame_key("x__a.png")
    assert frame_key("x/a.png").startswith("f-x__a_png-")
