"""JanusVLN (SPEC §5): transformers' Qwen2.5-VL + each sample's VGGT 3D features added to that sample's images
(VGGTMerger, `lam`) + an action head. Frozen parts (ViT blocks, VGGT) run under no_grad, so they build no graph
even when transformers ≥ 5 hooks `patch_embed` for input grads; the trainable Qwen merger runs with grad on
their output (it also runs once inside the library forward: ~4e11 FLOP ≈ 1 ms per 9-frame 7B sample).
`lm_head` runs only at labelled positions (~450 of ~5.1k tokens): ~0.14 GB of bf16 logits per sample, not 1.6 GB.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
from transformers.vision_utils import get_vision_window_index

from schemas.errors import SchemaError
from train.vggt import VGGTAggregator, VGGTConfig, load_aggregator, sample_features, tiny_config

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ATTN_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
REAL_VOCAB_SIZE = 151936
REAL_VISION_IDS = {"vision_start_token_id": 151652, "vision_end_token_id": 151653,
                   "image_token_id": 151655, "video_token_id": 151656}


@dataclass(frozen=True)
class JanusConfig:
    """The additions to Qwen2.5-VL and what trains. `tune_lm_head=None` follows `tune_llm`."""

    lam: float = 0.2
    vggt_dim: int = 2048  # 2 × VGGT embed dim (frame ‖ global)
    merger_hidden: int = 4096
    action_hidden: int = 512
    num_actions: int = 4
    reference_frame: str = "last"
    tune_llm: bool = True
    tune_lm_head: bool | None = None
    tune_vision_tower: bool = False
    tune_vision_merger: bool = True
    tune_vggt_merger: bool = True
    tune_action_head: bool = True
    attn_implementation: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam < float("inf"):
            raise SchemaError("JanusConfig", "lam", "a finite number ≥ 0", self.lam)
        for key in ("vggt_dim", "merger_hidden", "action_hidden", "num_actions"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise SchemaError("JanusConfig", key, "a positive integer", getattr(self, key))
        if self.reference_frame not in ("first", "last"):
            raise SchemaError("JanusConfig", "reference_frame", "'first' or 'last'", self.reference_frame)
        if self.attn_implementation not in ATTN_CHOICES:
            raise SchemaError("JanusConfig", "attn_implementation", f"one of {ATTN_CHOICES}", self.attn_implementation)


@dataclass
class JanusOutput:
    """`token_logits` (N, V): lm_head at the N positions t with labels[:, t+1] ≠ -100, in row-major order of
    `token_mask` (B, L-1); `action_logits` (B, A); `hidden_states` (B, L, H), the LLM's last layer."""

    action_logits: Tensor
    hidden_states: Tensor
    token_logits: Tensor | None = None
    token_mask: Tensor | None = None


