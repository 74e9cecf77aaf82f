"""`ShardStream`: shards → per-sample dicts for one rank, split over loader workers, resumable mid-epoch.

Chain (one plain function per step): assign_pieces → read_piece (one shard; each frame decoded once, on
first use) → decode_sample → interleave (2–4 shards open). Equal-batches policy and mixing live in `train.shard_policy`. Every
sample carries `__stream__` = (epoch, slot, num_slots, index); the main process feeds collated batches
to `observe()`, so `state_dict()` counts only batches the trainer consumed, never prefetched ones.
(Over 300 lines: the dataset class and its generator chain share the resume state and stay together.)
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import braceexpand
import fsspec
import numpy as np
import torch

from schemas.errors import SchemaError
from schemas.manifest import check_manifest_compat, manifest_url, read_manifest
from schemas.sample import CompactFrame
from schemas.stored import MAX_SEQUENCE_LENGTH, PackedFrame, ShardError, StoredSample
from shards_manifest.deep_verify import image_token_problem
from shards_manifest.shard_io import iter_shard_stream
from train.collate import STREAM_KEY
from train.shard_policy import (MIX_POLICIES, Piece, StreamState, assign_pieces, mix_rng,
                                rank_samples, skip_consumed, slot_sizes)

log = logging.getLogger(__name__)

MAX_SLOTS = 256  # loader workers per rank that a resume state can describe
_SHARED = {"epoch": 0, "resume_epoch": 1, "next_slot": 2, "num_slots": 3}  # + consumed per slot from index 4
STATE_FORMAT = 2  # 2: num_open_shards and mix are part of the identity


@dataclass(frozen=True)
class StreamConfig:
    seed: int = 0
    num_open_shards: int = 3  # shards interleaved at once per worker (memory: their frames)
    mix: str = "interleave"  # a name in train.shard_policy.MIX_POLICIES
    frame_cache: int | None = None  # decoded frames kept per open shard: None = all (see FrameTable), n = LRU of n
    batch_size: int = 1  # > 1: every worker yields a multiple of it (needs num_workers)
    num_workers: int | None = None  # the DataLoader's num_workers; required with batch_size > 1
    max_length: int = MAX_SEQUENCE_LENGTH

    def __post_init__(self) -> None:
        if self.mix not in MIX_POLICIES:
            raise SchemaError("stream config", "mix", f"one of {sorted(MIX_POLICIES)}", self.mix)
        for name in ("num_open_shards", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise SchemaError("stream config", name, "an integer ≥ 1", getattr(self, name))
        if (self.frame_cache or 0) < 0 or (self.batch_size > 1 and self.num_workers is None):
            raise SchemaError("stream config", "frame_cache/num_workers", "frame_cache None or ≥ 0; num_workers given "
                              "when batch_size > 1", (self.frame_cache, self.num_workers))


class Position(NamedTuple):
    """Where a worker-level stream sits: which epoch, rank and slot (logical loader worker)."""

    epoch: int
    rank: int
    world_size: int
    slot: int
    num_slots: int


# ---------------------------------------------------------------- sources
def expand_urls(source: str | Sequence[str]) -> list[str]:
    """Brace patterns (`shard-{000000..000009}.tar`) expanded, in order."""
    patterns = [source] if isinstance(source, str) else list(source)
    return [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]


def open_shard(url: str) -> BinaryIO:
    """A readable byte stream: `pipe:CMD` (webdataset's gopen, CMD's stdout), else a local path or fsspec URL."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen
        return gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def count_samples(url: str, max_length: int = MAX_SEQUENCE_LENGTH) -> int:
    """Samples in one shard by reading it (cost: a full read + token decode; frames stay compressed)."""
    with open_shard(url) as f:
        return sum(isinstance(r, StoredSample) for r in iter_shard_stream(f, url, lazy_frames=True, max_length=max_length))


def resolve_source(source: str | Sequence[str], expected: dict | None, max_length: int) -> tuple[list[str], list[int]]:
    """(shard URLs, samples per shard) from a manifest path/URL (`*.json`, or the build folder holding
    `manifest.json`) or shard URLs/patterns (counted by reading)."""
    if isinstance(source, str) and "{" not in source and not source.startswith("pipe:"):
        source = manifest_url(source)
    if isinstance(source, str) and source.endswith(".json"):
        manifest = read_manifest(source)
        if expected is not None:
            check_manifest_compat(manifest, expected, where=source)
        base = source.rsplit("/", 1)[0] + "/" if "/" in source else ""
        return [base + s.name for s in manifest.shards], [s.samples for s in manifest.shards]
    if expected is not None:
        raise SchemaError(str(source), "expected", "a manifest to check build parameters against", "bare shard URLs")
    urls = expand_urls(source)
    log.warning("ShardStream: counting samples by reading all %d shards (a full pass; give a manifest to skip it)",
                len(urls))
    return urls, [count_samples(url, max_length) for url in urls]


