"""Fused varlen attention for the Qwen2.5-VL vision tower: one attention call per ViT layer over all windows (or
whole frames) instead of transformers' SDPA loop, one call per window (~324 windows per layer at 9×644²:
6.05 ms per layer on an H200, vs 0.26 ms for one compiled flex_attention call with a block mask). Plugged in
through transformers' AttentionInterface; `enable_fused_vision_attention` picks flash-attn varlen, else flex.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.utils import is_flash_attn_2_available

from schemas.errors import SchemaError

logger = logging.getLogger(__name__)

# Qwen2_5_VLVisionAttention passes `cu_seqlens` in a single call only when `is_flash_attention_requested(config)`,
# which (transformers 5.17 and 5.2x) tests `"flash" in config._attn_implementation`; for any other name it loops
# over the chunks. Hence "flash" in these names, though neither uses flash-attn.
FLEX = "vln_flash_varlen_flex"  # torch flex_attention + document block mask (compiled on CUDA)
SDPA_MASKED = "vln_flash_varlen_sdpa_masked"  # one SDPA call with a dense block-diagonal bool mask (CPU reference)
FLASH_ATTENTION_2 = "flash_attention_2"  # transformers' own varlen path, where flash_attn is installed
PATHS = ("auto", FLASH_ATTENTION_2, FLEX, SDPA_MASKED, "sdpa", "eager")

try:  # torch ≥ 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch 2.13 here and on the GPU machine
    create_block_mask = flex_attention = None


def segment_ids(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """(seq_len,) int32 index of the segment each position falls in, from (num_segments + 1,) cumulative lengths;
    no device-to-host sync (empty segments are fine)."""
    positions = torch.arange(seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, positions, right=True) - 1).to(torch.int32)


def _build_block_mask(cu_seqlens: Tensor, seq_len: int):
    seg = segment_ids(cu_seqlens, seq_len)

    def same_segment(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    return create_block_mask(same_segment, None, None, seq_len, seq_len, device=cu_seqlens.device)


def _build_dense_mask(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    seg = segment_ids(cu_seqlens, seq_len)
    return seg[:, None] == seg[None, :]


class SegmentMaskCache:
    """Masks keyed by the identity (and version) of the `cu_seqlens` tensor: the tower hands the same two tensors
    (windows, whole frames) to all 32 layers of a forward, so each mask is built once per forward, with no
    host sync to read their content. Entries die with their tensor (weak references)."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self.num_built = 0
        self._entries: list[tuple[weakref.ref, int, str, int, object]] = []

    def get(self, cu_seqlens: Tensor, seq_len: int, kind: str, build: Callable[[Tensor, int], object]) -> object:
        for ref, version, entry_kind, entry_len, mask in self._entries:
            if ref() is cu_seqlens and version == cu_seqlens._version and (entry_kind, entry_len) == (kind, seq_len):
                return mask
        mask = build(cu_seqlens, seq_len)
        self.num_built += 1
        live = [entry for entry in self._entries if entry[0]() is not None]
        self._entries = live[-(self.max_entries - 1):] + [
            (weakref.ref(cu_seqlens), cu_seqlens._version, kind, seq_len, mask)]
        return mask


MASK_CACHE = SegmentMaskCache()
_compiled_flex: Callable | None = None


def _flex_for(device: torch.device) -> Callable:
    """Compiled flex_attention on CUDA (the fused kernel); eager elsewhere (unfused: it materialises the scores,
    which is what the CPU tests need) and inside an outer torch.compile."""
    global _compiled_flex
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _check_varlen_call(query: Tensor, cu_q: Tensor | None, cu_k: Tensor | None, dropout: float,
                       is_causal: bool | None) -> Tensor:
    where = "vision attention (varlen)"
    if cu_q is None or cu_k is None:
        raise SchemaError(where, "cu_seq_lens_q/k", "cumulative lengths from the vision tower", None)
    if cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise SchemaError(where, "cu_seq_lens_k", "equal to cu_seq_lens_q (self-attention)", cu_k)
    if query.shape[0] != 1:
        raise SchemaError(where, "query.shape[0]", "1 (packed sequences)", tuple(query.shape))
    if dropout or is_causal:
        raise SchemaError(where, "dropout/is_causal", "0 and False (vision attention)", (dropout, is_causal))
    return cu_q