def resolve_attn_implementation(requested: str) -> str:
    """`auto` → flash_attention_2 (one varlen call per ViT layer) where flash_attn imports, else sdpa
    (transformers loops over the ~300 windows per ViT layer: ~6 ms per layer at 9×644²)."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    chosen = ("flash_attention_2" if has_flash else "sdpa") if requested == "auto" else requested
    if chosen == "flash_attention_2" and not has_flash:
        raise SchemaError("JanusConfig", "attn_implementation", "flash_attn installed for flash_attention_2", chosen)
    logger.info("attention implementation (vision tower and LLM): %s (requested %s, flash_attn %s)",
                chosen, requested, "installed" if has_flash else "not installed")
    return chosen


def feature_grid(num_patches: int, h: int, w: int, where: str) -> tuple[int, int]:
    """VGGT patch grid (gh, gw) of `num_patches` features for an image whose Qwen grid is h × w: Qwen crops an
    odd patch row/column (facts §3c), so gh ∈ {h, h+1} and gw ∈ {w, w+1}; the extra row/column is cropped."""
    options = [(h, w), (h + 1, w), (h, w + 1), (h + 1, w + 1)]
    matches = [g for g in options if g[0] * g[1] == num_patches]
    if not matches or (len(matches) > 1 and matches[0] != (h, w)):
        raise SchemaError(where, "vggt features", f"h·w patches for Qwen grid {h}×{w} (± one odd row/column, "
                          "unambiguous)", num_patches)
    return matches[0]


class VGGTMerger(nn.Module):
    """RMSNorm per token → 2×2 patch neighbours concatenated (4C) → Linear → GELU → Linear (Qwen's names)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.ln_q = Qwen2_5_VLRMSNorm(in_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(4 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features: list[Tensor], grids: list[tuple[int, int]]) -> Tensor:
        """features[i] (gh·gw, C) raster over grids[i] = (gh, gw) → (Σ (gh//2)·(gw//2), out), one mlp call."""
        normed = self.ln_q(torch.cat(features)).split([f.shape[0] for f in features])
        grouped = []
        for x, (gh, gw) in zip(normed, grids):
            x = x.view(gh, gw, self.in_dim)[: gh // 2 * 2, : gw // 2 * 2]
            x = x.reshape(gh // 2, 2, gw // 2, 2, self.in_dim).permute(0, 2, 1, 3, 4)
            grouped.append(x.reshape(-1, 4 * self.in_dim))
        return self.mlp(torch.cat(grouped))


def tiny_qwen_config(vocab_size: int = REAL_VOCAB_SIZE) -> Qwen2_5_VLConfig:
    """dev-machine-facts §4: text hidden 64 × 2 layers, vision depth 2 hidden 32 → 64. Real vision token ids when
    the vocab holds them, else the last five ids (start, end, pad, image, video)."""
    ids = REAL_VISION_IDS if vocab_size > max(REAL_VISION_IDS.values()) else {
        "vision_start_token_id": vocab_size - 5, "vision_end_token_id": vocab_size - 4,
        "image_token_id": vocab_size - 2, "video_token_id": vocab_size - 1}
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


class JanusVLN(nn.Module):
    """Composition around `Qwen2_5_VLForConditionalGeneration` (`self.qwen`); `self.config` is Qwen's config
    (Trainer/DeepSpeed read hidden sizes from it), `self.janus_config` the additions."""

    def __init__(self, qwen: Qwen2_5_VLForConditionalGeneration, janus_config: JanusConfig | None = None,
                 vggt: nn.Module | None = None):
        super().__init__()
        cfg = janus_config or JanusConfig()
        self.qwen, self.janus_config, self.config = qwen, cfg, qwen.config
        hidden = qwen.config.text_config.hidden_size
        self.vggt_merger = VGGTMerger(cfg.vggt_dim, cfg.merger_hidden, hidden)
        self.action_head = nn.Sequential(nn.Linear(hidden, cfg.action_hidden), nn.LayerNorm(cfg.action_hidden),
                                         nn.GELU(), nn.Linear(cfg.action_hidden, cfg.num_actions))
        std = qwen.config.text_config.initializer_range
        for linear in (self.vggt_merger.mlp[0], self.vggt_merger.mlp[2], self.action_head[0], self.action_head[3]):
            nn.init.normal_(linear.weight, std=std)  # as HF initialises new Linear layers
            nn.init.zeros_(linear.bias)
        self.vggt_merger.to(qwen.device, qwen.dtype)
        self.action_head.to(qwen.device, qwen.dtype)
        self.vggt = vggt
        logger.info("vision attention path: %s", qwen.model.visual.config._attn_implementation)
        self.apply_freezing()

    @classmethod
    def from_pretrained_parts(cls, qwen_dir: str | Path, vggt_checkpoint: str | Path | None = None,
                              janus_config: JanusConfig | None = None, dtype: torch.dtype = torch.bfloat16,
                              vggt_config: VGGTConfig | None = None) -> JanusVLN:
        """A local Qwen2.5-VL directory + optionally a VGGT checkpoint (aggregator weights by name)."""
        cfg = janus_config or JanusConfig()
        impl = resolve_attn_implementation(cfg.attn_implementation)
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=dtype,
                                                                  attn_implementation=impl)
        vggt = None if vggt_checkpoint is None else load_aggregator(vggt_checkpoint, vggt_config, dtype=dtype)
        return cls(qwen, cfg, vggt)

    @classmethod
    def tiny(cls, vocab_size: int = REAL_VOCAB_SIZE, janus_config: JanusConfig | None = None,
             with_vggt: bool = True, seed: int = 0) -> JanusVLN:
        """Random tiny model for tests (float32): tiny Qwen, tiny VGGT aggregator (dim 64 → features 128)."""
        cfg = janus_config or JanusConfig(vggt_dim=128, merger_hidden=128)
        qcfg = tiny_qwen_config(vocab_size)
        qcfg._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
        torch.manual_seed(seed)
        qwen = Qwen2_5_VLForConditionalGeneration(qcfg)
        return cls(qwen, cfg, VGGTAggregator(tiny_config()) if with_vggt else None)

    def apply_freezing(self) -> dict[str, int]:
        """Set every parameter's `requires_grad` from the config (on parameters, not modules); log the counts."""
        cfg, qwen = self.janus_config, self.qwen
        tune_lm_head = cfg.tune_llm if cfg.tune_lm_head is None else cfg.tune_lm_head
        if qwen.lm_head.weight is qwen.model.language_model.embed_tokens.weight and tune_lm_head != cfg.tune_llm:
            raise SchemaError("JanusConfig", "tune_lm_head", "equal to tune_llm (lm_head is tied to the embeddings)",
                              cfg.tune_lm_head)
        groups = [("llm", qwen.model.language_model, cfg.tune_llm), ("lm_head", qwen.lm_head, tune_lm_head),
                  ("vision_tower", qwen.model.visual, cfg.tune_vision_tower),
                  ("vision_merger", qwen.model.visual.merger, cfg.tune_vision_merger),
                  ("vggt_merger", self.vggt_merger, cfg.tune_vggt_merger),
                  ("action_head", self.action_head, cfg.tune_action_head)]
        if self.vggt is not None:
            groups.append(("vggt", self.vggt, False))
        for _, module, trainable in groups:  # later groups win: the merger sits inside the tower
            for p in module.parameters():
                p.requires_grad_(trainable)
        counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m, _ in groups}
        logger.info("trainable parameters: %s (total %d)", counts,
                    sum(p.numel() for p in self.parameters() if p.requires_grad))
        return counts

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Trainer's entry point (named gradient_checkpointing_enable before transformers 5.2x): transformers' own,
        which also hooks patch_embed for input grads; harmless here, see encode_images."""
        enable = getattr(self.qwen, "activation_checkpointing_enable", self.qwen.gradient_checkpointing_enable)
        enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """(ΣP, 1176) patches → (Σ tokens, hidden), images in order. A frozen tower runs under no_grad (no graph
        even with input-grad hooks); the merger then runs with grad on its window-ordered output."""
        visual = self.qwen.model.visual
        pixel_values = pixel_values.to(visual.dtype)
        if self.janus_config.tune_vision_tower:
            return visual(pixel_values, grid_thw=image_grid_thw).pooler_output
        window_index, cu_window_seqlens = get_vision_window_index(
            image_grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        with torch.no_grad():
            out = visual(pixel_values, grid_thw=image_grid_thw, window_index=window_index,
                         cu_window_seqlens=cu_window_seqlens)
        if not self.janus_config.tune_vision_merger:
            return out.pooler_output
        return visual.merger(out.last_hidden_state)[torch.argsort(window_index.to(pixel_values.device))]

    def vggt_features(self, images_vggt: list[Tensor]) -> list[Tensor]:
        """Frozen VGGT on each sample's frames (N_i, 3, H, W) in [0, 1]; samples of equal shape share one call."""
        if self.vggt is None:
            raise SchemaError("batch", "vggt_features", "precomputed features (this model has no VGGT)", "absent")
        by_shape: dict[tuple, list[int]] = {}
        for i, frames in enumerate(images_vggt):
            by_shape.setdefault(tuple(frames.shape), []).append(i)
        result, dtype = [None] * len(images_vggt), next(self.vggt.parameters()).dtype
        with torch.no_grad():
            for members in by_shape.values():
                frames = torch.stack([images_vggt[i] for i in members]).to(dtype)
                for i, f in zip(members, sample_features(self.vggt, frames, self.janus_config.reference_frame)):
                    result[i] = f
        return result

    def fuse_3d(self, image_embeds: Tensor, features: list[Tensor] | Tensor, image_grid_thw: Tensor,
                images_per_sample: Tensor) -> Tensor:
        """image_embeds + lam · merger(features[b]) on every image of sample b (images are sample-major)."""
        counts, grids = images_per_sample.tolist(), image_grid_thw.tolist()
        if sum(counts) != len(grids) or len(features) != len(counts):
            raise SchemaError("batch", "images_per_sample", f"{len(features)} samples summing to "
                              f"{len(grids)} images (image_grid_thw rows)", counts)
        used, feat_grids, start = [], [], 0
        for b, n in enumerate(counts):
            own = grids[start:start + n]
            start += n
            if n == 0:
                continue
            if any(g != own[0] for g in own) or own[0][0] != 1:
                raise SchemaError(f"batch sample {b}", "image_grid_thw", "one t=1 grid for all images", own)
            used.append(b)
            feat_grids.append(feature_grid(features[b].shape[0], own[0][1], own[0][2], f"batch sample {b}"))
        if not used:
            return image_embeds
        merged = self.vggt_merger([features[b].to(image_embeds.dtype) for b in used], feat_grids)
        sizes = [(gh // 2) * (gw // 2) for gh, gw in feat_grids]
        per_image = [m.repeat(counts[b], 1) for b, m in zip(used, merged.split(sizes))]
        return image_embeds + self.janus_config.lam * torch.cat(per_image)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, pixel_values: Tensor,
                image_grid_thw: Tensor, images_per_sample: Tensor, labels: Tensor | None = None,
                vggt_features: Tensor | list[Tensor] | None = None, images_vggt: list[Tensor] | None = None,
                segment_ids: Tensor | None = None, action_label: Tensor | None = None) -> JanusOutput:
        """The decoded batch (docs/design.md). `segment_ids`/`action_label` are accepted so the whole batch can be
        passed; only train.loss reads them. Precomputed `vggt_features` win over running VGGT on `images_vggt`."""
        image_embeds = self.encode_images(pixel_values, image_grid_thw)
        if self.janus_config.lam > 0:
            if vggt_features is None:
                if images_vggt is None:
                    raise SchemaError("batch", "vggt_features/images_vggt", "one of them (lam > 0)", "neither")
                vggt_features = self.vggt_features(images_vggt)
            image_embeds = self.fuse_3d(image_embeds, vggt_features, image_grid_thw, images_per_sample)
        embeds = self.qwen.model.get_input_embeddings()(input_ids)
        image_mask, _ = self.qwen.model.get_placeholder_mask(input_ids, embeds, image_features=image_embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        hidden = self.qwen.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False).last_hidden_state
        at = hidden[torch.arange(hidden.shape[0], device=hidden.device), action_positions(labels, attention_mask)]
        out = JanusOutput(action_logits=self.action_head(at), hidden_states=hidden)
        if labels is not None:
            out.token_mask = labels[:, 1:] != IGNORE_INDEX
            out.token_logits = self.qwen.lm_head(hidden[:, :-1][out.token_mask])
        return out


def action_positions(labels: Tensor | None, attention_mask: Tensor) -> Tensor:
    """Per sample, the position before its first label (clamped to 0); without labels its last real token."""
    if labels is None:
        return (attention_mask.long().sum(1) - 1).clamp(min=0)
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(1).all()):
        raise SchemaError("batch", "labels", "at least one labelled token per sample", labelled.sum(1).tolist())
    return (labelled.int().argmax(1) - 1).clamp(min=0)
