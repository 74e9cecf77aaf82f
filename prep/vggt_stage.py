"""VGGT feature stage: a second pass that adds each sample's (P, 2048) VGGT features to its finished shard.

Why a second pass, not inside `run_task`: CPU tasks (decode, resize, tokenise) stay many and GPU-free, while
one holder per GPU loads the 1B-parameter aggregator once and batches samples; features come from the
shard's stored uint8 frames through `train.pixels`, so they match the trainer's input bit for bit. Cost:
each shard is read and rewritten once (frames copied as stored; zstd of bf16 features ~30 ms per sample), on
a thread beside the GPU work. The `_tasks` record keeps the checkpoint's sha256: re-runs skip, a new file recomputes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from prep.shard_task import ShardResult, write_task_record
from schemas.config import BuildConfig
from schemas.errors import SchemaError
from schemas.manifest import VggtTags
from schemas.sample import CompactFrame
from schemas.stored import PackedFrame, StoredSample
from shards_manifest import shard_io
from train.pixels import canvas_from_frames, collate_frames, undo_row_deltas, vggt_images
from train.vggt import (FramePatches, VGGTAggregator, compile_blocks, load_aggregator, sample_features,
                        tiny_config, vggt1b)

log = logging.getLogger(__name__)

FLOP_PER_SAMPLE = 5.6e13  # VGGT-1B, 9 frames of 644², blocks up to 23 (issue 7)
H200_SAMPLES_PER_S = 7.9  # the build stage on one H200, compiled, 16 per call (docs/benchmarks.md)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_CONFIGS = {"vggt1b": vggt1b, "tiny": tiny_config}
PATCH_EMBED_CHUNK = 32  # frames per patch-embed call (DINOv2-L on 32 × 644²: ~2 GiB of activations)
AHEAD_SAMPLES = 32  # computed ahead of the writer: max(2, 32 // vggt_batch_samples) calls, each ~8.7 MB/sample (bf16)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """sha256 of a file's bytes (the checkpoint identity in the manifest; ≈ 3 s for VGGT-1B's 5 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def vggt_tags(config: BuildConfig, checkpoint_sha256: str) -> VggtTags:
    """The manifest's tags for features computed with this config and checkpoint."""
    return VggtTags(checkpoint_sha256=checkpoint_sha256, reference_frame=config.reference_frame,
                    dtype=config.vggt_dtype)


def needs_features(result: ShardResult, checkpoint_sha256: str) -> bool:
    """True when the shard has samples whose stored features are absent or from another checkpoint."""
    return result.samples > 0 and result.vggt != checkpoint_sha256


def to_storage(features: torch.Tensor, dtype: str) -> np.ndarray:
    """(P, C) tensor → the stored array: `<f4`, `<f2`, or bfloat16 as its uint16 bits."""
    features = features.to(TORCH_DTYPES[dtype]).cpu().contiguous()
    if dtype == "bfloat16":
        return features.view(torch.int16).numpy().view(np.uint16)
    return features.numpy()


class VggtInputs(NamedTuple):
    """A batch's VGGT inputs, each unique frame once: `images[r]` (3, H, W) float32 in [0, 1] (the same ops as
    `train.pixels.PixelDecoder`), and per sample its rows of `images`, oldest first."""

    images: list[torch.Tensor]
    rows: list[list[int]]

    def per_sample(self) -> list[torch.Tensor]:
        """(S, 3, H, W) per sample: what the trainer's `images_vggt` holds."""
        return [torch.stack([self.images[r] for r in rows]) for rows in self.rows]


def vggt_inputs(samples: Sequence[Sequence[CompactFrame]], device: torch.device) -> VggtInputs:
    """The VGGT inputs of samples' frames (oldest first), each unique frame key decoded once."""
    frames, geometry, image_frames, images_per_sample, deltas = collate_frames(samples)
    frames = undo_row_deltas(frames.to(device), deltas)  # geometry stays on the CPU: reading it never waits
    rows_by_canvas: dict[tuple[int, int], list[int]] = {}
    for row, geo in enumerate(geometry.tolist()):
        rows_by_canvas.setdefault((geo[2], geo[3]), []).append(row)
    images: list[torch.Tensor | None] = [None] * frames.shape[0]
    for rows in rows_by_canvas.values():
        canvases = canvas_from_frames(frames[torch.tensor(rows, device=device)], geometry[rows])
        for row, image in zip(rows, vggt_images(canvases)):
            images[row] = image
    order = image_frames.tolist()
    starts = np.cumsum([0] + images_per_sample.tolist())
    return VggtInputs(images, [order[a:b] for a, b in zip(starts[:-1], starts[1:])])  # type: ignore[arg-type]


