"""Transformer layers of the VGGT aggregator: pre-norm block (LayerScale, optional qk-norm), 2-D RoPE,
block-causal attention, conv patch embed and the DINOv2 ViT with register tokens used as patch embed.
Parameter names follow the official VGGT-1B checkpoint so weights load by name. Block-causal attention is
one unmasked SDPA call per query frame over the keys of frames up to it (no (S·N)² mask; fused kernels):
on an H200 that is 198 ms per 9-frame VGGT-1B sample vs 216 ms with flex_attention and a block mask, and
376 ms with a boolean SDPA mask, which loses the fused kernel (docs/benchmarks.md). Flex stays selectable.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RopeTables = tuple[Tensor, Tensor]  # cos, sin: (N, head_dim) each
KeyValue = tuple[Tensor, Tensor]  # raw k, v: (B, heads, frames, tokens, head_dim)


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> RopeTables:
    """cos/sin for 2-D RoPE: first half of each head rotates by the row (pos[:, 0]), second by the column.

    Angles are computed in float32 and then cast, as the original does (it matters only for float64).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=pos.device).float() / half))
    tables = []
    for axis in (0, 1):
        angles = (pos[:, axis].float()[:, None] * inv_freq[None, :]).to(dtype)
        tables.append(torch.cat((angles, angles), dim=-1))
    angles = torch.cat(tables, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """Rotate (..., N, head_dim) by the tables; rotate-half within each of the two halves."""
    cos, sin = tables
    q0, q1, q2, q3 = x.chunk(4, dim=-1)
    rotated = torch.cat((-q1, q0, -q3, q2), dim=-1)
    return x * cos + rotated * sin


@lru_cache(maxsize=16)
def _flex_block_mask(num_frames: int, frame_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def frame_causal(b, h, q_idx, kv_idx):
        return kv_idx // frame_len <= q_idx // frame_len

    n = num_frames * frame_len
    return create_block_mask(frame_causal, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, frame_len: int, backend: str = "auto") -> Tensor:
    """Attention over frames of `frame_len` tokens where each frame sees itself and earlier frames."""
    num_frames = q.shape[-2] // frame_len
    if backend == "auto":
        backend = "sdpa"
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        mask = _flex_block_mask(num_frames, frame_len, q.device)
        attend = _compiled_flex() if q.is_cuda else flex_attention
        return attend(q, k, v, block_mask=mask)
    if backend != "sdpa":
        raise ValueError(f"attention backend: expected 'auto', 'flex' or 'sdpa', found {backend!r}")
    # one unmasked call per query frame over keys of frames <= it: no (S·N)² mask in memory, fused kernels
    outs = [F.scaled_dot_product_attention(q[..., s * frame_len:(s + 1) * frame_len, :],
                                           k[..., :(s + 1) * frame_len, :], v[..., :(s + 1) * frame_len, :])
            for s in range(num_frames)]
    return torch.cat(outs, dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention; optional per-head LayerNorm on q and k, RoPE, frame-causal mask, KV cache."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RopeTables | None = None, frame_len: int | None = None,
                past: KeyValue | None = None, backend: str = "auto") -> tuple[Tensor, KeyValue | None]:
        """x (B, N, C). `frame_len`: block-causal over frames of that length. `past`: cached raw keys/values
        of earlier frames (pre-norm, pre-RoPE, as the original caches them); x is then one new frame."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        new_past = None
        if past is not None:
            raw_k = torch.cat((past[0], k[:, :, None]), dim=2)
            raw_v = torch.cat((past[1], v[:, :, None]), dim=2)
            new_past = (raw_k, raw_v)
            k, v = raw_k.flatten(2, 3), raw_v.flatten(2, 3)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope)
            repeats = k.shape[2] // n
            k = apply_rope(k, rope if repeats == 1 else (rope[0].repeat(repeats, 1), rope[1].repeat(repeats, 1)))
        if frame_len is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = block_causal_attention(q, k, v, frame_len, backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), new_past


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qk_norm, eps)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor, rope: RopeTables | None = None, frame_len: int | None = None,
                past: KeyValue | None = None, backend: str = "auto") -> tuple[Tensor, KeyValue | None]:
        attended, new_past = self.attn(self.norm1(x), rope, frame_len, past, backend)
        x = x + self.ls1(attended)
        return x + self.ls2(self.mlp(self.norm2(x))), new_past


class ConvPatchEmbed(nn.Module):
    """Non-overlapping patch projection: (N, 3, H, W) -> (N, H/p · W/p, C), row-major patches."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 ViT with register tokens (cls, registers, patches); pos-embed resized bicubic + antialias."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, num_register_tokens: int = 4):
        super().__init__()
        self.patch_size, self.num_register_tokens = patch_size, num_register_tokens
        grid = img_size // patch_size
        self.patch_embed = ConvPatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here; in the checkpoint
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, False, 1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def position_embedding(self, height: int, width: int) -> Tensor:
        """(1, 1 + h·w, C) for an image of height × width pixels; resized in float32 like the original."""
        h, w = height // self.patch_size, width // self.patch_size
        num_stored = self.pos_embed.shape[1] - 1
        if h * w == num_stored and height == width:
            return self.pos_embed
        side = int(math.sqrt(num_stored))
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((table[:, :1], grid), dim=1).to(self.pos_embed.dtype)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (N, 3, H, W), already normalised -> DINOv2's output dict (x_norm_patchtokens, ...)."""
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.position_embedding(images.shape[-2], images.shape[-1])
        x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)[0]
        normed = self.norm(x)
        r = 1 + self.num_register_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:r],
                "x_norm_patchtokens": normed[:, r:], "x_prenorm": x}
