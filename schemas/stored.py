"""What a shard stores per frame and per sample, and the byte encoding of each member (schema version 1).

Decoders trust nothing: a zstd member's declared content size is checked against the size the record
implies (frame: h·w·3; tokens: 24·L + npy header) before a byte is decompressed, and decompression
is one-shot into a buffer of that size, so a 2 kB member that expands to 64 MB is refused, not run.
(Over 300 lines: each member's encoder sits next to its bounded decoder, so the two cannot drift apart.)
"""
from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import zstandard

from schemas.errors import SchemaError
from schemas.sample import ACTIONS, CompactFrame, EncodedText

KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,80}")
FRAME_EXTS = ("frame.json", "rgb.zst")  # member order inside one frame
SAMPLE_EXTS = ("sample.json", "tokens.npy.zst", "vggt.npy.zst")  # the last is optional
GEOMETRY_FIELDS = ("h", "w", "canvas_h", "canvas_w", "top", "left")
SAMPLE_FIELDS = ("action_label", "episode", "frame_keys", "length", "sample_id")
MAX_JSON_BYTES = 64 << 10
MAX_CANVAS_SIDE = 4096
MAX_SEQUENCE_LENGTH = 1 << 17  # default reader cap on L (the tokenizer's model_max_length)
MAX_VGGT_BYTES = 64 << 20  # (2116, 2048) float32 is 17 MB
VGGT_FEATURE_DIM = 2048  # VGGT-1B: 2 × 1024; any even width up to MAX_VGGT_FEATURE_DIM is stored (tiny models)
MAX_VGGT_FEATURE_DIM = 4096
VGGT_DTYPES = {"<f2": "float16", "<u2": "bfloat16", "<f4": "float32"}  # bfloat16 is stored as its uint16 bits
IGNORE_INDEX = -100
NUM_SEGMENTS = 4
NPY_HEADER_MAX = 1024


class ShardError(SchemaError):
    """A shard member that cannot be trusted: names the shard, the member and the problem."""

    def __init__(self, url: str, member: str, expected: str, found: object):
        super().__init__(f"shard {url}", member, expected, found)
        self.url, self.member = url, member
        shown = found if isinstance(found, str) else repr(found)
        self.args = (f"shard {url}: member {member}: expected {expected}, found {shown[:300]}",)


class MemberRef(NamedTuple):
    """Where a member lives, for error messages."""

    url: str
    name: str

    def error(self, expected: str, found: object) -> ShardError:
        return ShardError(self.url, self.name, expected, found)


@dataclass(frozen=True, eq=False)
class StoredSample:
    """One sample as a shard stores it: text tensors, references to frames of the same shard, optional VGGT features."""

    key: str
    sample_id: str
    episode: str
    frame_keys: tuple[str, ...]  # oldest first, current last; repeats allowed
    action_label: int
    tokens: EncodedText
    vggt_features: np.ndarray | None = None  # (P, 2048) float16 / float32 / uint16 (bfloat16 bits)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, eq=False)
class PackedFrame:
    """A frame kept compressed (what a loader holds per shard); `unpack()` validates and decodes it."""

    key: str
    geometry: tuple[int, int, int, int, int, int]  # h, w, canvas_h, canvas_w, top, left
    payload: bytes
    ref: MemberRef

    def unpack(self, row_deltas: bool = False) -> CompactFrame:
        """The frame's pixels; with `row_deltas`, left as stored (left-neighbour deltas, read-only): the loader's
        form, decoded on the training device by `train.pixels.undo_row_deltas`."""
        h, w, canvas_h, canvas_w, top, left = self.geometry
        raw = unzstd(self.payload, self.ref, exact=h * w * 3)
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
        if not row_deltas:
            pixels = delta_unfilter(pixels)
            pixels.flags.writeable = False  # frames are shared by several samples
        return CompactFrame(self.key, pixels, canvas_h, canvas_w, top, left, row_deltas)