def cpu_seconds_per_sample(dtype: str, size: int = 1024, repeats: int = 3) -> tuple[float, float]:
    """(estimated seconds per VGGT-1B sample, measured matmul FLOP/s) on this machine's CPU in `dtype`."""
    a = torch.randn(size, size, dtype=TORCH_DTYPES[dtype])
    a @ a  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    flops = 2 * size**3 * repeats / max(time.perf_counter() - start, 1e-9)
    return FLOP_PER_SAMPLE / flops, flops


def warn_if_slow(config: BuildConfig, has_gpu: bool) -> float | None:
    """Log how slow VGGT-1B without a GPU will be; returns the estimated seconds per sample (None: no warning)."""
    if has_gpu or config.vggt_config != "vggt1b":
        return None
    seconds, flops = cpu_seconds_per_sample(config.vggt_dtype)
    log.warning("VGGT-1B features without a GPU: measured %.0f GFLOP/s (%s matmul on the CPU) → ≈ %.0f s per "
                "sample (≈ %.1e FLOP each), ≈ %.1f h per 1000 samples; one H200 does ≈ %.0f samples/s. Use "
                "--executor ray on GPU nodes, or build without --vggt-model.", flops / 1e9, config.vggt_dtype,
                seconds, FLOP_PER_SAMPLE, seconds * 1000 / 3600, H200_SAMPLES_PER_S)
    return seconds


class _FrameCache:
    """A shard's frames, each decompressed on first use (by the thread that submits feature work) and kept."""

    def __init__(self, packed: dict[str, PackedFrame]):
        self.packed, self.frames = packed, {}

    def get(self, key: str) -> CompactFrame:
        frame = self.frames.get(key)
        return frame if frame is not None else self.frames.setdefault(key, self.packed[key].unpack(row_deltas=True))


