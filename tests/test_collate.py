"""Collator: padding values and shapes (batch sizes 1 and 3, different lengths), frame de-duplication,
VGGT features, bookkeeping pass-through, uint8/int only; checked against per-sample references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.errors import SchemaError
from schemas.sample import CompactFrame
from train.collate import PAD_TOKEN_ID, STREAM_KEY, Collator, batch_payload_bytes
from train.pixels import PixelDecoder


def _frame(rng: np.random.Generator, key: str, h: int, w: int) -> CompactFrame:
    return CompactFrame(key, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 56, 56, (56 - h) // 2, 0)


def _sample(rng: np.random.Generator, length: int, frames: list[CompactFrame], index: int, vggt=None) -> dict:
    ids = rng.integers(0, 151000, length)  # never the pad id
    labels = np.where(np.arange(length) >= length - 2, ids, -100)
    sample = {"__key__": f"k{index}", "sample_id": f"ep/{index}", "input_ids": ids, "labels": labels,
              "segment_ids": np.where(labels != -100, 4, 0), "position_ids": rng.integers(0, 50, (3, length)),
              "action_label": np.int64(index % 4), "frames": frames, STREAM_KEY: (2, 1, 4, 10 + index)}
    if vggt is not None:
        sample["vggt_features"] = vggt
    return sample


@pytest.fixture
def samples() -> list[dict]:
    rng = np.random.default_rng(0)
    f0, f1, f2 = _frame(rng, "f0", 40, 56), _frame(rng, "f1", 56, 50), _frame(rng, "f2", 30, 20)
    return [_sample(rng, 7, [f0, f0, f1], 0), _sample(rng, 12, [f1, f2], 1), _sample(rng, 3, [f2], 2)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_text_padding_values_and_shapes(samples, batch_size):
    chosen = samples[:batch_size] if batch_size == 1 else samples
    batch = Collator()(chosen)
    lmax = max(len(s["input_ids"]) for s in chosen)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["segment_ids"].shape == (batch_size, lmax)
    assert batch["position_ids"].shape == (3, batch_size, lmax) and batch["attention_mask"].dtype == torch.bool
    for b, s in enumerate(chosen):
        n = len(s["input_ids"])
        for key, pad in (("input_ids", PAD_TOKEN_ID), ("labels", -100), ("segment_ids", 0)):
            assert batch[key][b, :n].tolist() == s[key].tolist() and set(batch[key][b, n:].tolist()) <= {pad}
        assert batch["position_ids"][:, b, :n].tolist() == s["position_ids"].tolist()
        assert set(batch["position_ids"][:, b, n:].flatten().tolist()) <= {1}
        assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (lmax - n)
    assert batch["action_label"].tolist() == [int(s["action_label"]) for s in chosen]
    assert batch[STREAM_KEY].tolist() == [list(s[STREAM_KEY]) for s in chosen]
    assert batch["sample_id"] == [s["sample_id"] for s in chosen]
    floats = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats == [] and batch["frames"].dtype == torch.uint8


def test_frames_deduplicated_and_padded(samples):
    batch = Collator()(samples)
    keys = ["f0", "f1", "f2"]  # first-seen order
    assert batch["frames"].shape == (3, 56, 56, 3)
    assert batch["image_frames"].tolist() == [0, 0, 1, 1, 2, 2] and batch["images_per_sample"].tolist() == [3, 2, 1]
    by_key = {f.key: f for s in samples for f in s["frames"]}
    for row, key in enumerate(keys):
        frame = by_key[key]
        h, w = frame.pixels.shape[:2]
        assert np.array_equal(batch["frames"][row, :h, :w].numpy(), frame.pixels)
        assert not batch["frames"][row, h:].any() and not batch["frames"][row, :, w:].any()
        assert batch["frame_geometry"][row].tolist() == list(frame.geometry)


def test_pixels_of_a_batch_equal_per_sample_decoding(samples):
    """De-duplication changes nothing downstream: batch-of-3 pixel_values = the samples decoded one by one."""
    decoder = PixelDecoder()
    together = decoder(Collator()(samples))
    alone = [decoder(Collator()([s])) for s in samples]
    assert torch.equal(together["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    assert torch.equal(together["image_grid_thw"], torch.cat([a["image_grid_thw"] for a in alone]))
    for got, a in zip(together["images_vggt"], alone):
        assert torch.equal(got, a["images_vggt"][0])


def test_vggt_features_stacked_and_required_on_all(samples):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((3, 4, 2048)).astype(np.float32)
    bf16_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    with_features = [{**s, "vggt_features": bf16_bits[i]} for i, s in enumerate(samples)]
    batch = Collator()(with_features)
    assert batch["vggt_features"].dtype == torch.bfloat16 and batch["vggt_features"].shape == (3, 4, 2048)
    assert torch.equal(batch["vggt_features"], torch.from_numpy(values).to(torch.bfloat16))
    half = [{**s, "vggt_features": values[i].astype(np.float16)} for i, s in enumerate(samples)]
    assert torch.equal(Collator()(half)["vggt_features"], torch.from_numpy(values.astype(np.float16)))
    assert "vggt_features" not in Collator()(samples)
    with pytest.raises(SchemaError, match="vggt_features"):
        Collator()(with_features[:2] + samples[2:])


def test_vggt_features_of_different_patch_counts_stay_per_sample(samples):
    """Crop mode: a sample's patch count follows its image grid, so a batch may mix them."""
    rng = np.random.default_rng(2)
    values = [rng.standard_normal((p, 128)).astype(np.float32) for p in (1196, 2116, 1196)]
    batch = Collator()([{**s, "vggt_features": v} for s, v in zip(samples, values)])
    assert isinstance(batch["vggt_features"], list)
    assert all(torch.equal(t, torch.from_numpy(v)) for t, v in zip(batch["vggt_features"], values))
    assert batch_payload_bytes(batch) == batch_payload_bytes({k: v for k, v in batch.items()
                                                              if k != "vggt_features"}) + sum(v.nbytes for v in values)
    with pytest.raises(SchemaError, match="one C and dtype"):
        Collator()([{**s, "vggt_features": v.astype(np.float16) if i else v} for i, (s, v) in
                    enumerate(zip(samples, values))])


def test_bad_shapes_and_empty_batch_are_refused(samples):
    broken = {**samples[0], "labels": samples[0]["labels"][:-1]}
    with pytest.raises(SchemaError, match="ep/0"):
        Collator()([broken])
    with pytest.raises(ValueError):
        Collator()([])


def test_payload_is_uint8_frames_plus_int_text():
    rng = np.random.default_rng(2)
    frames = [_frame(rng, f"f{i}", 40, 56) for i in range(9)]
    batch = Collator()([_sample(rng, 100, frames, 0)])
    text_bytes = 100 * 8 * 6 + 100  # input_ids, labels, segment_ids, 3 position rows (int64) + bool mask
    frame_bytes = 9 * 40 * 56 * 3 + 9 * 6 * 8 + 9 * 8 + 8 + 9  # frames, geometry, image_frames, per-sample, deltas
    assert batch_payload_bytes(batch) == text_bytes + frame_bytes + 8 + 4 * 8  # + action_label + __stream__