# ---------------------------------------------------------------- read → decode
class FrameTable:
    """One open shard's frames: zstd bytes by key, each decoded on first use. Default (`cache_frames=None`):
    kept decoded until the shard closes, packed bytes dropped (5× faster than an LRU of 64 frames on shuffled
    samples; memory ≈ the shard's raw frames). An LRU bound trades speed for memory."""

    def __init__(self, cache_frames: int | None):
        self.packed: dict[str, PackedFrame] = {}
        self.decoded: OrderedDict[str, CompactFrame] = OrderedDict()
        self.cache_frames = cache_frames

    def get(self, key: str) -> CompactFrame:
        frame = self.decoded.get(key)
        if frame is not None:
            self.decoded.move_to_end(key)
            return frame
        if self.cache_frames is None:
            frame = self.decoded[key] = self.packed.pop(key).unpack(row_deltas=True)
        else:
            frame = self.packed[key].unpack(row_deltas=True)
            if self.cache_frames:
                self.decoded[key] = frame
                if len(self.decoded) > self.cache_frames:
                    self.decoded.popitem(last=False)
        return frame


def decode_sample(sample: StoredSample, frames: FrameTable, url: str) -> dict:
    """The per-sample dict of docs/design.md; repeated frame keys share one CompactFrame. Image-pad runs
    must match the frames' Qwen grids (else the model would fail later, inside Qwen, naming no shard)."""
    decoded = {key: frames.get(key) for key in dict.fromkeys(sample.frame_keys)}
    problem = image_token_problem(sample, [decoded[key].geometry for key in sample.frame_keys])
    if problem is not None:
        raise ShardError(url, f"{sample.key}.tokens.npy.zst", *problem)
    return sample_to_dict(sample, decoded)


def sample_to_dict(sample: StoredSample, decoded: dict[str, CompactFrame]) -> dict:
    """A stored sample with its decoded frames as the per-sample dict of docs/design.md."""
    out = {"__key__": sample.key, "sample_id": sample.sample_id, "input_ids": sample.tokens.input_ids,
           "labels": sample.tokens.labels, "segment_ids": sample.tokens.segment_ids,
           "position_ids": sample.tokens.position_ids, "action_label": np.int64(sample.action_label),
           "frames": [decoded[key] for key in sample.frame_keys]}
    if sample.vggt_features is not None:
        out["vggt_features"] = sample.vggt_features
    return out


def read_piece(url: str, piece: Piece, count: int, config: StreamConfig) -> Iterator[dict]:
    """Samples [start, stop) of one shard as dicts; the shard must hold `count` samples (checked when read to the end)."""
    frames, index = FrameTable(config.frame_cache), 0
    try:
        with open_shard(url) as f:
            records = iter_shard_stream(f, url, lazy_frames=True, max_length=config.max_length)
            for record in records:
                if isinstance(record, PackedFrame):
                    frames.packed[record.key] = record
                    continue
                if index >= piece.start:
                    yield decode_sample(record, frames, url)
                index += 1
                if index == piece.stop:
                    break
            extra = next(records, None) if piece.stop == count == index else None
    except OSError as e:
        raise ShardError(url, f"(after {index} samples)", "a readable shard", f"{type(e).__name__}: {e}") from e
    if index < piece.stop:
        raise ShardError(url, "(end of archive)", f"{count} samples (manifest / count)", f"{index} samples")
    if extra is not None:
        raise ShardError(url, getattr(extra, "key", "(member)"), f"{count} samples (manifest / count)", "more samples")


# ---------------------------------------------------------------- mix
def interleave(sources: Sequence[Iterator[dict]], schedule: np.ndarray) -> Iterator[dict]:
    """Next sample from source `schedule[i]`; a source is closed (its frames freed) right after its last sample."""
    remaining = np.bincount(schedule, minlength=len(sources))
    try:
        for i in schedule:
            sample = next(sources[i])
            remaining[i] -= 1
            if remaining[i] == 0:
                sources[i].close()  # type: ignore[attr-defined]
            yield sample
    finally:
        for source in sources:
            source.close()  # type: ignore[attr-defined]


def slot_samples(urls: Sequence[str], counts: Sequence[int], config: StreamConfig, position: Position,
                 start: int = 0) -> Iterator[dict]:
    """The whole chain for one (epoch, rank, slot): samples from position `start` on, each tagged `__stream__`."""
    epoch, rank, world_size, slot, num_slots = position
    pieces = assign_pieces(counts, config.seed, epoch, rank, world_size, slot, num_slots, config.batch_size)
    schedule = MIX_POLICIES[config.mix]([len(p) for p in pieces], config.num_open_shards,
                                        mix_rng(config.seed, epoch, rank, slot))
    pieces, schedule = skip_consumed(pieces, schedule, start)
    sources = [read_piece(urls[p.shard], p, counts[p.shard], config) for p in pieces]
    for index, sample in enumerate(interleave(sources, schedule), start):
        sample[STREAM_KEY] = (epoch, slot, num_slots, index)
        yield sample


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else $RANK/$WORLD_SIZE (torchrun), else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank, world_size = found[0] if rank is None else rank, found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise SchemaError("ShardStream", "rank", f"0 <= rank < world_size={world_size}", rank)
    return rank, world_size


