"""Deep verification: every member of every shard decoded and checked against its frames and the manifest.

One read pass per shard computes the sha256 while the reader decodes, so deep costs one read, not two.
Per sample: image-pad runs vs the frames' Qwen grids, vision markers, mRoPE ids recomputed, labels after
the images and contiguous to the end, segments in order, key vs sample_id, VGGT features vs the tags.
Frames are decompressed with their checksum, not un-filtered (the filter is a bijection: it can't fail).
(Slightly over 300 lines: one check per function, all listed here.)
"""
from __future__ import annotations

import functools

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from prep.frames import image_token_count, qwen_grid
from prep.text import IMAGE_PAD_ID, rope_position_ids
from schemas.manifest import Manifest, ShardRecord, VggtTags
from schemas.sample import safe_key
from schemas.stored import (IGNORE_INDEX, MAX_SEQUENCE_LENGTH, VGGT_DTYPES, MemberRef, PackedFrame, ShardError,
                            StoredSample, unzstd)
from shards_manifest.shard_io import iter_shard_stream, open_url

log = logging.getLogger(__name__)

VISION_START_ID, VISION_END_ID = 151652, 151653  # Qwen2.5-VL <|vision_start|>, <|vision_end|>
MAX_PROBLEMS_PER_SHARD = 20  # a systematic fault would otherwise print one line per sample
EXECUTORS = ("thread", "process")
Geometry = tuple[int, int, int, int, int, int]
Finding = tuple[str, str] | None  # (expected, found) of a failed check


@dataclass(frozen=True)
class ShardContext:
    """What the manifest says every shard must satisfy (picklable: sent to worker processes)."""

    max_length: int = MAX_SEQUENCE_LENGTH
    image_mode: str = "pad"
    vggt: VggtTags | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ShardContext:
        max_length = manifest.build_config.get("max_length", MAX_SEQUENCE_LENGTH)
        return cls(max_length if type(max_length) is int and max_length > 0 else MAX_SEQUENCE_LENGTH,
                   manifest.image_mode, manifest.vggt)


@dataclass
class ShardCheck:
    """The result of deep-checking one shard: its problems and what it holds."""

    name: str
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    frames: int = 0
    episodes: int = 0
    text_tokens: int = 0
    visual_tokens: int = 0
    bytes: int = 0
    sample_ids: list[tuple[str, str]] = field(default_factory=list)  # (key, sample_id) in stored order
    complete: bool = False  # read to the end without a decoding error

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_SHARD:
            self.problems.append(problem)
        elif len(self.problems) == MAX_PROBLEMS_PER_SHARD:
            self.problems.append(f"shard {self.name}: more problems not shown (first {MAX_PROBLEMS_PER_SHARD} above)")


