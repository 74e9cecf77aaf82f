"""Training-step benchmark: JanusVLN at tiny or Qwen2.5-VL-7B shape (random weights, no download), N steps of
forward + backward + optimizer on batches from synthetic uint8 frames (9×644² per sample, ~5.1k tokens), a
shard build, or the online path; prints step time (median/p10/p90), samples/s, data-wait share, a breakdown
(pixel decode, vision tower, VGGT, LLM forward, backward, optimizer; CUDA events on GPU) and peak GPU memory.

    python bench/train_step.py --shape 7b --data synthetic --vggt precomputed --vision-attn flex --steps 20
    torchrun --nproc_per_node 8 bench/train_step.py --shape 7b --engine deepspeed --data shards --manifest M
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from prep.frames import qwen_grid
from schemas.sample import CompactFrame
from train.collate import BOOKKEEPING_KEYS, Collator
from train.loss import LossConfig, compute_loss
from train.model import REAL_VISION_IDS, JanusConfig, JanusVLN, resolve_attn_implementation, tiny_qwen_config
from train.pixels import PixelDecoder
from train.vggt import VGGTAggregator, VGGTConfig, tiny_config

TEXT_PREFIX, ANSWER = 330, 120  # tokens before the images and labelled answer tokens (real prompts: ~5.1k total)


def qwen_7b_config() -> Qwen2_5_VLConfig:
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    vision = dict(depth=32, hidden_size=1280, num_heads=16, out_hidden_size=3584, intermediate_size=3420,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **REAL_VISION_IDS)


def build_model(shape: str, vggt: str, device: torch.device, dtype: torch.dtype) -> JanusVLN:
    """Random weights, created on `device` (a 7B init on the GPU takes seconds, on the CPU minutes)."""
    janus = JanusConfig(lam=0.0 if vggt == "none" else 0.2,
                        **({"vggt_dim": 128, "merger_hidden": 128} if shape == "tiny" else {}))
    cfg = tiny_qwen_config() if shape == "tiny" else qwen_7b_config()
    cfg._attn_implementation = resolve_attn_implementation("auto")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            qwen = Qwen2_5_VLForConditionalGeneration(cfg)
            aggregator = None
            if vggt == "online":
                aggregator = VGGTAggregator(tiny_config() if shape == "tiny" else VGGTConfig())
    finally:
        torch.set_default_dtype(previous)
    return JanusVLN(qwen, janus, aggregator)


class SyntheticSamples(torch.utils.data.IterableDataset):
    """Per-sample dicts as the shard stream yields them: `images` distinct 640×480-like frames padded onto
    `size`² canvases, ~5.1k tokens at 9×644², a few pre-generated samples cycled (data cost ≈ collate only)."""

    def __init__(self, images: int, size: int, vggt_dim: int | None, pool: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        content_h = round(size * 3 / 4 / 14) * 14
        _, gh, gw = qwen_grid(size, size)
        per_image = [REAL_VISION_IDS["vision_start_token_id"]] + [REAL_VISION_IDS["image_token_id"]] * (
            gh * gw // 4) + [REAL_VISION_IDS["vision_end_token_id"]]
        self.samples = []
        for s in range(pool):
            ids = rng.integers(0, 150000, TEXT_PREFIX).tolist() + per_image * images
            answer = rng.integers(0, 150000, ANSWER).tolist()
            length = len(ids) + len(answer)
            frames = [CompactFrame(f"s{s}f{i}", rng.integers(0, 256, (content_h, size, 3), dtype=np.uint8), size,
                                   size, (size - content_h) // 2, 0) for i in range(images)]
            sample = {"__key__": f"s{s}", "sample_id": f"s{s}", "input_ids": np.array(ids + answer),
                      "labels": np.array([-100] * len(ids) + answer), "frames": frames,
                      "segment_ids": np.array([0] * len(ids) + [1 + 4 * i // ANSWER for i in range(ANSWER)]),
                      "position_ids": np.tile(np.arange(length), (3, 1)), "action_label": np.int64(s % 4)}
            if vggt_dim:
                sample["vggt_features"] = rng.standard_normal((gh * gw, vggt_dim)).astype(np.float16)
            self.samples.append(sample)
        self.expected_tokens = length

    def __iter__(self):
        return itertools.cycle(self.samples)


class Timer:
    """Named regions per step: CUDA events on GPU (read after one sync per step), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.open: dict[str, object] = {}
        self.pairs: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self.open[name] = self._mark()

    def stop(self, name: str) -> None:
        self.pairs.append((name, self.open.pop(name), self._mark()))

    @contextlib.contextmanager
    def region(self, name: str):
        self.start(name)
        yield
        self.stop(name)

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop(name))

    def collect(self) -> dict[str, float]:
        """Seconds per region since the last collect (sums repeated regions)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, a, b in self.pairs:
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        self.pairs = []
        return out


def make_loader(args: argparse.Namespace, vggt_dim: int | None) -> tuple[torch.utils.data.DataLoader, int | None]:
    if args.data == "synthetic":
        dataset, expected = SyntheticSamples(args.images, args.image_size, vggt_dim), None
        expected = dataset.expected_tokens
    elif args.data == "shards":
        from train.stream import ShardStream, StreamConfig
        dataset, expected = ShardStream(args.manifest, StreamConfig(batch_size=args.batch, num_workers=args.workers,
                                                                    num_open_shards=3)), None
    else:
        from train.online import OnlineDataset
        dataset, expected = OnlineDataset(args.episodes, args.model_path), None
    workers = args.workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, collate_fn=Collator(), num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None)
    return loader, expected


def run_torch(args: argparse.Namespace, model: JanusVLN, device: torch.device) -> list[dict]:
    """One process, plain torch AdamW over the trainable parameters: per-step wall time, data wait, regions."""
    vggt_dim = model.janus_config.vggt_dim if args.vggt == "precomputed" else None
    loader, expected = make_loader(args, vggt_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    timer, decoder, steps = Timer(device), PixelDecoder(), []
    for module, name in ((model.qwen.model.visual, "vision_fwd"), (model.qwen.model.language_model, "llm_fwd")):
        timer.hook(module, name)
    if model.vggt is not None:
        timer.hook(model.vggt, "vggt_fwd")
    iterator = iter(loader)
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = next(iterator)
        wait = time.perf_counter() - start
        tokens = int(batch["input_ids"].shape[1])
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
        with timer.region("pixel_decode"):
            decoded = decoder(batch)
        if "vggt_features" in decoded or args.vggt == "none":
            decoded.pop("images_vggt", None)
        with timer.region("forward_total"):
            loss = compute_loss(model(**decoded), decoded, LossConfig(), step).loss
        with timer.region("backward"):
            loss.backward()
        with timer.region("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        regions = timer.collect()
        steps.append({"step_s": time.perf_counter() - start, "wait_s": wait, "tokens": tokens,
                      "expected_tokens": expected, **regions})
    return steps[args.warmup:]


def run_deepspeed(args: argparse.Namespace, model: JanusVLN) -> list[dict]:
    """Through train.launch (JanusTrainer + the given DeepSpeed JSON), shards only; step-level numbers from its
    step records (time, data wait; samples/s per GPU), no per-part breakdown."""
    from train.callbacks import StepLogCallback
    from train.launch import run
    output = tempfile.mkdtemp(prefix="bench_train_step_")
    config = {"data": {"manifest": args.manifest},
              "training": {"output_dir": output, "per_device_train_batch_size": args.batch,
                           "bf16": torch.cuda.is_available(),
                           "max_steps": args.warmup + args.steps, "save_strategy": "no", "report_to": "none",
                           "logging_steps": 10**6, "disable_tqdm": True, "dataloader_num_workers": args.workers,
                           "gradient_checkpointing": args.grad_ckpt, "learning_rate": 1e-5},
              "deepspeed": args.deepspeed}
    trainer = run(config, model=model)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepLogCallback))
    records = [r for r in callback.records if r["event"] == "step"][args.warmup:]
    return [{"step_s": r["step_time_s"], "wait_s": r["data_wait_s"], "samples": r["samples"]} for r in records]


def summarize_steps(args: argparse.Namespace, steps: list[dict]) -> dict:
    times = sorted(s["step_s"] for s in steps)
    median = statistics.median(times)
    result = {"shape": args.shape, "engine": args.engine, "data": args.data, "vggt": args.vggt, "batch": args.batch,
              "grad_ckpt": args.grad_ckpt, "vision_attn": args.vision_attn, "steps_timed": len(steps),
              "step_s_median": median, "step_s_p10": float(np.percentile(times, 10)),
              "step_s_p90": float(np.percentile(times, 90)), "samples_per_s": args.batch / median,
              "data_wait_share": sum(s["wait_s"] for s in steps) / sum(times)}
    for name in ("pixel_decode", "vision_fwd", "vggt_fwd", "llm_fwd", "forward_total", "backward", "optimizer"):
        values = [s[name] for s in steps if name in s]
        if values:
            result[f"{name}_s"] = statistics.median(values)
    if "tokens" in steps[0]:
        result["tokens_per_sample"] = steps[0]["tokens"]
        result["expected_tokens_per_sample"] = steps[0]["expected_tokens"]
    if torch.cuda.is_available():
        result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    parser.add_argument("--deepspeed", default="configs/zero3.json")
    parser.add_argument("--data", choices=("synthetic", "shards", "online"), default="synthetic")
    parser.add_argument("--manifest", help="shard build manifest.json (--data shards)")
    parser.add_argument("--episodes", help="episode folder (--data online)")
    parser.add_argument("--model-path", help="tokenizer folder (--data online)")
    parser.add_argument("--vggt", choices=("online", "precomputed", "none"), default="precomputed")
    parser.add_argument("--vision-attn", choices=("sdpa", "flex", "auto"), default="sdpa")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--images", type=int, default=9, help="synthetic: images per sample")
    parser.add_argument("--image-size", type=int, default=644, help="synthetic: canvas side in px")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args()
    device = torch.device("cpu")
    if torch.cuda.is_available():  # one process per GPU under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, args.vggt, device, dtype)
    if args.vision_attn != "sdpa":
        from train.vision_attention import FLEX, enable_fused_vision_attention
        enable_fused_vision_attention(model, FLEX if args.vision_attn == "flex" else "auto")
    if args.grad_ckpt and args.engine == "torch":
        model.activation_checkpointing_enable()
    model.train()
    steps = run_torch(args, model, device) if args.engine == "torch" else run_deepspeed(args, model)
    result = summarize_steps(args, steps)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for key, value in result.items():
        print(f"| {key:<{width}} | {value:.4g} |" if isinstance(value, float) else f"| {key:<{width}} | {value} |")


if __name__ == "__main__":
    main()
