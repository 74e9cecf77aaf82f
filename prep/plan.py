"""Plan a build: discover the input and cut it into shard tasks of whole episodes.

Shard names come from the plan (`shard-000123.tar`), never from a uuid, so a retried or re-run task
overwrites its own shard instead of duplicating it. The driver reads only directory names (episode input)
or the annotation records (annotation input, no images): it never holds frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prep.annotations import read_annotations
from prep.episodes import list_episode_dirs
from schemas.config import BuildConfig
from schemas.episode import Reject
from schemas.sample import SampleRecord


@dataclass(frozen=True)
class ShardTask:
    """One unit of work = one shard: either episode folders or pre-read annotation samples."""

    index: int
    episode_paths: tuple[str, ...] = ()
    samples: tuple[SampleRecord, ...] = ()

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def plan_shards(config: BuildConfig) -> tuple[list[ShardTask], list[Reject]]:
    """The build's task list (deterministic for a given input and config) and input-level rejects."""
    source = Path(config.input)
    if source.is_file():
        return _plan_annotations(source, config)
    episodes = list_episode_dirs(source)
    if config.limit:
        episodes = episodes[: config.limit]
    size = config.episodes_per_shard
    chunks = [episodes[i:i + size] for i in range(0, len(episodes), size)]
    return [ShardTask(i, tuple(str(p) for p in chunk)) for i, chunk in enumerate(chunks)], []


def _plan_annotations(path: Path, config: BuildConfig) -> tuple[list[ShardTask], list[Reject]]:
    samples, rejects = read_annotations(path, config.image_root or None)
    by_episode: dict[str, list[SampleRecord]] = {}
    for sample in samples:
        by_episode.setdefault(sample.episode, []).append(sample)
    groups = list(by_episode.values())
    if config.limit:
        groups = groups[: config.limit]
    size = config.episodes_per_shard
    tasks = [ShardTask(i // size, samples=tuple(s for group in groups[i:i + size] for s in group))
             for i in range(0, len(groups), size)]
    return tasks, rejects