class _HashingReader:
    """Read-only file wrapper that hashes and counts every byte the tar reader pulls through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha256, self.num_bytes = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self, chunk_bytes: int = 1 << 20) -> None:
        while self.read(chunk_bytes):
            pass


# ---------------------------------------------------------------- per sample / per frame
def frame_problem(geometry: Geometry, image_mode: str) -> Finding:
    """Why a frame's placement does not fit the build's image mode (pad: square canvas; crop: no padding)
    or has no Qwen grid (canvas sides multiples of 14 px, at least 28)."""
    h, w, canvas_h, canvas_w, top, left = geometry
    if canvas_h % 14 or canvas_w % 14 or min(canvas_h, canvas_w) < 28:
        return "canvas sides that are multiples of 14 px and at least 28 (a Qwen grid)", f"canvas {canvas_h}×{canvas_w}"
    if image_mode == "pad" and canvas_h != canvas_w:
        return "a square canvas (image_mode pad)", f"canvas {canvas_h}×{canvas_w}"
    if image_mode == "crop" and (h, w, top, left) != (canvas_h, canvas_w, 0, 0):
        return "content filling the canvas (image_mode crop)", f"{h}×{w} at ({top}, {left}) on {canvas_h}×{canvas_w}"
    return None


def _pad_runs(input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.diff(np.concatenate(([0], (input_ids == IMAGE_PAD_ID).astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def image_token_problem(sample: StoredSample, geometries: list[Geometry]) -> Finding:
    """Expected/found text when the `<|image_pad|>` runs do not match the frames (one run per image, in order).
    Runs on every sample the loader yields: the checks are whole-array ops, the message is built on failure."""
    ids = sample.tokens.input_ids
    starts, ends = _pad_runs(ids)
    if len(starts) != len(geometries):
        return f"{len(geometries)} <|image_pad|> runs (one per frame_keys entry)", f"{len(starts)}"
    need = np.array([_image_tokens(g[2], g[3]) for g in geometries], dtype=np.int64)
    wrong = np.flatnonzero(ends - starts != need)
    if wrong.size:
        i = int(wrong[0])
        grid = "×".join(map(str, qwen_grid(geometries[i][2], geometries[i][3])))
        return (f"{need[i]} <|image_pad|> tokens for image {i + 1} of {len(geometries)} (frame {sample.frame_keys[i]}, "
                f"canvas {geometries[i][2]}×{geometries[i][3]}, Qwen grid {grid})", f"{ends[i] - starts[i]}")
    before, after = ids[np.maximum(starts - 1, 0)], ids[np.minimum(ends, len(ids) - 1)]
    framed = (starts > 0) & (before == VISION_START_ID) & (ends < len(ids)) & (after == VISION_END_ID)
    if not framed.all():
        return f"<|vision_start|> before and <|vision_end|> after image {int(np.flatnonzero(~framed)[0]) + 1}", \
            "other tokens"
    if np.count_nonzero(ids == VISION_START_ID) != len(starts) or np.count_nonzero(ids == VISION_END_ID) != len(starts):
        return f"{len(starts)} <|vision_start|>/<|vision_end|> pairs", "stray vision markers"
    return None


@functools.lru_cache(maxsize=64)
def _image_tokens(canvas_h: int, canvas_w: int) -> int:
    return image_token_count(canvas_h, canvas_w)


def label_problem(sample: StoredSample) -> Finding:
    """Labels must follow the last image and run contiguously to the end; segments must not go backwards."""
    labelled = np.flatnonzero(sample.tokens.labels != IGNORE_INDEX)
    first, length = int(labelled[0]), len(sample.tokens)
    _, ends = _pad_runs(sample.tokens.input_ids)
    if first == 0 or (len(ends) and first < ends[-1]):
        return "the first label after the prompt and its images", f"the first label at position {first}"
    if len(labelled) != length - first:
        return f"labels contiguous from position {first} to the end ({length - first})", f"{len(labelled)} labels"
    if (np.diff(sample.tokens.segment_ids[labelled]) < 0).any():
        return "segment_ids in order (0, then 1..4) over the labelled tokens", "a segment going back"
    return None


def vggt_problem(sample: StoredSample, geometries: list[Geometry], tags: VggtTags | None) -> Finding:
    features = sample.vggt_features
    if tags is None:
        return None if features is None else ("no VGGT features (manifest vggt is null)", "a vggt member")
    if features is None:
        return f"VGGT features ({tags.dtype}, manifest vggt tags)", "no vggt member"
    dtype = VGGT_DTYPES.get(features.dtype.str)
    _, _, canvas_h, canvas_w, _, _ = geometries[0]
    _, gh, gw = qwen_grid(canvas_h, canvas_w)
    patches = {gh * gw, (canvas_h // 14) * (canvas_w // 14)}
    if dtype != tags.dtype or features.shape[0] not in patches:
        return f"VGGT features (P, C) {tags.dtype} with P in {sorted(patches)}", f"{features.shape} {dtype}"
    return None


def sample_problems(sample: StoredSample, geometries: list[Geometry], url: str, vggt: VggtTags | None) -> list[str]:
    """Problems of one decoded sample whose frames have the given geometries, each naming shard + member."""
    key = sample.key
    tokens, header = MemberRef(url, f"{key}.tokens.npy.zst"), MemberRef(url, f"{key}.sample.json")
    problems = []
    if key != safe_key(sample.sample_id):
        problems.append(str(header.error(f"the key derived from sample_id {sample.sample_id!r}", key)))
    sizes = sorted({g[2:4] for g in geometries})
    if len(sizes) > 1:
        problems.append(str(header.error("frames of one canvas size per sample (VGGT stacks them)", sizes)))
    image_problem = image_token_problem(sample, geometries)
    if image_problem:
        problems.append(str(tokens.error(*image_problem)))
    else:
        grids = [qwen_grid(g[2], g[3]) for g in geometries]
        expected = rope_position_ids(sample.tokens.input_ids, grids)
        differ = np.flatnonzero((expected != sample.tokens.position_ids).any(axis=0))
        if len(differ):
            problems.append(str(tokens.error("position_ids equal to mRoPE of input_ids and the frames' grids",
                                             f"{len(differ)} positions differ, first at {differ[0]}")))
    for ref, problem in ((tokens, label_problem(sample)),
                         (MemberRef(url, f"{key}.vggt.npy.zst"), vggt_problem(sample, geometries, vggt))):
        if problem:
            problems.append(str(ref.error(*problem)))
    return problems


# ---------------------------------------------------------------- per shard
def _read_records(reader: _HashingReader, url: str, context: ShardContext, check: ShardCheck) -> None:
    geometries: dict[str, Geometry] = {}
    bad_frames: set[str] = set()  # reported at their frame.json; samples using them skip the token checks
    used: set[str] = set()
    episodes: set[str] = set()
    for record in iter_shard_stream(reader, url, lazy_frames=True, max_length=context.max_length):
        if isinstance(record, PackedFrame):
            h, w = record.geometry[:2]
            unzstd(record.payload, record.ref, exact=h * w * 3)  # checksum + size, the pixels are not needed
            geometries[record.key] = record.geometry
            problem = frame_problem(record.geometry, context.image_mode)
            if problem:
                bad_frames.add(record.key)
                check.add(str(MemberRef(url, f"{record.key}.frame.json").error(*problem)))
            continue
        if not bad_frames.intersection(record.frame_keys):
            for problem in sample_problems(record, [geometries[k] for k in record.frame_keys], url, context.vggt):
                check.add(problem)
        used.update(record.frame_keys)
        episodes.add(record.episode)
        pads = int(np.count_nonzero(record.tokens.input_ids == IMAGE_PAD_ID))
        check.samples += 1
        check.visual_tokens += pads
        check.text_tokens += record.length - pads
        check.sample_ids.append((record.key, record.sample_id))
    check.frames, check.episodes, check.complete = len(geometries), len(episodes), True
    for key in sorted(set(geometries) - used)[:3]:
        check.add(str(MemberRef(url, f"{key}.rgb.zst").error("frames that some sample uses", "an unused frame")))


def _count_problems(check: ShardCheck, record: ShardRecord, url: str) -> list[str]:
    if check.samples == 0:
        return [f"shard {url}: empty shard: expected samples ({record.samples} in the manifest), found "
                f"{check.frames} frames and no samples"]
    counts = ("samples", "frames", "episodes", "text_tokens", "visual_tokens")
    return [f"shard {url}: manifest records {getattr(record, name)} {name}, the shard holds {getattr(check, name)}"
            for name in counts if getattr(record, name) != getattr(check, name)]


def verify_shard(url: str, record: ShardRecord, context: ShardContext) -> ShardCheck:
    """Decode and check every member of one shard, and its size, sha256 and counts against `record`."""
    check = ShardCheck(record.name)
    try:
        raw = open_url(url).open()
    except FileNotFoundError:
        check.add(f"shard {url}: missing (the manifest lists it with {record.bytes} bytes)")
        return check
    reader = _HashingReader(raw)
    try:
        _read_records(reader, url, context, check)
    except ShardError as e:
        check.add(str(e))
    except OSError as e:
        check.add(f"shard {url}: unreadable after {reader.num_bytes} bytes ({type(e).__name__}: {e})")
    try:
        reader.drain()
    except OSError as e:
        check.add(f"shard {url}: unreadable after {reader.num_bytes} bytes ({type(e).__name__}: {e})")
    finally:
        raw.close()
    check.bytes = reader.num_bytes
    if reader.num_bytes != record.bytes:
        check.add(f"shard {url}: expected {record.bytes} bytes (manifest), found {reader.num_bytes}")
    elif reader.sha256.hexdigest() != record.sha256:
        check.add(f"shard {url}: expected sha256 {record.sha256} (manifest), found {reader.sha256.hexdigest()}")
    if check.complete:
        for problem in _count_problems(check, record, url):
            check.add(problem)
    return check


# ---------------------------------------------------------------- whole build
def map_shards(fn: Callable[..., Any], calls: Iterable[tuple], workers: int, executor: str = "thread") -> Iterator[Any]:
    """fn(*call) for each call, in completion order, on `workers` threads or processes (1: inline)."""
    calls = list(calls)
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {EXECUTORS}, found {executor!r}")
    if workers <= 1 or len(calls) <= 1:
        yield from (fn(*call) for call in calls)
        return
    pool: Executor = ThreadPoolExecutor(workers) if executor == "thread" else ProcessPoolExecutor(workers)
    with pool:
        futures = [pool.submit(fn, *call) for call in calls]
        for future in as_completed(futures):
            yield future.result()


def duplicate_problems(checks: Iterable[ShardCheck], root_url: str) -> list[str]:
    """Sample keys or sample ids stored in more than one shard (each pair reported once)."""
    first_key: dict[str, str] = {}
    first_id: dict[str, str] = {}
    problems = []
    for check in checks:
        for key, sample_id in check.sample_ids:
            for seen, value, what in ((first_key, key, "sample key"), (first_id, sample_id, "sample_id")):
                other = seen.setdefault(value, check.name)
                if other != check.name:
                    problems.append(f"shard {root_url}/{check.name}: duplicate {what} {value!r} across shards: "
                                    f"expected each once, found it in {other} too")
                    break
    return problems


def deep_verify(root_url: str, manifest: Manifest, workers: int = 1, executor: str = "thread",
                on_shard: Callable[[ShardCheck], None] | None = None) -> tuple[list[str], list[ShardCheck]]:
    """Problems of all shards listed in `manifest` (plus duplicates across shards), and the per-shard checks."""
    root = root_url.rstrip("/")
    context = ShardContext.from_manifest(manifest)
    calls = [(f"{root}/{record.name}", record, context) for record in manifest.shards]
    checks = []
    for check in map_shards(verify_shard, calls, workers, executor):
        checks.append(check)
        if on_shard is not None:
            on_shard(check)
    order = {record.name: i for i, record in enumerate(manifest.shards)}
    checks.sort(key=lambda c: order[c.name])
    problems = [p for check in checks for p in check.problems]
    return problems + duplicate_problems(checks, root), checks
