"""VGGT feature precompute speed: the original's streaming pass at batch 1 vs the batched block-causal pass
(B samples per call, flex or SDPA attention), and the build stage end to end (shard read → features →
shard rewrite), with random weights of the chosen shape. Prints a markdown table: ms and samples/s per GPU,
TFLOP/s against a counted FLOP figure, % of the bf16 peak, peak memory, stored bytes per sample.

    python bench/vggt_features.py                                   # VGGT-1B, 9 × 644², on the GPU (compiled)
    python bench/vggt_features.py --no-compile --batch-sizes 16      # eager rows
    python bench/vggt_features.py --shape tiny --size 224 --device cpu --dtype float32 --batch-sizes 2 \\
        --backends sdpa --iters 1 --warmup 0                           # CPU smoke test
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prep.history import select_history
from prep.shard_task import ShardResult
from prep.vggt_stage import FLOP_PER_SAMPLE, MODEL_CONFIGS, TORCH_DTYPES, FeatureStage
from schemas import stored
from schemas.config import BuildConfig
from schemas.sample import CompactFrame, EncodedText
from shards_manifest import shard_io
from train.vggt import VGGTAggregator, VGGTConfig, compile_blocks, sample_features

H200_BF16_PEAK_FLOPS = 790e12  # dense bf16 matmul, measured on an H200


def count_flops(c: VGGTConfig, num_frames: int, size: int) -> float:
    """Matmul FLOP of one sample: patch embed, DINOv2 (if any), depth-1 frame + global blocks, block-causal."""
    patches = (size // c.patch_size) ** 2
    tokens = 1 + c.num_register_tokens + patches  # camera (DINOv2: cls) + registers + patches, per frame
    linear = 2 * (4 + 2 * c.mlp_ratio) * c.embed_dim ** 2  # qkv, proj, mlp: per token and block
    pair = 4 * c.embed_dim  # QKᵀ + AV: per (query, key) pair and block
    per_frame_block = num_frames * (tokens * linear + tokens ** 2 * pair)
    causal_pairs = num_frames * (num_frames + 1) // 2 * tokens ** 2  # frame s attends to frames 0..s
    global_block = num_frames * tokens * linear + causal_pairs * pair
    flops = num_frames * patches * 2 * 3 * c.patch_size ** 2 * c.embed_dim
    if c.patch_embed == "dinov2":
        flops += c.dinov2_depth * per_frame_block
    return flops + max(c.depth - 1, 1) * (per_frame_block + global_block)


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> VGGTAggregator:
    """Random weights built on the device; LayerScale 0.1 keeps 48 random blocks finite in bf16."""
    with torch.device(device):
        model = VGGTAggregator(MODEL_CONFIGS[shape]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma", "camera_token", "register_token")):
                param.copy_(torch.randn_like(param) * 0.1 if "token" in name else torch.full_like(param, 0.1))
    return model.to(dtype).eval().requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / max(iters, 1)


def measure(model, frames: torch.Tensor, method: str, backend: str, args, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        seconds = seconds_per_call(lambda: sample_features(model, frames, "last", method, backend),
                                   args.iters, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"method": method, "backend": backend, "batch": frames.shape[0], "seconds": seconds / frames.shape[0],
            "peak_gib": peak}


def synthetic_shard(num_samples: int, size: int) -> tuple[list[CompactFrame], list[stored.StoredSample]]:
    """One episode of `num_samples` steps with 640×480-like content in pad mode, each sample its 9-image history."""
    content_h = round(480 * size / 640 / 14) * 14
    rows = np.linspace(0, 255, content_h, dtype=np.float32)[:, None, None]
    rng = np.random.default_rng(0)
    frames = []
    for i in range(num_samples):
        noise = rng.normal(0, 12, (content_h, size, 3)).astype(np.float32)
        pixels = np.clip(rows + noise + 7 * i, 0, 255).astype(np.uint8)
        frames.append(CompactFrame(f"f{i:05d}", pixels, size, size, (size - content_h) // 2, 0))
    tokens = EncodedText(np.arange(1, 5), np.array([-100, -100, 3, 4]), np.array([0, 0, 1, 4]),
                         np.zeros((3, 4), dtype=np.int64))
    samples = [stored.StoredSample(f"s{j:05d}", f"s{j:05d}", "ep", tuple(f"f{i:05d}" for i in select_history(j, 8)),
                                   0, tokens) for j in range(num_samples)]
    return frames, samples


def measure_stage(model, args, device, batch: int) -> dict:
    """The build stage on one synthetic shard: read, features in `batch`-sample calls, rewrite (timed 2nd run;
    a 3rd run with the device synchronised after each phase of the feature thread gives the phase split)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = BuildConfig(output=tmp, vggt_model="random-weights", vggt_config=args.shape, vggt_dtype=args.dtype,
                             vggt_batch_samples=batch, reference_frame="last")
        frames, samples = synthetic_shard(args.stage_samples, args.size)
        stage = FeatureStage(config, "0" * 64, device=str(device))
        stage.model = model  # random weights: no checkpoint file to load or hash
        timings = []
        for run in range(3):  # the first run compiles for this batch size; the third times phases
            info = shard_io.write_shard(f"{tmp}/shard-000000.tar", frames, samples)
            result = ShardResult(0, "shard-000000.tar", config.output_hash(), samples=len(samples),
                                 frames=len(frames), bytes=info.bytes, sha256=info.sha256)
            start, stage.compute_seconds = time.perf_counter(), 0.0
            stage.phase_seconds = {} if run == 2 else None
            done = stage.process(result)
            timings.append(time.perf_counter() - start)
            if run == 1:
                compute_share, added = stage.compute_seconds / timings[-1], done.bytes - info.bytes
    phases = {name: seconds / len(samples) for name, seconds in stage.phase_seconds.items()}
    return {"samples_per_s": len(samples) / timings[1], "bytes_per_sample": added / len(samples),
            "compute_share": compute_share, "phase_ms": {k: round(v * 1e3, 1) for k, v in phases.items()},
            "profiled_samples_per_s": len(samples) / timings[2]}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(MODEL_CONFIGS), default="vggt1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="bfloat16")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=644, help="square frame side in pixels (multiple of 14)")
    parser.add_argument("--batch-sizes", default="2,4,8,16", help="samples per batched call")
    parser.add_argument("--backends", default="sdpa,flex")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stage-samples", type=int, default=64, help="samples in the stage's shard (0: skip)")
    parser.add_argument("--stage-batches", default="", help="samples per call in the stage, comma-separated "
                        "(default: the fastest batched row's)")
    parser.add_argument("--skip-streaming", action="store_true", help="no streaming rows")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile every block (train.vggt.compile_blocks); default: on a GPU, like the stage")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_FLOPS / 1e12)
    return parser.parse_args()


