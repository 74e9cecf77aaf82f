"""Deep-verify throughput: samples/s per core on a synthetic build written directly with shard_io.

Realistic shape: 50-step episodes, 8 per shard (400 samples, 400 unique 490×644 frames on a 644² canvas,
smooth gradients + rectangles + 4×4-block noise), 9 images per sample (the original history policy),
~5k tokens per sample (9 × 529 image pads); zstd level = the build default. Prints a markdown table.

    python bench/verify_deep.py [--samples 10000] [--dir DIR (kept and reused)] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from prep.history import select_history
from prep.text import IMAGE_PAD_ID, rope_position_ids
from schemas import SCHEMA_VERSION
from schemas.config import BuildConfig
from schemas.manifest import Manifest, ShardRecord, Totals, read_manifest, write_manifest
from schemas.sample import CompactFrame, EncodedText, frame_key, safe_key
from schemas.stored import StoredSample
from shards_manifest.shard_io import write_shard
from shards_manifest.verify import verify_build

STEPS, EPISODES_PER_SHARD, HISTORY = 50, 8, 8
POOL_FRAMES = 32  # distinct contents; zstd sees each frame alone, so reuse does not change decode cost
VISION_START, VISION_END = 151652, 151653
GRID = (1, 46, 46)


def make_frame(rng: np.random.Generator, key: str, h: int = 490, w: int = 644) -> CompactFrame:
    y, x = np.linspace(0, 1, h, dtype=np.float32)[:, None, None], np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    a, b, c = (rng.uniform(-120, 120, 3).astype(np.float32) for _ in range(3))
    image = a * y + b * x + c + 128
    for _ in range(4):
        top, left = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        image[top:top + int(rng.integers(20, 200)), left:left + int(rng.integers(20, 200))] = rng.uniform(0, 255, 3)
    noise = np.repeat(np.repeat(rng.integers(-6, 7, (h // 4 + 1, w // 4 + 1, 3)), 4, 0), 4, 1)[:h, :w]
    pixels = np.clip(image + noise, 0, 255).astype(np.uint8)
    return CompactFrame(key, pixels, 644, 644, (644 - h) // 2, (644 - w) // 2)


@functools.cache
def frame_pool() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(12345)
    return tuple(make_frame(rng, "pool").pixels for _ in range(POOL_FRAMES))


def token_template(num_images: int = HISTORY + 1, text_before: int = 120, text_after: int = 110,
                   labelled: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids with -1 where random text goes, label mask, segment_ids, position_ids) of a ~5k-token sample."""
    pads = GRID[1] * GRID[2] // 4
    parts = [np.full(text_before, -1)]
    for _ in range(num_images):
        parts += [[VISION_START], np.full(pads, IMAGE_PAD_ID), [VISION_END], np.full(8, -1)]
    parts += [np.full(text_after + labelled, -1)]
    ids = np.concatenate(parts).astype(np.int64)
    mask = np.zeros(len(ids), bool)
    mask[-labelled:] = True
    segments = np.zeros(len(ids), np.int64)
    segments[-labelled:] = np.repeat([1, 2, 3, 4], labelled // 4)
    positions = rope_position_ids(np.where(ids < 0, 0, ids), [GRID] * num_images)
    return ids, mask, segments, positions


def write_synthetic_shard(folder: str, index: int, level: int) -> ShardRecord:
    rng = np.random.default_rng(index)
    template_ids, mask, segments, positions = token_template()
    frames, samples = [], []
    for e in range(EPISODES_PER_SHARD):
        episode = f"ep_{index:04d}_{e}"
        keys = [frame_key(f"{episode}/step_{s}.png") for s in range(STEPS)]
        pool = frame_pool()
        frames += [CompactFrame(key, pool[int(rng.integers(POOL_FRAMES))], 644, 644, 77, 0) for key in keys]
        for step in range(STEPS):
            ids = np.where(template_ids < 0, rng.integers(0, 150000, len(template_ids)), template_ids)
            tokens = EncodedText(ids, np.where(mask, ids, -100), segments, positions)
            sample_id = f"{episode}/step_{step}_MOVE_FORWARD.png"
            samples.append(StoredSample(safe_key(sample_id), sample_id, episode,
                                        tuple(keys[p] for p in select_history(step, HISTORY)), 1, tokens))
    rng.shuffle(samples)  # mixed inside the shard, as the build does
    name = f"shard-{index:06d}.tar"
    info = write_shard(f"{folder}/{name}", frames, samples, level)
    visual = len(samples) * int(np.count_nonzero(template_ids == IMAGE_PAD_ID))
    return ShardRecord(name, EPISODES_PER_SHARD, info.samples, info.frames, info.bytes, info.sha256,
                       info.tokens - visual, visual)


def make_build(folder: Path, num_samples: int, workers: int) -> Manifest:
    if (folder / "manifest.json").exists():
        return read_manifest(str(folder / "manifest.json"))
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_samples // (STEPS * EPISODES_PER_SHARD))
    level = BuildConfig().zstd_level
    with ProcessPoolExecutor(workers) as pool:
        shards = tuple(pool.map(write_synthetic_shard, [str(folder)] * num_shards, range(num_shards),
                                [level] * num_shards))
    sums = {k: sum(getattr(s, k) for s in shards) for k in ("episodes", "samples", "frames", "bytes", "text_tokens",
                                                              "visual_tokens")}
    manifest = Manifest(SCHEMA_VERSION, "bench/verify_deep.py", {"zstd_level": level, "max_length": 8192},
                        "0" * 64, "0" * 64, "0" * 64, "pad", HISTORY, None, shards,
                        Totals(**sums, source_image_bytes=0), {})
    write_manifest(str(folder / "manifest.json"), manifest)
    return manifest


def warm_page_cache(folder: Path) -> float:
    """Read every shard once (untimed for the table): the rows then measure CPU, not this disk (seconds returned)."""
    start = time.perf_counter()
    for path in sorted(folder.glob("shard-*.tar")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - start


def measure(folder: Path, deep: bool, workers: int, executor: str) -> dict:
    start = time.perf_counter()
    cpu_start = os.times()
    report = verify_build(str(folder), deep=deep, workers=workers, executor=executor)
    seconds, cpu = time.perf_counter() - start, os.times()
    assert report.ok, report.problems[:5]
    cpu_s = (cpu.user - cpu_start.user) + (cpu.system - cpu_start.system)
    cpu_s += (cpu.children_user - cpu_start.children_user) + (cpu.children_system - cpu_start.children_system)
    cores = min(workers, len(os.sched_getaffinity(0)))
    rate = report.num_samples / seconds
    return {"mode": "deep" if deep else "quick", "executor": executor, "workers": workers,
            "samples": report.num_samples, "seconds": seconds, "samples/s": rate, "samples/s per core": rate / cores,
            "samples per CPU-second": report.num_samples / max(cpu_s, 1e-9), "MB/s": report.num_bytes / seconds / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=None, help="build folder (kept; reused when it has a manifest)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="verify-deep-bench-")) / "build"
    start = time.perf_counter()
    manifest = make_build(folder, args.samples, max(args.workers))
    t = manifest.totals
    print(f"build: {folder}: {len(manifest.shards)} shards, {t.samples} samples, {t.frames} frames, "
          f"{t.bytes / 1e9:.2f} GB, {t.bytes / t.samples / 1e3:.0f} kB/sample ({time.perf_counter() - start:.0f} s)")
    cold_s = warm_page_cache(folder)
    print(f"first read of {t.bytes / 1e9:.2f} GB: {cold_s:.1f} s ({t.bytes / cold_s / 1e6:.0f} MB/s; cached if just built)")
    rows = [measure(folder, False, max(args.workers), "thread")]
    rows += [measure(folder, True, w, executor) for w in args.workers for executor in ("thread", "process")
             if w > 1 or executor == "thread"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {len(os.sched_getaffinity(0))} CPUs available, page cache warm, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
