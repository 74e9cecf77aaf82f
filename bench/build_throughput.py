"""Build throughput and storage: unique frames/s per CPU core end to end, bytes per sample, ratio to
the source PNG bytes, and where a task's time goes. Prints a markdown table.

    python bench/build_throughput.py [--episodes 16] [--executor local|ray]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from tables import print_metrics  # bench/ (scripts run as `python bench/...`)

from prep.build import build
from prep.episodes import read_samples
from prep.frames import load_compact_frame, qwen_grid
from prep.sample_data import ensure_tokenizer, write_sample_episodes
from prep.shard_task import text_encoder
from schemas.config import BuildConfig
from shards_manifest import shard_io


def stage_breakdown(episodes: Path, model_path: str, num_samples: int = 40) -> dict[str, float]:
    """ms per unit for the three stages of a task, measured separately on the same data."""
    samples, _, _ = read_samples(episodes, 8)
    samples = samples[:num_samples]
    paths = sorted({p for s in samples for p in s.frame_paths})
    start = time.perf_counter()
    frames = {p: load_compact_frame(p, "k", "pad") for p in paths}
    decode_ms = (time.perf_counter() - start) * 1e3 / len(paths)
    encoder = text_encoder(model_path)
    start = time.perf_counter()
    for s in samples:
        encoder.encode_text(s, [qwen_grid(644, 644)] * len(s.frame_paths))
    text_ms = (time.perf_counter() - start) * 1e3 / len(samples)
    import zstandard

    from schemas.stored import delta_filter
    compressor = zstandard.ZstdCompressor(level=1)
    start = time.perf_counter()
    for f in frames.values():
        compressor.compress(delta_filter(f.pixels).tobytes())
    compress_ms = (time.perf_counter() - start) * 1e3 / len(frames)
    return {"png decode + resize (ms/frame)": decode_ms, "tokenise + mRoPE (ms/sample)": text_ms,
            "delta + zstd-1 (ms/frame)": compress_ms}


def decode_counts(episodes: Path, unique_frames: int, epochs: int = 3) -> list[tuple[str, str]]:
    """Image decodes for `epochs` epochs: the original (9 per sample), our online path (distinct images per
    sample), the build (each unique frame once)."""
    samples, _, _ = read_samples(episodes, 8)
    original = epochs * sum(len(s.frame_paths) for s in samples)
    online = epochs * sum(len(set(s.frame_paths)) for s in samples)
    return [(f"image decodes, {epochs} epochs: original / online path / build",
             f"{original} / {online} / {unique_frames} ({original / unique_frames:.0f}× / {online / unique_frames:.0f}× saved)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--executor", default="local", choices=("local", "ray"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vln-bench-build-"))
    try:
        episodes = write_sample_episodes(work / "episodes", num_episodes=args.episodes, seed=1)
        model_path = str(ensure_tokenizer())
        text_encoder(model_path)  # tokenizer load (~2 s) is per process, not per frame: keep it out
        config = BuildConfig(input=str(episodes), model_path=model_path, output=str(work / "out"),
                             executor=args.executor, episodes_per_shard=4, progress=False, num_cpus=2)
        start = time.perf_counter()
        summary = build(config)
        wall_s = time.perf_counter() - start
        manifest = shard_io.read_manifest(f"{config.output}/manifest.json")
        cores = 1 if args.executor == "local" else 2
        rows = [
            ("executor", args.executor), ("episodes", manifest.totals.episodes), ("samples", manifest.totals.samples),
            ("unique frames", manifest.totals.frames), ("wall time (s)", f"{wall_s:.2f}"),
            ("unique frames/s per core (wall)", f"{manifest.totals.frames / wall_s / cores:.1f}"),
            ("unique frames/s per core (task time)", f"{summary['frames_per_task_second']:.1f}"),
            ("shard bytes per sample (kB)", f"{manifest.totals.bytes / manifest.totals.samples / 1e3:.0f}"),
            ("shard bytes / source PNG bytes", f"{manifest.totals.bytes / manifest.totals.source_image_bytes:.2f}"),
            ("per-sample storage would be (× unique-frame storage)",
             f"{manifest.totals.samples * 9 / manifest.totals.frames:.1f}"),
        ]
        rows += decode_counts(episodes, manifest.totals.frames)
        rows += [(k, f"{v:.2f}") for k, v in stage_breakdown(episodes, model_path).items()]
        print_metrics(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
