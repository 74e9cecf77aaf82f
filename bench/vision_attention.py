"""Qwen2.5-VL-7B vision tower forward (random weights, no_grad: the tower is frozen) with transformers' SDPA loop
over windows vs the fused paths of train.vision_attention; ms per forward and per layer, speed-up, and the largest
difference from the SDPA output. Prints markdown tables.

    python bench/vision_attention.py                   # 9 frames of 644², depth 32, bf16 on CUDA
    python bench/vision_attention.py --small           # CPU smoke test: 2 layers, 2 frames of 224², float32
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from train.vision_attention import enable_fused_vision_attention

PATCH = 14


def tower_config(depth: int) -> Qwen2_5_VLVisionConfig:
    """Qwen2.5-VL-7B's vision config; full attention every 8th layer (the last of each group of 8)."""
    full = [i for i in range(depth) if i % 8 == 7] or [depth - 1]
    return Qwen2_5_VLVisionConfig(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                  out_hidden_size=3584, window_size=112, patch_size=PATCH, spatial_merge_size=2,
                                  temporal_patch_size=2, fullatt_block_indexes=full)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(tower, pixels, grid_thw, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(first-call s, ms per forward over `repeats` calls after one warm-up, pooled output)."""
    device = pixels.device
    sync(device)
    start = time.perf_counter()
    out = tower(pixels, grid_thw=grid_thw).pooler_output
    sync(device)
    first_s = time.perf_counter() - start
    tower(pixels, grid_thw=grid_thw)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        tower(pixels, grid_thw=grid_thw)
    sync(device)
    return first_s, (time.perf_counter() - start) * 1e3 / repeats, out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2 layers, 2 frames of 224², float32 (CPU smoke)")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--image", type=int, default=644, help="square image side in pixels (multiple of 28)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--paths", default="sdpa,auto,vln_flash_varlen_sdpa_masked",
                        help="comma-separated paths for enable_fused_vision_attention; the first is the baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default bfloat16 on CUDA, float32 elsewhere")
    args = parser.parse_args()
    if args.small:
        args.depth, args.frames, args.image, args.repeats = 2, 2, 224, 1
    if args.image % (2 * PATCH):
        parser.error(f"--image must be a multiple of {2 * PATCH}, got {args.image}")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel(tower_config(args.depth)).to(args.dtype).eval()
    side = args.image // PATCH
    grid_thw = torch.tensor([[1, side, side]] * args.frames, device=device)
    pixels = torch.randn(args.frames * side * side, 3 * 2 * PATCH * PATCH, device=device, dtype=args.dtype)
    print(f"{args.frames} frames of {args.image}² ({side}×{side} = {side * side} patches each, "
          f"{pixels.shape[0]} tokens), depth {args.depth}, {args.dtype}, {device}, torch {torch.__version__}\n")
    print("| path | first call (s) | ms / forward | ms / layer | speed-up | max abs diff vs baseline |")
    print("|---|---|---|---|---|---|")
    baseline_ms = baseline_out = None
    for path in args.paths.split(","):
        name = enable_fused_vision_attention(tower, path)
        first_s, ms, out = time_forward(tower, pixels, grid_thw, args.repeats)
        baseline_ms = baseline_ms or ms
        baseline_out = out if baseline_out is None else baseline_out
        diff = (out.float() - baseline_out.float()).abs().max().item()
        print(f"| {path} → {name} | {first_s:.2f} | {ms:.1f} | {ms / args.depth:.2f} | "
              f"{baseline_ms / ms:.1f}× | {diff:.2e} |")


if __name__ == "__main__":
    main()
