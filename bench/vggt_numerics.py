"""How far the VGGT precompute paths are from a float32 eager reference (random VGGT-1B-shaped weights):
eager bf16 (the trainer's online path), compiled bf16 (the build stage), both batched, plus the bf16 streaming
pass (the original's way). Prints a markdown table of relative errors of the stored feature.

    python bench/vggt_numerics.py [--samples 2] [--size 644]      # on the GPU machine
    python bench/vggt_numerics.py --shape tiny --size 56 --device cpu   # smoke test
"""
from __future__ import annotations

import argparse
import copy

import torch
from vggt_features import (
    random_model,  # this folder (scripts run as `python bench/...`)
)

from train.vggt import compile_blocks, sample_features


def relative_errors(found: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |Δ| / max |ref|, mean |Δ| / mean |ref|) in float32."""
    delta = (found.float() - reference).abs()
    return (delta.max() / reference.abs().max()).item(), (delta.mean() / reference.abs().mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="vggt1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=644)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference_model = random_model(args.shape, device, torch.float32)
    frames = torch.rand(args.samples, args.frames, 3, args.size, args.size, device=device)
    with torch.inference_mode():
        reference = sample_features(reference_model, frames, "last").float()
        bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)
        rows = {"eager bf16, batched (trainer, online VGGT)": sample_features(bf16, frames.bfloat16(), "last"),
                "eager bf16, streaming (the original)": sample_features(bf16, frames.bfloat16(), "last", "streaming")}
        rows["compiled bf16, batched (build stage)"] = sample_features(compile_blocks(bf16), frames.bfloat16(), "last")
    print(f"{args.shape}, {args.samples} samples × {args.frames} frames of {args.size}², reference: float32 eager "
          f"batched (max |x| = {reference.abs().max().item():.3g})")
    print("| path | max abs error / max abs value | mean abs error / mean abs value |\n|---|---:|---:|")
    for name, found in rows.items():
        worst, mean = relative_errors(found, reference)
        print(f"| {name} | {worst:.2e} | {mean:.2e} |")


if __name__ == "__main__":
    main()