class FeatureStage:
    """Adds features to finished shards; holds the model (loaded on first use). A Ray actor wraps this class."""

    def __init__(self, config: BuildConfig, checkpoint_sha256: str, device: str | None = None):
        self.config, self.checkpoint_sha256 = config, checkpoint_sha256
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: VGGTAggregator | None = None
        self.compute_seconds = 0.0  # time inside compute() (input decode → features on the host), all shards
        self.phase_seconds: dict[str, float] | None = None  # a dict: time each phase, synchronising (profiling)
        self._phase_start = 0.0

    def load(self) -> VGGTAggregator:
        """Load the checkpoint, refusing a file whose bytes are not the ones hashed by the driver."""
        if self.model is None:
            found = file_sha256(self.config.vggt_model)
            if found != self.checkpoint_sha256:
                raise SchemaError(self.config.vggt_model, "sha256", f"{self.checkpoint_sha256} (hashed by the "
                                  "build driver; is the checkpoint the same file on every node?)", found)
            warn_if_slow(self.config, self.device.type == "cuda")
            model_config = MODEL_CONFIGS[self.config.vggt_config]()
            self.model = load_aggregator(self.config.vggt_model, model_config, self.device,
                                         TORCH_DTYPES[self.config.vggt_dtype])
            if self.config.vggt_compile and self.device.type == "cuda":
                compile_blocks(self.model)
        return self.model

    def _phase(self, name: str) -> None:
        """Profiling only (`phase_seconds` set): wait for the device, add the time since the last phase to `name`."""
        if self.phase_seconds is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + now - self._phase_start
        self._phase_start = now

    def process(self, result: ShardResult) -> ShardResult:
        """Rewrite the shard with every sample's features (atomic) and update its task record; idempotent."""
        if not needs_features(result, self.checkpoint_sha256):
            return dataclasses.replace(result, vggt_skipped=True) if result.samples else result
        start = time.perf_counter()
        model = self.load()
        url = f"{self.config.output.rstrip('/')}/{result.name}"
        packed: dict[str, PackedFrame] = {}
        samples: list[StoredSample] = []
        for record in shard_io.iter_shard(url, lazy_frames=True, max_length=self.config.max_length):
            if isinstance(record, PackedFrame):
                packed[record.key] = record
            else:  # features of an earlier checkpoint are dropped here, replaced below
                samples.append(dataclasses.replace(record, vggt_features=None))
        frames = _FrameCache(packed)
        # one thread computes features ahead while this one writes the shard (frames as stored) and compresses features
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vggt")
        try:
            info = shard_io.write_shard(url, packed.values(),  # frames keep their stored bytes
                                        self._features_ahead(model, samples, frames, pool), self.config.zstd_level)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        seconds = time.perf_counter() - start
        log.info("%s: VGGT features for %d samples in %.1f s (%.2f samples/s)", result.name, len(samples), seconds,
                 len(samples) / max(seconds, 1e-9))
        result = dataclasses.replace(result, bytes=info.bytes, sha256=info.sha256, vggt=self.checkpoint_sha256,
                                     vggt_seconds=round(seconds, 3), vggt_skipped=False)
        write_task_record(self.config, result)
        return result

    def _features_ahead(self, model: VGGTAggregator, samples: list[StoredSample], frames: _FrameCache,
                        pool: ThreadPoolExecutor) -> Iterator[StoredSample]:
        """The samples in stored order with features, computed `vggt_batch_samples` at a time on `pool`; the first
        batches are submitted now, before the writer asks, and max(2, AHEAD_SAMPLES // vggt_batch_samples) stay in flight."""
        size = self.config.vggt_batch_samples
        batches = [samples[i:i + size] for i in range(0, len(samples), size)]
        ahead = max(2, AHEAD_SAMPLES // size)

        def submit(batch: list[StoredSample]) -> Future:
            return pool.submit(self.compute, model, [[frames.get(k) for k in s.frame_keys] for s in batch])

        futures = deque(submit(batch) for batch in batches[:ahead])

        def in_order() -> Iterator[StoredSample]:
            for i, batch in enumerate(batches):
                features = futures.popleft().result()
                if i + ahead < len(batches):
                    futures.append(submit(batches[i + ahead]))
                yield from (dataclasses.replace(s, vggt_features=f) for s, f in zip(batch, features))
        return in_order()

    @torch.inference_mode()
    def compute(self, model: VGGTAggregator, samples: Sequence[Sequence[CompactFrame]]) -> list[np.ndarray]:
        """Stored features of each sample (its frames oldest first), one aggregator call per input shape.
        Patch embedding (DINOv2, ~26 % of the FLOP) runs once per unique frame of the batch, not once per
        image: a sample shares most of its 9 history frames with its episode's neighbours."""
        start = self._phase_start = time.perf_counter()
        inputs = vggt_inputs(samples, self.device)
        self._phase("inputs")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, rows in enumerate(inputs.rows):
            by_shape.setdefault((len(rows), *inputs.images[rows[0]].shape), []).append(i)
        out: list[np.ndarray | None] = [None] * len(samples)
        dtype = TORCH_DTYPES[self.config.vggt_dtype]
        for members in by_shape.values():
            used = sorted({r for i in members for r in inputs.rows[i]})
            images = torch.stack([inputs.images[r] for r in used]).to(dtype)
            tokens = torch.cat([model.patch_tokens(chunk) for chunk in images.split(PATCH_EMBED_CHUNK)])
            self._phase("patch embed")
            position = {r: j for j, r in enumerate(used)}
            index = [[position[r] for r in inputs.rows[i]] for i in members]
            if self.device.type == "cuda" and len(members) < self.config.vggt_batch_samples:
                # a fixed batch size keeps compiled graphs (train.vggt.compile_blocks) valid on the short last batch
                index += index[-1:] * (self.config.vggt_batch_samples - len(members))
            patches = FramePatches(tokens[torch.tensor(index, device=tokens.device)], *images.shape[-2:])
            features = sample_features(model, patches, self.config.reference_frame)
            self._phase("blocks")
            for i, feature in zip(members, features):
                out[i] = to_storage(feature, self.config.vggt_dtype)
            self._phase("to host")
        self.compute_seconds += time.perf_counter() - start
        return out  # type: ignore[return-value]
