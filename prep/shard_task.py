"""`run_task`: the one function an executor runs — episodes in, one shard + a small result record out.

Each unique frame is decoded, resized and stored once per shard, however many samples use it as
history (an episode's first frame serves all its samples, the others up to ~23 in a 70-step episode; per-sample
storage would cost ~9× the bytes). Idempotent: a shard whose sidecar record matches the file's sha256, the
build's config hash and the task's inputs (its episode folders' file names and sizes, or its annotation records)
is not rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from prep.episodes import expand_samples, is_ambiguous, read_episode
from prep.frames import load_compact_frame, qwen_grid
from prep.plan import ShardTask
from prep.text import TextEncoder, num_image_tokens, special_token_problem
from schemas.config import BuildConfig
from schemas.episode import Reject
from schemas.errors import SchemaError
from schemas.manifest import write_bytes_atomic
from schemas.sample import CompactFrame, SampleRecord
from shards_manifest import shard_io
from shards_manifest.shard_io import StoredSample

log = logging.getLogger(__name__)
TASKS_DIR = "_tasks"  # per-shard completion records (JSON) of an unfinished or finished build


@dataclass
class ShardResult:
    """What a task returns to the driver: counts, size and hash of its shard, its rejects."""

    index: int
    name: str
    config_hash: str
    inputs_hash: str = ""  # task_inputs_hash of the task that wrote the shard
    episodes: int = 0
    samples: int = 0
    frames: int = 0
    bytes: int = 0
    sha256: str = ""
    text_tokens: int = 0
    visual_tokens: int = 0
    source_image_bytes: int = 0
    ambiguous_episodes: int = 0
    rejects: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False  # True when an earlier run had already written this shard
    vggt: str = ""  # sha256 of the VGGT checkpoint whose features the shard holds ("" = none; prep.vggt_stage)
    vggt_seconds: float = 0.0
    vggt_skipped: bool = False  # True when the shard already held this checkpoint's features

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@lru_cache(maxsize=4)
def text_encoder(model_path: str) -> TextEncoder:
    return TextEncoder.from_model_path(model_path)


def run_task(task: ShardTask, config: BuildConfig) -> ShardResult:
    """Build one shard (or return the record of an already finished one)."""
    fs, root = shard_io.url_to_fs(config.output)
    record_path = f"{root}/{TASKS_DIR}/{task.name}.json"
    inputs_hash = task_inputs_hash(task)
    done = _finished_result(fs, record_path, task, config, inputs_hash)
    if done is not None:
        return done
    start = time.perf_counter()
    result = ShardResult(task.index, task.name, config.output_hash(), inputs_hash)
    samples, rejects = _collect_samples(task, config, result)
    frames, stored = _encode_samples(samples, config, rejects, result)
    random.Random(config.seed * 1_000_003 + task.index).shuffle(stored)  # mix episodes inside the shard
    if stored:
        info = shard_io.write_shard(f"{config.output.rstrip('/')}/{task.name}", frames, stored, config.zstd_level)
        result.bytes, result.sha256 = info.bytes, info.sha256
    result.samples, result.frames = len(stored), len(frames)
    result.rejects = [r.to_dict() for r in rejects]
    result.seconds = round(time.perf_counter() - start, 3)
    write_task_record(config, result)
    return result


def task_inputs_hash(task: ShardTask) -> str:
    """What the task reads: its episode folders in order, each with its files' names and sizes (a listing, no
    reads), or its annotation records and the sizes of their images. Re-planning after episodes were added or
    removed moves episodes between tasks; a finished shard whose task now has other inputs is rebuilt, never
    reused."""
    digest = hashlib.sha256()
    for folder in task.episode_paths:
        with os.scandir(folder) as entries:
            listing = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
        digest.update(json.dumps([folder, listing]).encode())
    for sample in task.samples:
        digest.update(json.dumps(asdict(sample), sort_keys=True, default=str).encode())
    sizes = {path: _size(path) for sample in task.samples for path in sample.frame_paths}
    digest.update(json.dumps(sorted(sizes.items())).encode())
    return digest.hexdigest()


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def write_task_record(config: BuildConfig, result: ShardResult) -> None:
    """Written after the shard, atomically: its presence (with the shard's sha256) means "finished"."""
    write_bytes_atomic(f"{config.output.rstrip('/')}/{TASKS_DIR}/{result.name}.json", result.to_json().encode())


def read_task_record(fs, record_path: str) -> ShardResult | None:
    """The record at `record_path`, or None when it is absent or unreadable (then the task runs again)."""
    if not fs.exists(record_path):
        return None
    try:
        return ShardResult(**json.loads(fs.cat_file(record_path)))
    except (ValueError, TypeError) as e:
        log.warning("task record %s is unreadable (%s): its shard will be rebuilt", record_path, e)
        return None


def _finished_result(fs, record_path: str, task: ShardTask, config: BuildConfig,
                     inputs_hash: str) -> ShardResult | None:
    result = read_task_record(fs, record_path)
    if result is None or result.config_hash != config.output_hash() or result.inputs_hash != inputs_hash:
        return None
    if result.samples and shard_io.sha256_of(f"{config.output.rstrip('/')}/{task.name}") != result.sha256:
        return None
    result.skipped = True
    return result


def _collect_samples(task: ShardTask, config: BuildConfig, result: ShardResult) -> tuple[list[SampleRecord], list[Reject]]:
    if task.samples:
        result.episodes = len({s.episode for s in task.samples})
        return list(task.samples), []
    samples, rejects = [], []
    for path in task.episode_paths:
        episode, episode_rejects = read_episode(path)
        rejects += episode_rejects
        if episode is None:
            continue
        result.episodes += 1
        result.ambiguous_episodes += is_ambiguous(episode)
        episode_samples, step_rejects = expand_samples(episode, config.max_history_images)
        samples += episode_samples
        rejects += step_rejects
    return samples, rejects


def _encode_samples(samples: list[SampleRecord], config: BuildConfig, rejects: list[Reject],
                    result: ShardResult) -> tuple[list[CompactFrame], list[StoredSample]]:
    encoder = text_encoder(config.model_path)
    frames: dict[str, CompactFrame | None] = {}
    problems: dict[str, str] = {}  # why a frame in `frames` is None
    stored = []
    for sample in samples:
        problem = special_token_problem(sample)
        if problem:
            rejects.append(Reject(sample.sample_id, "special_token_in_text", problem))
            continue
        sample_frames = [_load_frame(frames, problems, key, path, config, result) for key, path in
                         zip(sample.frame_keys, sample.frame_paths)]
        if any(f is None for f in sample_frames):
            bad = next(k for k, f in zip(sample.frame_keys, sample_frames) if f is None)
            rejects.append(Reject(sample.sample_id, "unreadable_image", problems[bad]))
            continue
        sizes = sorted({(f.canvas_h, f.canvas_w) for f in sample_frames})
        if len(sizes) > 1:  # crop mode keeps each image's aspect; VGGT attends across frames of one size
            rejects.append(Reject(sample.sample_id, "mixed_frame_sizes",
                                  f"the sample's frames have {len(sizes)} sizes (h, w): {sizes}"))
            continue
        grids = [qwen_grid(f.canvas_h, f.canvas_w) for f in sample_frames]
        text = encoder.encode_text(sample, grids)
        if len(text) > config.max_length:
            rejects.append(Reject(sample.sample_id, "too_long", f"{len(text)} tokens > max_length {config.max_length}"))
            continue
        visual = sum(num_image_tokens(grids))
        result.visual_tokens += visual
        result.text_tokens += len(text) - visual
        stored.append(StoredSample(key=sample.key, sample_id=sample.sample_id, episode=sample.episode,
                                   frame_keys=sample.frame_keys, action_label=sample.action_label, tokens=text))
    used = {k for s in stored for k in s.frame_keys}
    ordered = [f for k, f in frames.items() if f is not None and k in used]
    return ordered, stored


def _load_frame(cache: dict, problems: dict, key: str, path: str, config: BuildConfig,
                result: ShardResult) -> CompactFrame | None:
    """The frame (decoded once per task), or None with the reason in `problems[key]`."""
    if key not in cache:
        try:
            cache[key] = load_compact_frame(path, key, config.image_mode)
            result.source_image_bytes += Path(path).stat().st_size
        except (SchemaError, OSError) as e:
            cache[key] = None
            problems[key] = str(e)  # names the file
    return cache[key]