def report(rows: list[dict], flops: float, peak: float, reference: bool) -> None:
    """`reference`: also the % of peak for the issue's 5.6e13 FLOP per VGGT-1B sample."""
    print("| method | attention | batch | ms/sample | samples/s | TFLOP/s (counted) | % peak (counted) "
          f"| % peak ({FLOP_PER_SAMPLE:.1e} FLOP) | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rate = 1 / r["seconds"]
        ref = f"{100 * FLOP_PER_SAMPLE * rate / peak:.1f}" if reference else "—"
        print(f"| {r['method']} | {r['backend']} | {r['batch']} | {r['seconds'] * 1e3:.1f} | {rate:.2f} | "
              f"{flops * rate / 1e12:.3g} | {100 * flops * rate / peak:.1f} | {ref} | {r['peak_gib']:.1f} |")


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), TORCH_DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# VGGT precompute — {datetime.date.today()}, {name}, torch {torch.__version__}, commit {commit()}")
    model = random_model(args.shape, device, dtype)
    if args.compile is None:
        args.compile = device.type == "cuda"  # the build stage's default (BuildConfig.vggt_compile)
    if args.compile:
        compile_blocks(model)
    flops = count_flops(model.config, args.frames, args.size)
    print(f"shape {args.shape}, {args.frames} frames of {args.size}², {args.dtype}, compiled blocks: "
          f"{args.compile}; counted {flops:.3e} FLOP/sample")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    frames = torch.rand(max(sizes), args.frames, 3, args.size, args.size, device=device).to(dtype)
    rows = [] if args.skip_streaming else [measure(model, frames[:b], "streaming", "kv-cache", args, device)
                                           for b in [1] + sizes]
    for backend in args.backends.split(","):
        rows += [measure(model, frames[:b], "batched", backend, args, device) for b in sizes]
    report(rows, flops, args.peak_tflops * 1e12, args.shape == "vggt1b" and args.size == 644 and args.frames == 9)
    if args.stage_samples:
        best = min((r for r in rows if r["method"] == "batched"), key=lambda r: r["seconds"])
        for batch in [int(b) for b in args.stage_batches.split(",") if b] or [best["batch"]]:
            stage = measure_stage(model, args, device, batch)
            print(f"build stage ({args.stage_samples}-sample shard, batch {batch}, patch embed once per unique "
                  f"frame): {stage['samples_per_s']:.2f} samples/s per device, "
                  f"{stage['bytes_per_sample'] / 1e6:.2f} MB of stored features per sample (zstd); feature thread "
                  f"busy {100 * stage['compute_share']:.0f} % of the time; synchronised per phase (ms/sample): "
                  f"{stage['phase_ms']} ({stage['profiled_samples_per_s']:.2f} samples/s)")

    with torch.inference_mode():  # last: with compiled blocks, the streaming pass adds graphs of its own
        a = sample_features(model, frames[:1], "last", "streaming").float()
        b = sample_features(model, frames[:2], "last", "batched")[:1].float()
    print(f"\nbatched vs streaming, same sample: max |Δ| / max |x| = {(a - b).abs().max() / a.abs().max():.2e}")


if __name__ == "__main__":
    main()