def unzstd(payload: bytes, ref: MemberRef, *, exact: int | None = None, cap: int | None = None) -> bytes:
    """Decompress one zstd frame whose header declares its size (`exact`, or at most `cap`)."""
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise ref.error("a zstd frame", f"no valid zstd frame header ({e})") from e
    if size < 0:
        raise ref.error("a zstd frame that declares its content size", "no content size in the frame header")
    if (exact is not None and size != exact) or (cap is not None and size > cap):
        wanted = f"{exact} decompressed bytes" if exact is not None else f"at most {cap} decompressed bytes"
        raise ref.error(wanted, f"a zstd frame declaring {size} bytes (refused before decompressing)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise ref.error(f"a valid zstd frame of {size} bytes", f"corrupt data ({e})") from e
    if len(raw) != size:
        raise ref.error(f"{size} decompressed bytes", f"{len(raw)} bytes")
    return raw


def member_caps(max_length: int) -> dict[str, int]:
    """Largest accepted stored (compressed) size per member extension; zstd adds < 1 % to incompressible data."""
    def bound(n: int) -> int:
        return n + (n >> 7) + 4096
    return {"frame.json": MAX_JSON_BYTES, "sample.json": MAX_JSON_BYTES,
            "rgb.zst": bound(MAX_CANVAS_SIDE * MAX_CANVAS_SIDE * 3),
            "tokens.npy.zst": bound(NPY_HEADER_MAX + 24 * max_length), "vggt.npy.zst": bound(MAX_VGGT_BYTES)}


def _json_object(data: bytes, ref: MemberRef, fields: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ref.error("a UTF-8 JSON object", f"invalid JSON ({e})") from e
    if not isinstance(obj, dict) or sorted(obj) != sorted(fields):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ref.error(f"a JSON object with exactly the keys {list(fields)}", found)
    return obj


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def geometry_problem(geometry: tuple[int, ...]) -> str | None:
    """Why (h, w, canvas_h, canvas_w, top, left) is not a valid frame geometry, or None."""
    h, w, canvas_h, canvas_w, top, left = geometry
    ok = (all(type(v) is int for v in geometry) and 1 <= h <= canvas_h <= MAX_CANVAS_SIDE
          and 1 <= w <= canvas_w <= MAX_CANVAS_SIDE and 0 <= top <= canvas_h - h and 0 <= left <= canvas_w - w)
    return None if ok else f"1 <= h <= canvas_h <= {MAX_CANVAS_SIDE} (same for w), content inside the canvas"


def decode_frame_header(data: bytes, ref: MemberRef) -> tuple[int, int, int, int, int, int]:
    obj = _json_object(data, ref, GEOMETRY_FIELDS)
    geometry = tuple(obj[name] for name in GEOMETRY_FIELDS)
    problem = geometry_problem(geometry)
    if problem:
        raise ref.error(problem, obj)
    return geometry  # type: ignore[return-value]


def sample_header_problem(obj: dict, max_length: int) -> str | None:
    """The first invalid field of a sample header (sample_id, episode, frame_keys, action_label, length), or None."""
    keys = obj["frame_keys"]
    checks = {
        "sample_id": isinstance(obj["sample_id"], str) and obj["sample_id"] != "",
        "episode": isinstance(obj["episode"], str),
        "frame_keys": isinstance(keys, list) and len(keys) >= 1
        and all(isinstance(k, str) and KEY_PATTERN.fullmatch(k) for k in keys),
        "action_label": _is_int(obj["action_label"], 0, len(ACTIONS) - 1),
        "length": _is_int(obj["length"], 1, max_length),
    }
    return next((name for name, ok in checks.items() if not ok), None)


_HEADER_RULES = ("sample_id: non-empty string; episode: string; frame_keys: non-empty list of keys; "
                 "action_label: int 0..3; length: int 1..{}")


def decode_sample_header(data: bytes, ref: MemberRef, max_length: int) -> dict:
    """The sample's JSON member, validated."""
    obj = _json_object(data, ref, SAMPLE_FIELDS)
    bad = sample_header_problem(obj, max_length)
    if bad:
        raise ref.error(f"a valid {bad!r} ({_HEADER_RULES.format(max_length)})", obj[bad])
    return obj


def token_rows(tokens: EncodedText) -> np.ndarray:
    """The (6, L) int64 matrix stored for a sample: input_ids, labels, segment_ids, position_ids t/h/w."""
    length = len(tokens)
    parts = (tokens.input_ids, tokens.labels, tokens.segment_ids, tokens.position_ids)
    shapes = [np.shape(p) for p in parts]
    if shapes != [(length,)] * 3 + [(3, length)]:
        raise SchemaError("EncodedText", "shapes", f"(L,) ×3 and (3, L) with L={length}", shapes)
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1, length) for p in parts])


