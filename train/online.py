"""Online dataset: reads episode folders (or annotation files) at training time, like the original.

It yields the same per-sample dicts as the shard stream (text tensors + uint8 `CompactFrame`s), so the
same collator and on-device `PixelDecoder` follow. It is the reference the shard path is tested
against, and lets users train on small data without a build — at the cost the build removes
(every image decoded and resized on every epoch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prep.annotations import read_annotations
from prep.episodes import read_samples
from prep.frames import load_compact_frame, qwen_grid
from prep.text import TextEncoder
from schemas.sample import SampleRecord


class OnlineDataset(torch.utils.data.Dataset):
    """Map-style dataset over the original input forms; item i = sample i in the original's order."""

    def __init__(self, source: str | Path, model_path: str | Path, image_mode: str = "pad",
                 max_history_images: int = 8, max_length: int | None = None, image_root: str | None = None):
        source = Path(source)
        if source.is_file():
            self.samples, self.rejects = read_annotations(source, image_root)
        else:
            self.samples, self.rejects, _ = read_samples(source, max_history_images)
        self.encoder = TextEncoder.from_model_path(str(model_path))
        self.image_mode = image_mode
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return encode_sample(self.samples[index], self.encoder, self.image_mode, self.max_length)


def encode_sample(record: SampleRecord, encoder: TextEncoder, image_mode: str, max_length: int | None = None) -> dict:
    """One sample dict: frames decoded once per distinct image, text tokenised once."""
    loaded: dict[str, object] = {}
    frames = []
    for key, path in zip(record.frame_keys, record.frame_paths):
        if key not in loaded:
            loaded[key] = load_compact_frame(path, key, image_mode)
        frames.append(loaded[key])
    text = encoder.encode_text(record, [qwen_grid(f.canvas_h, f.canvas_w) for f in frames])
    if max_length is not None and len(text) > max_length:
        raise ValueError(f"{record.sample_id}: {len(text)} tokens, more than max_length {max_length}; "
                         "the build rejects such samples, the online path refuses them rather than truncating")
    return {"__key__": record.key, "sample_id": record.sample_id, "input_ids": text.input_ids,
            "labels": text.labels, "segment_ids": text.segment_ids, "position_ids": text.position_ids,
            "action_label": np.int64(record.action_label), "frames": frames}
