"""Training loss (SPEC §5, facts §7): Σw·CE / Σw over labelled tokens, w from segment ids (prep.text, equal to the
original's loss_weights) + λ(step)·CE of the action head. One CE per micro-batch, in float32 on the labelled rows
only (train.model never builds full-sequence logits: ~0.27 GB float32 per sample instead of 3.1 GB per copy).
Averaging over a step: pass `StepNorm` (Σw and sample count of all the step's micro-batches on all ranks) and the
micro-batch losses sum to the exact step loss; the returned sums let logs average segments the same way.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from prep.text import loss_weights_from_segments
from schemas.errors import SchemaError

if TYPE_CHECKING:
    from train.model import JanusOutput

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SEGMENT_NAMES = ("subinstruction", "2d", "3d", "action")  # segment ids 1..4
NUM_STATS = 4 + 2 * len(SEGMENT_NAMES)


@dataclass(frozen=True)
class LossConfig:
    """Segment weights (sub-instruction, 2D, 3D, action text); action-head weight λ(step) = d0 + (d1 − d0)·
    min(max(step, 0), W)/W when `action_weight_end` (d1) is set and W > 0, else d0 (facts §7)."""

    segment_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    action_weight: float = 1.0
    action_weight_end: float | None = None
    action_weight_warmup_steps: int = 0

    def __post_init__(self) -> None:
        weights = tuple(self.segment_weights)
        if len(weights) != 4 or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise SchemaError("LossConfig", "segment_weights", "4 finite weights ≥ 0", self.segment_weights)
        object.__setattr__(self, "segment_weights", tuple(float(w) for w in weights))
        for key in ("action_weight", "action_weight_end"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise SchemaError("LossConfig", key, "a finite number", value)
        if self.action_weight_warmup_steps < 0:
            raise SchemaError("LossConfig", "action_weight_warmup_steps", "an integer ≥ 0",
                              self.action_weight_warmup_steps)

    def action_weight_at(self, step: int) -> float:
        d0, d1, w = self.action_weight, self.action_weight_end, self.action_weight_warmup_steps
        if d1 is None or w <= 0:
            return d0
        return d0 + (d1 - d0) * min(max(step, 0), w) / w


@dataclass(frozen=True)
class StepNorm:
    """Denominators of one optimizer step: Σw of all its labelled tokens and its number of action labels,
    summed over its micro-batches and all ranks (see `step_denominators`)."""

    text_weight: float
    num_actions: float


@dataclass
class LossParts:
    """`loss` to backward; `stats` (NUM_STATS,) float64, detached sums to add over micro-batches and ranks:
    Σw·CE, Σw, Σ action CE, action count, then Σw·CE per segment (4) and Σw per segment (4)."""

    loss: Tensor
    stats: Tensor
    action_weight: float


def token_weights(batch: Mapping[str, Tensor], config: LossConfig) -> Tensor:
    """(B, L) float32 weights, equal to the original's `loss_weights` for the same segment weights."""
    return loss_weights_from_segments(batch["segment_ids"], batch["labels"], config.segment_weights,
                                      batch["input_ids"])


def step_denominators(batches: Iterable[Mapping[str, Tensor]], config: LossConfig) -> Tensor:
    """This rank's [Σw, action count] over a step's micro-batches (float64); all-reduce (sum), then StepNorm."""
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        w = token_weights(batch, config)[:, 1:]
        total[0] += w.double().sum().cpu()
        total[1] += float((batch["action_label"] != IGNORE_INDEX).sum())
    return total


def compute_loss(out: JanusOutput, batch: Mapping[str, Tensor], config: LossConfig, step: int,
                 norm: StepNorm | None = None) -> LossParts:
    """Loss of one micro-batch from a `JanusOutput`. Without `norm`: the micro-batch's own Σw·CE/Σw + λ·mean
    action CE (the original's per-micro-batch value; a trainer must then divide by GA). With `norm`: this
    micro-batch's share of the step loss, Σ_mb w·CE / norm.text_weight + λ·Σ_mb CE_act / norm.num_actions,
    so the step's shares sum to ΣΣw·CE/ΣΣw + λ·mean CE_act (multiply by the world size when the engine
    averages gradients over ranks, as DeepSpeed and DDP do)."""
    labels, mask = batch["labels"], out.token_mask
    if mask is None or out.token_logits is None:
        raise SchemaError("model output", "token_logits", "logits at labelled positions (pass labels)", None)
    weights = token_weights(batch, config)[:, 1:][mask].float()
    targets = labels[:, 1:][mask]
    ce = F.cross_entropy(out.token_logits.float(), targets, reduction="none")
    text_sum, text_weight = (weights * ce).sum(), weights.sum()

    action_label = batch["action_label"]
    action_sum = F.cross_entropy(out.action_logits.float(), action_label, reduction="sum",
                                 ignore_index=IGNORE_INDEX)
    num_actions = (action_label != IGNORE_INDEX).sum()
    lam = config.action_weight_at(step)

    if norm is None:
        text_den, action_den = text_weight.detach(), num_actions.float()
    else:
        text_den, action_den = (torch.tensor(v, dtype=torch.float32, device=ce.device)
                                for v in (norm.text_weight, norm.num_actions))
    loss = safe_ratio(text_sum, text_den) + lam * safe_ratio(action_sum, action_den)

    segments = F.one_hot(batch["segment_ids"][:, 1:][mask], len(SEGMENT_NAMES) + 1)[:, 1:].to(weights.dtype)
    stats = torch.cat([torch.stack([text_sum, text_weight, action_sum, num_actions.to(text_sum.dtype)]),
                       (weights * ce) @ segments, weights @ segments]).detach().double()
    return LossParts(loss=loss, stats=stats, action_weight=lam)


def safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 (keeping the graph) when there is nothing to average."""
    return numerator / denominator.clamp(min=torch.finfo(torch.float32).tiny) if bool(denominator > 0) \
        else numerator * 0.0


def summarize(stats: Tensor, action_weight: float) -> dict[str, float]:
    """Log values from `stats` summed over a step's micro-batches and ranks: ratios of sums, so each segment's
    loss is averaged over every token of the step, not one micro-batch."""
    s = stats.double().cpu().tolist()
    text = s[0] / s[1] if s[1] > 0 else 0.0
    action = s[2] / s[3] if s[3] > 0 else 0.0
    logs = {"loss_text_total": text, "loss_action_head": action, "loss": text + action_weight * action,
            "action_weight": action_weight}
    for k, name in enumerate(SEGMENT_NAMES):
        num, den = s[4 + k], s[4 + len(SEGMENT_NAMES) + k]
        logs[f"loss_{name}"] = num / den if den > 0 else 0.0
    return logs
