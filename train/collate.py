"""Collator: per-sample dicts (shard stream or online path) → one CPU batch of ints and uint8 (plus precomputed
VGGT features, float as stored, when the samples carry them).

Text is right-padded, frames go through `train.pixels.collate_frames` (each unique frame once per batch,
uint8: ~0.9 MB per 640×480 frame instead of ~15 MB of float32 per image), and the stream's bookkeeping
(`__stream__`, `sample_id`) passes through so the main process can track resume state.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from schemas.errors import SchemaError
from train.pixels import collate_frames

PAD_TOKEN_ID = 151643  # <|endoftext|>, Qwen2.5's pad token
IGNORE_INDEX = -100
POSITION_PAD = 1  # the original pads mRoPE position_ids with 1
STREAM_KEY = "__stream__"  # (epoch, slot, num_slots, index) per sample; see train.stream.StreamState
BOOKKEEPING_KEYS = (STREAM_KEY, "sample_id")  # batch keys the trainer pops before the model's forward


def _as_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == np.uint16:  # bfloat16 VGGT features stored as their uint16 bits
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    if not array.flags.writeable:  # shard arrays may be read-only views of member bytes
        array = array.copy()
    return torch.from_numpy(array)


def pad_stack(rows: Sequence[np.ndarray], pad_value: int) -> torch.Tensor:
    """int64 (B, Lmax) tensor of 1-d rows, right-padded with `pad_value`; for (3, L) rows: (3, B, Lmax).

    Filled in numpy: a small torch.full wakes the intra-op thread pool (2.4 ms vs 0.02 ms on a busy 2-core host).
    """
    lengths = [row.shape[-1] for row in rows]
    out = np.full((*rows[0].shape[:-1], len(rows), max(lengths)), pad_value, dtype=np.int64)
    for b, row in enumerate(rows):
        out[..., b, : lengths[b]] = row
    return torch.from_numpy(out)


class Collator:
    """list of per-sample dicts → the collated batch of docs/design.md (any batch size ≥ 1)."""

    def __init__(self, pad_token_id: int = PAD_TOKEN_ID):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("Collator: expected at least one sample, found an empty list")
        keys = ("input_ids", "labels", "segment_ids", "position_ids")
        text = {key: [np.asarray(s[key]) for s in samples] for key in keys}
        self._check_lengths(samples, text)
        input_ids = pad_stack(text["input_ids"], self.pad_token_id)
        batch = {
            "input_ids": input_ids,
            "labels": pad_stack(text["labels"], IGNORE_INDEX),
            "attention_mask": torch.from_numpy(input_ids.numpy() != self.pad_token_id),  # as the original: ids != pad
            "position_ids": pad_stack(text["position_ids"], POSITION_PAD),
            "segment_ids": pad_stack(text["segment_ids"], 0),
            "action_label": torch.tensor([int(s["action_label"]) for s in samples], dtype=torch.int64),
        }
        batch.update(collate_frames([s["frames"] for s in samples])._asdict())
        features = self._vggt_features(samples)
        if features is not None:
            batch["vggt_features"] = features
        if all(STREAM_KEY in s for s in samples):
            batch[STREAM_KEY] = torch.tensor([list(s[STREAM_KEY]) for s in samples], dtype=torch.int64)
        batch["sample_id"] = [str(s.get("sample_id", s.get("__key__", ""))) for s in samples]
        return batch

    @staticmethod
    def _check_lengths(samples: Sequence[dict], text: dict[str, list[np.ndarray]]) -> None:
        for b, sample in enumerate(samples):
            length = text["input_ids"][b].shape[0]
            shapes = [tuple(text[k][b].shape) for k in ("labels", "segment_ids", "position_ids")]
            if text["input_ids"][b].ndim != 1 or shapes != [(length,), (length,), (3, length)]:
                where = f"sample {sample.get('sample_id', b)!r}"
                raise SchemaError(where, "text shapes", f"input_ids/labels/segment_ids (L,), position_ids (3, L), L={length}",
                                  shapes)

    @staticmethod
    def _vggt_features(samples: Sequence[dict]) -> torch.Tensor | list[torch.Tensor] | None:
        """(B, P, C) when every sample has P patches (pad mode); a list of (P_b, C) otherwise (crop mode: P follows
        each sample's image grid). `JanusVLN.fuse_3d` takes either."""
        present = [s.get("vggt_features") is not None for s in samples]
        if not any(present):
            return None
        if not all(present):
            missing = [s.get("sample_id", b) for b, s in enumerate(samples) if not present[b]]
            raise SchemaError("batch", "vggt_features", "features on every sample or on none", f"missing on {missing}")
        tensors = [_as_tensor(s["vggt_features"]) for s in samples]
        if len({(t.shape[1:], t.dtype) for t in tensors}) != 1 or tensors[0].ndim != 2:
            raise SchemaError("batch", "vggt_features", "(P, C) features of one C and dtype across the batch",
                              sorted({(tuple(t.shape), str(t.dtype)) for t in tensors}))
        return torch.stack(tensors) if len({t.shape for t in tensors}) == 1 else tensors


def batch_payload_bytes(batch: dict) -> int:
    """Bytes of tensor data in a collated batch (what crosses from a loader worker to the trainer)."""
    tensors = [t for v in batch.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)