class ShardStream(torch.utils.data.IterableDataset):
    """Shards (URLs, brace patterns, `pipe:` commands, or a manifest) → this rank's samples, equal counts per rank."""

    def __init__(self, source: str | Sequence[str], config: StreamConfig = StreamConfig(), *, rank: int | None = None,
                 world_size: int | None = None, expected: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.urls, self.counts = resolve_source(source, expected, config.max_length)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.num_samples = sum(self.counts)
        # Shared with loader workers (also persistent ones): epoch and resume position, read at each __iter__.
        self._shared = torch.zeros(4 + MAX_SLOTS, dtype=torch.int64).share_memory_()
        self._shared[_SHARED["resume_epoch"]] = -1
        self.state = StreamState()
        per_rank = len(self)
        dropped = self.num_samples - self.world_size * per_rank
        log.info("ShardStream: %d shards, %d samples; equal-batches policy 'drop the tail': each of %d ranks yields "
                 "%d samples per epoch, the last %d samples (%.2f%%) of each epoch's shuffled order are skipped",
                 len(self.urls), self.num_samples, self.world_size, per_rank, dropped,
                 100.0 * dropped / max(1, self.num_samples))
        if per_rank == 0:
            need = self.world_size * (self._num_slots() * config.batch_size if config.batch_size > 1 else 1)
            raise SchemaError("ShardStream", "num_samples", f"≥ {need} (ranks [× workers × batch_size])", self.num_samples)

    def _num_slots(self, num_workers: int | None = None) -> int:
        return max(1, (self.config.num_workers if num_workers is None else num_workers) or 0)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (identical on every rank)."""
        return rank_samples(self.num_samples, self.world_size, self._num_slots(), self.config.batch_size)

    def num_batches(self, batch_size: int, num_workers: int) -> int:
        """Batches per epoch of a DataLoader(batch_size, num_workers) over this rank: Σ_worker ceil(n_w / B)."""
        sizes = slot_sizes(len(self), self._num_slots(num_workers))
        return sum(-(-n // batch_size) for n in sizes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; reaches persistent loader workers too (shared memory)."""
        self._shared[_SHARED["epoch"]] = epoch
        if epoch != self._shared[_SHARED["resume_epoch"]]:
            self._shared[_SHARED["resume_epoch"]] = -1  # a loaded position applies to its own epoch only
        if epoch != self.state.epoch:
            self.state = StreamState(epoch=epoch)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_slots = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.config.num_workers is not None and num_slots != self._num_slots():
            raise SchemaError("ShardStream", "num_workers", f"{self.config.num_workers} (StreamConfig)",
                              f"a DataLoader with {num_slots if info else 0} workers")
        shared = self._shared.tolist()
        epoch, slot, start = shared[_SHARED["epoch"]], worker, 0
        if shared[_SHARED["resume_epoch"]] == epoch and shared[_SHARED["num_slots"]] > 0:
            saved = shared[_SHARED["num_slots"]]
            if saved != num_slots:  # 0 and 1 workers are both one slot
                raise SchemaError("ShardStream resume", "dataloader_num_workers", f"{saved if saved > 1 else '0 or 1'}"
                                  " (as when the state was saved)", info.num_workers if info else 0)
            slot = (worker + shared[_SHARED["next_slot"]]) % num_slots
            start = shared[4 + slot]
        position = Position(epoch, self.rank, self.world_size, slot, num_slots)
        yield from slot_samples(self.urls, self.counts, self.config, position, start)

    def observe(self, batch: dict) -> None:
        """Call from the main process with every batch the trainer consumes (before popping `__stream__`)."""
        self.state.update(batch[STREAM_KEY])

    def _identity(self) -> dict[str, Any]:
        names = [url.rsplit("/", 1)[-1] for url in self.urls]  # not the folder: shards may move between runs
        digest = hashlib.sha256(repr(list(zip(names, self.counts))).encode()).hexdigest()[:16]
        # Everything the sample order depends on: resume replays the consumed counts against that order
        return {"format": STATE_FORMAT, "seed": self.config.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.config.batch_size, "num_open_shards": self.config.num_open_shards,
                "mix": self.config.mix, "num_samples": self.num_samples, "shards_digest": digest}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (save one per rank next to the checkpoint)."""
        s = self.state
        return {**self._identity(), "epoch": s.epoch, "num_slots": s.num_slots, "consumed": list(s.consumed),
                "next_slot": s.next_slot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the last observed batch; loader workers (new or persistent) pick it up at iter()."""
        for key, want in self._identity().items():
            if state.get(key) != want:
                raise SchemaError("ShardStream state", key, f"{want!r} (this stream)", state.get(key))
        if not 0 <= state["num_slots"] <= MAX_SLOTS or len(state["consumed"]) != state["num_slots"]:
            raise SchemaError("ShardStream state", "consumed", f"one count per slot, ≤ {MAX_SLOTS} slots",
                              state["consumed"])
        self.state = StreamState(state["epoch"], state["num_slots"], list(state["consumed"]), state["next_slot"])
        values = [state["epoch"], state["epoch"], state["next_slot"], state["num_slots"], *state["consumed"]]
        self._shared.zero_()
        self._shared[: len(values)] = torch.tensor(values, dtype=torch.int64)
