"""VGGT-1B aggregator as JanusVLN uses it (SPEC §4): frames in [0, 1] -> per-block (frame ‖ global) tokens,
global attention block-causal over frames. Two equal ways to run it: `forward_frame` streams one frame
at a time with a KV cache (the original), `forward` does all frames of many samples in one masked pass.
`sample_features` gives the kept feature: block depth-2, patch tokens, last processed frame
((B, 2116, 2048) for 644² input). Weights load by name from the official checkpoint (`aggregator.*`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from schemas.errors import SchemaError
from train.vggt_layers import Block, ConvPatchEmbed, DinoV2, KeyValue, RopeTables, rope_tables

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_PREFIXES = ("camera_head.", "point_head.", "depth_head.", "track_head.")
REFERENCE_FRAMES = ("first", "last")


@dataclass(frozen=True)
class VGGTConfig:
    """Aggregator shape. `dinov2_*` describe the ViT used when `patch_embed == "dinov2"` (ViT-L/14)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_embed: str = "dinov2"
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    qk_norm: bool = True
    dinov2_depth: int = 24
    dinov2_heads: int = 16

    def __post_init__(self) -> None:
        if self.patch_embed not in ("dinov2", "conv"):
            raise SchemaError("VGGTConfig", "patch_embed", "'dinov2' or 'conv'", self.patch_embed)
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise SchemaError("VGGTConfig", "embed_dim", f"a multiple of 4·num_heads={4 * self.num_heads}",
                              self.embed_dim)
        for key in ("img_size", "patch_size", "depth", "num_heads"):
            if getattr(self, key) < 1:
                raise SchemaError("VGGTConfig", key, "a positive integer", getattr(self, key))


def vggt1b() -> VGGTConfig:
    """The VGGT-1B aggregator (DINOv2-L/14 + 4 registers, 24 + 24 blocks, dim 1024, 16 heads)."""
    return VGGTConfig()


def tiny_config() -> VGGTConfig:
    """The tiny aggregator of the golden fixtures (`aggregator_tiny_state_dict.safetensors`)."""
    return VGGTConfig(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, patch_embed="conv")


class FramePatches(NamedTuple):
    """Patch tokens of B samples' frames, computed beforehand by `VGGTAggregator.patch_tokens` (e.g. once
    per unique frame of a batch), with the image size they came from (for RoPE)."""

    tokens: Tensor  # (B, S, P, C)
    height: int
    width: int


def frame_size(frames: Tensor | FramePatches) -> tuple[int, int]:
    """(H, W) in pixels of the images behind `frames`."""
    return (frames.height, frames.width) if isinstance(frames, FramePatches) else tuple(frames.shape[-2:])