def token_problem(rows: np.ndarray) -> str | None:
    """Why a (6, L) token matrix is not a valid sample, or None (labels are unshifted copies of input_ids)."""
    ids, labels, segments, positions = rows[0], rows[1], rows[2], rows[3:]
    labelled = labels != IGNORE_INDEX
    if rows.size and (rows.min() < np.iinfo(np.int32).min or rows.max() > np.iinfo(np.int32).max):
        return "values inside int32"
    if (ids < 0).any() or (positions < 0).any():
        return "input_ids >= 0 and position_ids >= 0"
    if not labelled.any():
        return "at least one labelled token"
    if (labels[labelled] != ids[labelled]).any():
        return f"labels equal to input_ids or {IGNORE_INDEX}"
    if segments.min() < 0 or segments.max() > NUM_SEGMENTS or (segments[~labelled] != 0).any():
        return f"segment_ids in 0..{NUM_SEGMENTS}, 0 on unlabelled tokens"
    return None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def _read_npy(raw: bytes, ref: MemberRef, dtypes: tuple[str, ...]) -> np.ndarray:
    buffer = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buffer)
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(buffer, max_header_size=NPY_HEADER_MAX)
    except ValueError as e:
        raise ref.error("an .npy (version 1.0) array", f"an invalid header ({e})") from e
    if version != (1, 0) or fortran_order or dtype.str not in dtypes or len(shape) != 2:
        raise ref.error(f"a 2-d C-order .npy 1.0 array of {dtypes}", f"version {version}, {dtype.str} {shape}")
    offset = buffer.tell()
    if len(raw) - offset != math.prod(shape) * dtype.itemsize:
        raise ref.error(f"{math.prod(shape) * dtype.itemsize} data bytes for {shape}", f"{len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def decode_tokens(payload: bytes, ref: MemberRef, length: int) -> EncodedText:
    raw = unzstd(payload, ref, cap=NPY_HEADER_MAX + 24 * length)
    rows = _read_npy(raw, ref, ("<i4",))
    if rows.shape != (6, length):
        raise ref.error(f"int32 tokens of shape (6, {length}) (length from the sample json)", rows.shape)
    rows = rows.astype(np.int64)
    problem = token_problem(rows)
    if problem:
        raise ref.error(problem, "values that violate it")
    return EncodedText(rows[0], rows[1], rows[2], rows[3:6])


def decode_vggt(payload: bytes, ref: MemberRef) -> np.ndarray:
    features = _read_npy(unzstd(payload, ref, cap=MAX_VGGT_BYTES), ref, tuple(VGGT_DTYPES))
    if not _feature_width_ok(features.shape[1]) or features.shape[0] < 1:
        raise ref.error(f"VGGT features of shape (P, C), C even ≤ {MAX_VGGT_FEATURE_DIM} ({VGGT_FEATURE_DIM} for "
                        "VGGT-1B)", features.shape)
    return features


def encode_frame(frame: CompactFrame | PackedFrame, compressor: zstandard.ZstdCompressor) -> list[tuple[str, bytes]]:
    """The frame's members in order: geometry JSON, then zstd delta-filtered uint8 HWC pixels. A `PackedFrame`
    (read from a shard) keeps its stored bytes: rewriting a shard never re-encodes its frames."""
    if not KEY_PATTERN.fullmatch(frame.key) or geometry_problem(frame.geometry):
        raise SchemaError(f"frame {frame.key!r}", "key/geometry", "a key [A-Za-z0-9_-]{1,80} and a valid geometry",
                          frame.geometry)
    header = dict(zip(GEOMETRY_FIELDS, (int(v) for v in frame.geometry)))
    if isinstance(frame, PackedFrame):
        payload = frame.payload
    else:
        payload = compressor.compress(delta_filter(frame.pixels).tobytes())
    return [(f"{frame.key}.frame.json", _json_bytes(header)), (f"{frame.key}.rgb.zst", payload)]


def _feature_width_ok(width: int) -> bool:
    return 0 < width <= MAX_VGGT_FEATURE_DIM and width % 2 == 0


def delta_filter(pixels: np.ndarray) -> np.ndarray:
    """Left-neighbour difference per row and channel, mod 256 (PNG's "Sub" filter).

    Measured on 640×480 frames: zstd-3 stores 263 kB/frame instead of 377 kB (−30 %) for +1.6 ms decode
    per frame (LOG.md 2026-11-28); PNG would be 183 kB but costs 70 ms to encode and 8 ms to decode.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    out = pixels.copy()
    out[:, 1:] -= pixels[:, :-1]
    return out


def delta_unfilter(filtered: np.ndarray) -> np.ndarray:
    """Inverse of `delta_filter`: cumulative sum along each row, mod 256 (torch's uint8 cumsum is ~5×
    faster than numpy's here: 0.5 ms vs 2.5 ms per 644×490 frame)."""
    with warnings.catch_warnings():  # a read-only array (zstd output) is fine: cumsum only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(np.ascontiguousarray(filtered))
    return source.cumsum(1, dtype=torch.uint8).numpy()


def encode_sample(sample: StoredSample, compressor: zstandard.ZstdCompressor) -> list[tuple[str, bytes]]:
    """The sample's members in order: JSON header, zstd int32 tokens, optional zstd VGGT features."""
    where = f"sample {sample.key!r}"
    header = {"sample_id": sample.sample_id, "episode": sample.episode, "frame_keys": list(sample.frame_keys),
              "action_label": sample.action_label, "length": sample.length}
    rows = token_rows(sample.tokens)
    problem = token_problem(rows)
    if problem or not KEY_PATTERN.fullmatch(sample.key):
        raise SchemaError(where, "tokens/key", problem or "a key [A-Za-z0-9_-]{1,80}", sample.key)
    bad = sample_header_problem(header, max_length=MAX_SEQUENCE_LENGTH)
    if bad:
        raise SchemaError(where, bad, _HEADER_RULES.format(MAX_SEQUENCE_LENGTH), header[bad])
    members = [(f"{sample.key}.sample.json", _json_bytes(header)),
               (f"{sample.key}.tokens.npy.zst", compressor.compress(_npy_bytes(rows.astype("<i4"))))]
    if sample.vggt_features is not None:
        features = np.asarray(sample.vggt_features)
        features = features.astype(features.dtype.newbyteorder("<"), copy=False)
        if features.dtype.str not in VGGT_DTYPES or features.ndim != 2 or not _feature_width_ok(features.shape[1]):
            raise SchemaError(where, "vggt_features", f"(P, C) with C even ≤ {MAX_VGGT_FEATURE_DIM} of {list(VGGT_DTYPES.values())}",
                              f"{features.dtype} {features.shape}")
        members.append((f"{sample.key}.vggt.npy.zst", compressor.compress(_npy_bytes(features))))
    return members


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
