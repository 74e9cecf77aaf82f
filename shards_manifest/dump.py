"""`dump`: one sample's training tensors exactly as the model receives them, written to an .npz.

Path: shard → per-sample dict (docs/design.md) → `train.collate.Collator` (batch of 1) → `train.pixels.PixelDecoder`
→ `prep.text.loss_weights_from_segments` for the given weights; so batch shapes: input_ids (1, L),
position_ids (3, 1, L), pixel_values (ΣP, 1176), images_vggt (N, 3, H, W). A 9-image sample is ~140 MB of float32.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from prep.text import loss_weights_from_segments
from schemas.errors import SchemaError
from schemas.manifest import Manifest
from schemas.stored import MAX_SEQUENCE_LENGTH, PackedFrame, StoredSample
from shards_manifest.shard_io import iter_shard
from train.collate import Collator
from train.pixels import PixelDecoder
from train.stream import sample_to_dict

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.5, 1.0, 2.0, 3.0)  # sub-instruction, 2D, 3D, action: the original training scripts' values
TEXT_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids", "action_label")


def parse_weights(text: str) -> tuple[float, float, float, float]:
    """"0.5,1,2,3" → (0.5, 1.0, 2.0, 3.0): the loss weights of segments 1..4."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError as e:
        raise SchemaError("--weights", "value", "4 comma-separated numbers (sub, 2D, 3D, action)", text) from e
    if len(weights) != 4:
        raise SchemaError("--weights", "value", "4 comma-separated numbers (sub, 2D, 3D, action)", text)
    return weights  # type: ignore[return-value]


def sample_dict(sample: StoredSample, frames: dict[str, PackedFrame]) -> dict:
    """The per-sample dict of docs/design.md (what `ShardStream` yields); repeated frames share one object."""
    return sample_to_dict(sample, {key: frames[key].unpack() for key in dict.fromkeys(sample.frame_keys)})


def find_samples(root_url: str, manifest: Manifest, wanted: Iterable[str], shards: Sequence[str] = (),
                 max_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, tuple[str, dict]]:
    """{wanted id: (shard name, per-sample dict)}, each id an original sample id or a shard key.

    Reads shards in manifest order (or only `shards`) and stops once every id is found; missing ids are absent.
    """
    remaining = set(wanted)
    found: dict[str, tuple[str, dict]] = {}
    listed = {s.name for s in manifest.shards}
    shards = [name if name in listed or name.endswith(".tar") else f"{name}.tar" for name in shards]
    unknown = sorted(set(shards) - listed)
    if unknown:
        raise SchemaError(root_url, "--shard", f"shard names listed in the manifest (like {manifest.shards[0].name})"
                          if manifest.shards else "shard names listed in the manifest (it lists none)",
                          ", ".join(unknown))
    names = [s.name for s in manifest.shards if not shards or s.name in shards]
    for name in names:
        if not remaining:
            break
        frames: dict[str, PackedFrame] = {}
        for record in iter_shard(f"{root_url.rstrip('/')}/{name}", lazy_frames=True, max_length=max_length):
            if isinstance(record, PackedFrame):
                frames[record.key] = record
                continue
            hits = remaining & {record.sample_id, record.key}
            for hit in hits:
                found[hit] = (name, sample_dict(record, frames))
            remaining -= hits
            if not remaining:
                break
    return found


def training_tensors(sample: dict, weights: Sequence[float] = DEFAULT_WEIGHTS, device: str = "cpu") -> dict:
    """The model's inputs for a batch of this one sample, as numpy arrays (bfloat16 features widened to float32)."""
    batch = Collator()([sample])
    frame_batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    decoded = PixelDecoder()(frame_batch)
    out = {key: decoded[key].cpu().numpy() for key in TEXT_KEYS}
    out["loss_weights"] = loss_weights_from_segments(batch["segment_ids"], batch["labels"], list(weights),
                                                     batch["input_ids"]).numpy()
    out["pixel_values"] = decoded["pixel_values"].cpu().numpy()
    out["image_grid_thw"] = decoded["image_grid_thw"].cpu().numpy()
    out["images_vggt"] = decoded["images_vggt"][0].cpu().numpy()
    if "vggt_features" in decoded:
        features = decoded["vggt_features"][0]
        out["vggt_features"] = features.float().cpu().numpy()  # f16/bf16 → f32 is exact
        out["vggt_features_dtype"] = np.array(str(features.dtype).removeprefix("torch."))
    return out


def dump_sample(root_url: str, manifest: Manifest, sample_id: str, out_path: str,
                weights: Sequence[float] = DEFAULT_WEIGHTS, device: str = "cpu", shards: Sequence[str] = ()) -> dict:
    """Write the sample's training tensors (plus sample_id, key, shard, weights) to `out_path` (.npz, uncompressed)."""
    max_length = manifest.build_config.get("max_length", MAX_SEQUENCE_LENGTH)
    found = find_samples(root_url, manifest, [sample_id], shards, max_length)
    if sample_id not in found:
        searched = len(shards) if shards else len(manifest.shards)
        raise SchemaError(root_url, "SAMPLE_ID", "an original sample id (like ep_a/step_8_MOVE_FORWARD.png) or a "
                          f"shard key stored in the {searched} shards searched", sample_id)
    shard, sample = found[sample_id]
    tensors = training_tensors(sample, weights, device)
    meta = {"sample_id": np.array(sample["sample_id"]), "key": np.array(sample["__key__"]), "shard": np.array(shard),
            "loss_weight_values": np.asarray(weights, dtype=np.float32),
            "frame_keys": np.array([f.key for f in sample["frames"]])}
    with open(out_path, "wb") as f:
        np.savez(f, **tensors, **meta)
    log.info("dumped %s (%s, key %s) to %s", sample["sample_id"], shard, sample["__key__"], out_path)
    return {**tensors, **meta}