class VGGTAggregator(nn.Module):
    """Alternating frame / global attention over camera + register + patch tokens of every frame."""

    def __init__(self, config: VGGTConfig):
        super().__init__()
        c = config
        self.config = c
        self.num_special = 1 + c.num_register_tokens  # patch tokens start here
        if c.patch_embed == "dinov2":
            self.patch_embed = DinoV2(c.img_size, c.patch_size, c.embed_dim, c.dinov2_depth, c.dinov2_heads,
                                      c.mlp_ratio, c.num_register_tokens)
        else:
            self.patch_embed = ConvPatchEmbed(c.patch_size, c.embed_dim)
        # LayerNorm eps 1e-5 here (torch default), 1e-6 inside DINOv2: both checked against the goldens
        self.frame_blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qk_norm, 1e-5)
                                          for _ in range(c.depth))
        self.global_blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qk_norm, 1e-5)
                                           for _ in range(c.depth))
        # slot 0: the first processed frame; slot 1: every later frame
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        self.reset_normalisation()

    def reset_normalisation(self) -> None:
        """(Re)create the non-persistent ImageNet mean/std buffers next to the weights (after meta loading)."""
        device = self.camera_token.device
        for name, values in (("_resnet_mean", IMAGENET_MEAN), ("_resnet_std", IMAGENET_STD)):
            buffer = torch.tensor(values, dtype=torch.float32, device=device).view(1, 1, 3, 1, 1)
            self.register_buffer(name, buffer.to(self.camera_token.dtype), persistent=False)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [0, 1] -> patch tokens (N, P, C). A function of the image alone (the
        sample around it enters only later), so a frame shared by several samples is embedded once."""
        self._check_frames(images, 4)
        x = (images - self._resnet_mean[0]) / self._resnet_std[0]
        patches = self.patch_embed(x)
        return patches["x_norm_patchtokens"] if isinstance(patches, dict) else patches

    def embed_frames(self, frames: Tensor | FramePatches, first_is_reference: bool) -> Tensor:
        """frames (B, S, 3, H, W) in [0, 1], or their patch tokens -> tokens (B, S, special + patches, C)."""
        if isinstance(frames, FramePatches):
            patches = frames.tokens
        else:
            b, s = frames.shape[:2]
            patches = self.patch_tokens(frames.flatten(0, 1))
            patches = patches.reshape(b, s, *patches.shape[1:])
        b, s = patches.shape[:2]
        slots = torch.ones(s, dtype=torch.long, device=patches.device)
        if first_is_reference:
            slots[0] = 0
        special = torch.cat((self.camera_token[0, slots], self.register_token[0, slots]), dim=1)
        return torch.cat((special[None].expand(b, -1, -1, -1), patches), dim=2)

    def frame_rope(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> RopeTables:
        """RoPE tables for one frame's tokens: special tokens at (0, 0), patch (i, j) at (i + 1, j + 1)."""
        p = self.config.patch_size
        rows, cols = torch.meshgrid(torch.arange(height // p, device=device),
                                    torch.arange(width // p, device=device), indexing="ij")
        pos = torch.stack((rows.flatten(), cols.flatten()), dim=-1) + 1
        pos = torch.cat((pos.new_zeros(self.num_special, 2), pos), dim=0)
        return rope_tables(pos, self.config.embed_dim // self.config.num_heads, self.config.rope_freq, dtype)

    def _check_frames(self, frames: Tensor, ndim: int) -> None:
        p = self.config.patch_size
        if frames.ndim != ndim or frames.shape[-3] != 3 or frames.shape[-1] % p or frames.shape[-2] % p:
            raise ValueError(f"VGGT input: expected a {ndim}-D tensor (..., 3, H, W) with H, W multiples of {p}, "
                             f"found shape {tuple(frames.shape)}")

    def _num_blocks(self, num_blocks: int | None) -> int:
        n = self.config.depth if num_blocks is None else num_blocks
        if not 1 <= n <= self.config.depth:
            raise ValueError(f"num_blocks: expected 1..{self.config.depth}, found {num_blocks}")
        return n

    def forward(self, frames: Tensor | FramePatches, num_blocks: int | None = None, all_blocks: bool = True,
                backend: str = "auto") -> list[Tensor]:
        """One block-causal pass over all frames of B samples: frames (B, S, 3, H, W) in [0, 1] (or their
        `FramePatches`) -> per block (B, S, N, 2C) (only the last run block when `all_blocks` is False)."""
        if not isinstance(frames, FramePatches):
            self._check_frames(frames, 5)
        h, w = frame_size(frames)
        tokens = self.embed_frames(frames, first_is_reference=True)
        b, s, n = tokens.shape[:3]
        rope = self.frame_rope(h, w, tokens.device, tokens.dtype)
        rope_all = (rope[0].repeat(s, 1), rope[1].repeat(s, 1))
        outputs, count = [], self._num_blocks(num_blocks)
        for i in range(count):
            local = self.frame_blocks[i](tokens.reshape(b * s, n, -1), rope)[0].reshape(b, s, n, -1)
            glob = self.global_blocks[i](local.reshape(b, s * n, -1), rope_all, frame_len=n, backend=backend)[0]
            tokens = glob.reshape(b, s, n, -1)
            if all_blocks or i == count - 1:
                outputs.append(torch.cat((local, tokens), dim=-1))
        return outputs

    def forward_frame(self, frame: Tensor, cache: list[KeyValue] | None = None, num_blocks: int | None = None,
                      all_blocks: bool = True) -> tuple[list[Tensor], list[KeyValue]]:
        """Streaming step: the next frame of B samples, frame (B, 3, H, W) in [0, 1], attends to itself and the
        cached frames. Returns per block (B, N, 2C) and the grown cache (raw k, v per global block)."""
        self._check_frames(frame, 4)
        count = self._num_blocks(num_blocks)
        tokens = self.embed_frames(frame[:, None], first_is_reference=cache is None)[:, 0]
        rope = self.frame_rope(frame.shape[-2], frame.shape[-1], frame.device, tokens.dtype)
        if cache is None:
            heads, head_dim = self.config.num_heads, self.config.embed_dim // self.config.num_heads
            empty = tokens.new_zeros(tokens.shape[0], heads, 0, tokens.shape[1], head_dim)
            cache = [(empty, empty)] * count
        if len(cache) < count:
            raise ValueError(f"KV cache: expected at least {count} blocks, found {len(cache)}")
        outputs, new_cache = [], []
        for i in range(count):
            local = self.frame_blocks[i](tokens, rope)[0]
            tokens, kv = self.global_blocks[i](local, rope, past=cache[i])
            new_cache.append(kv)
            if all_blocks or i == count - 1:
                outputs.append(torch.cat((local, tokens), dim=-1))
        return outputs, new_cache


def sample_features(model: VGGTAggregator, frames: Tensor | FramePatches, reference_frame: str = "last",
                    method: str = "batched", backend: str = "auto") -> Tensor:
    """JanusVLN's 3D feature per sample: frames (B, S, 3, H, W) in [0, 1], oldest first, or their
    `FramePatches` (batched only) -> (B, P, 2C), the block depth-2 patch tokens of the last processed frame
    (the oldest frame when reference is "last")."""
    if reference_frame not in REFERENCE_FRAMES:
        raise ValueError(f"reference_frame: expected one of {REFERENCE_FRAMES}, found {reference_frame!r}")
    if isinstance(frames, FramePatches):
        if method != "batched":
            raise ValueError(f"FramePatches: expected method 'batched', found {method!r}")
        if reference_frame == "last":
            frames = frames._replace(tokens=frames.tokens.flip(1))
    else:
        model._check_frames(frames, 5)
        if reference_frame == "last":
            frames = frames.flip(1)
    num_blocks = model.config.depth - 1 if model.config.depth > 1 else 1
    if method == "batched":
        last = model(frames, num_blocks=num_blocks, all_blocks=False, backend=backend)[0][:, -1]
    elif method == "streaming":
        cache = None
        for s in range(frames.shape[1]):
            out, cache = model.forward_frame(frames[:, s], cache, num_blocks=num_blocks, all_blocks=False)
        last = out[0]
    else:
        raise ValueError(f"method: expected 'batched' or 'streaming', found {method!r}")
    return last[:, model.num_special:]


def compile_blocks(model: VGGTAggregator) -> VGGTAggregator:
    """torch.compile every transformer block in place (frame, global and DINOv2 blocks): fuses the
    elementwise work around the matmuls (LayerNorms, RoPE, LayerScale, residual adds, GELU). Blocks of one
    kind share a graph; the first call compiles (tens of seconds on a GPU), a second batch size recompiles
    once with a dynamic batch dimension (torch's automatic dynamic shapes)."""
    blocks = [*model.frame_blocks, *model.global_blocks, *getattr(model.patch_embed, "blocks", [])]
    for block in blocks:
        block.compile()
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` or torch (`.pt`/`.pth`/`.bin`) checkpoint, on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SchemaError(str(path), "state dict", "a flat mapping of names to tensors", type(state).__name__)
    return dict(state)


def aggregator_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The aggregator's tensors without the `aggregator.` prefix; head weights are dropped."""
    if not any(k.startswith("aggregator.") for k in state):
        return dict(state)
    return {k.removeprefix("aggregator."): v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}


def load_aggregator_weights(model: VGGTAggregator, source: str | Path | Mapping[str, Tensor],
                            where: str = "state dict", assign: bool = False) -> None:
    """Load by name, refusing missing, unexpected or mis-shaped aggregator tensors (all listed on the error)."""
    if not isinstance(source, Mapping):
        where, source = str(source), read_state_dict(source)
    state = aggregator_state_dict(source)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)}≠{expected[k]}"
                   for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        found = f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}, " \
                f"wrong shape {len(wrong)} {wrong[:2]}"
        logger.error("%s: aggregator keys missing %s unexpected %s wrong shape %s", where, missing, unexpected, wrong)
        error = SchemaError(where, "aggregator state dict", f"the {len(expected)} tensors of {model.config}", found)
        error.missing, error.unexpected, error.wrong_shape = missing, unexpected, wrong
        raise error
    model.load_state_dict(state, strict=True, assign=assign)
    if assign:
        model.reset_normalisation()


def load_aggregator(path: str | Path, config: VGGTConfig | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> VGGTAggregator:
    """Build on the meta device (no double allocation), load the checkpoint by name, move, freeze, eval."""
    with torch.device("meta"):
        model = VGGTAggregator(config or vggt1b())
    load_aggregator_weights(model, path, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("loaded VGGT aggregator from %s (%d tensors)", path, len(model.state_dict()))
    return model