def flex_varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          cu_seq_lens_q: Tensor | None = None, cu_seq_lens_k: Tensor | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[Tensor, None]:
    """AttentionInterface function: (1, H, S, D) q/k/v, attention within each cu_seqlens segment → (1, S, H, D)."""
    cu_seqlens = _check_varlen_call(query, cu_seq_lens_q, cu_seq_lens_k, dropout, is_causal)
    block_mask = MASK_CACHE.get(cu_seqlens, query.shape[2], "flex", _build_block_mask)
    out = _flex_for(query.device)(query, key, value, block_mask=block_mask, scale=scaling)
    return out.transpose(1, 2), None


def sdpa_masked_varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Tensor | None, scaling: float | None = None,
                                 dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                                 cu_seq_lens_k: Tensor | None = None, is_causal: bool | None = None,
                                 **kwargs) -> tuple[Tensor, None]:
    """The same attention as one SDPA call with an (S, S) block-diagonal bool mask: S² bytes of mask, and no fused
    kernel on GPU; a reference and CPU fallback, not the fast path."""
    cu_seqlens = _check_varlen_call(query, cu_seq_lens_q, cu_seq_lens_k, dropout, is_causal)
    mask = MASK_CACHE.get(cu_seqlens, query.shape[2], "dense", _build_dense_mask)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


def register_vision_attention() -> None:
    """Register both fused functions in transformers' global attention registry (idempotent)."""
    AttentionInterface.register(SDPA_MASKED, sdpa_masked_varlen_attention)
    if flex_attention is not None:
        AttentionInterface.register(FLEX, flex_varlen_attention)


def find_vision_tower(model: nn.Module) -> Qwen2_5_VisionTransformerPretrainedModel:
    """The one Qwen2.5-VL vision tower in `model` (the tower itself, a Qwen2.5-VL model, or a wrapper of one)."""
    towers = [m for m in model.modules() if isinstance(m, Qwen2_5_VisionTransformerPretrainedModel)]
    if len(towers) != 1:
        raise SchemaError(type(model).__name__, "vision tower", "exactly one Qwen2.5-VL vision tower",
                          f"{len(towers)} towers")
    return towers[0]


def choose_vision_path(path: str = "auto") -> str:
    """`auto` → flash_attention_2 where flash_attn is usable, else flex_attention, else sdpa (the loop)."""
    if path not in PATHS:
        raise SchemaError("vision attention", "path", f"one of {PATHS}", path)
    if path == "auto":
        if is_flash_attn_2_available():
            return FLASH_ATTENTION_2
        return FLEX if flex_attention is not None else "sdpa"
    if path == FLASH_ATTENTION_2 and not is_flash_attn_2_available():
        raise SchemaError("vision attention", "path", "flash_attn installed and usable for flash_attention_2", path)
    if path == FLEX and flex_attention is None:
        raise SchemaError("vision attention", "path", "torch with flex_attention for " + FLEX, torch.__version__)
    return path


def enable_fused_vision_attention(model_or_qwen: nn.Module, path: str = "auto") -> str:
    """Switch the vision tower of `model_or_qwen` (JanusVLN, Qwen2.5-VL, or the tower) to `path` (see
    `choose_vision_path`) and return the implementation name now in the tower's config. The text model's
    attention implementation is untouched."""
    register_vision_attention()
    tower = find_vision_tower(model_or_qwen)
    chosen = choose_vision_path(path)
    if chosen in (FLEX, SDPA_MASKED):
        # set_attn_implementation would try to load a hub kernel for a name containing "flash"; the config
        # property is what it sets in the end, and these names are registered above.
        tower.config._attn_implementation = chosen
    elif chosen != tower.config._attn_implementation:
        tower.set_attn_implementation(chosen)  # transformers' own checks (flash_attn install, dtype, device)
    logger.info("vision tower attention: %s (requested %s)", tower.config._attn_implementation, path)
    return tower.config._attn_implementation
