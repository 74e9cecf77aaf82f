"""train.pixels against the original's sample goldens (fixtures/original/samples), its collator batch, and
transformers' Qwen2-VL image processor as an independent reference."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prep.frames import image_token_count, load_compact_frame
from schemas.errors import SchemaError
from schemas.sample import CompactFrame, frame_key
from schemas.stored import delta_filter
from train.pixels import (FRAME_KEYS, PixelDecoder, canvas_from_frames, collate_frames, place_on_canvas,
                          qwen_pixel_values, undo_row_deltas, vggt_images)

FAST_SAMPLES = ("ep_a__step_12_STOP", "ep_b__step_2_MOVE_FORWARD", "ep_c__step_0_STOP")
SLOW_SAMPLES = [f"ep_a__step_{step}" for step in ("0_MOVE_FORWARD", "1_MOVE_FORWARD", "2_MOVE_FORWARD", "3_TURN_LEFT",
                "4_TURN_LEFT", "5_MOVE_FORWARD", "6_MOVE_FORWARD", "07_TURN_RIGHT", "8_MOVE_FORWARD", "9_MOVE_FORWARD",
                "10_turn_right")] + ["ep_b__step_0_TURN_LEFT"]  # with FAST_SAMPLES: all 15 golden samples


def sha256(array: np.ndarray | torch.Tensor) -> str:
    if isinstance(array, torch.Tensor):
        array = array.cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def frame_cache(episodes_dir):
    cache: dict[tuple[str, str], CompactFrame] = {}

    def load(rel: str, mode: str = "pad") -> CompactFrame:
        if (rel, mode) not in cache:
            cache[rel, mode] = load_compact_frame(episodes_dir / rel, frame_key(rel) + mode, mode)
        return cache[rel, mode]
    return load


@pytest.fixture(scope="module")
def image_processor(tokenizer_dir):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(tokenizer_dir))


def decode(samples: list[list[CompactFrame]], device: str = "cpu", extra: dict | None = None) -> dict:
    batch = {key: value.to(device) for key, value in zip(FRAME_KEYS, collate_frames(samples))}
    return PixelDecoder()({**batch, **(extra or {})})


def check_sample_golden(fixtures_dir: Path, frame_cache, name: str, device: str = "cpu") -> None:
    with np.load(fixtures_dir / "samples" / f"{name}.npz") as z:
        golden = {key: z[key] for key in z.files}
    out = decode([[frame_cache(str(rel)) for rel in golden["images"]]], device)
    pixel_values, vggt = out["pixel_values"].cpu(), out["images_vggt"][0].cpu()
    assert tuple(pixel_values.shape) == tuple(golden["pixel_values_shape"]) and pixel_values.dtype == torch.float32
    np.testing.assert_array_equal(out["image_grid_thw"].cpu().numpy(), golden["image_grid_thw"])
    np.testing.assert_array_equal(pixel_values[-2116:].numpy(), golden["pixel_values_last"])  # bit-exact (≤ 1e-6 asked)
    assert sha256(pixel_values) == golden["pixel_values_sha256"]
    assert [sha256(block) for block in pixel_values.view(-1, 2116, 1176)] == list(golden["pixel_values_sha256_per_image"])
    assert [sha256(image) for image in vggt] == list(golden["images_vggt_f32_sha256_per_image"])
    np.testing.assert_array_equal((vggt * 255).round().to(torch.uint8).numpy(), golden["images_vggt_u8"])


@pytest.mark.parametrize("name", FAST_SAMPLES)
def test_sample_matches_original_bit_for_bit(fixtures_dir, frame_cache, name):
    check_sample_golden(fixtures_dir, frame_cache, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_SAMPLES)
def test_remaining_samples_match_original(fixtures_dir, frame_cache, name):
    check_sample_golden(fixtures_dir, frame_cache, name)


def test_collator_batch_of_two(fixtures_dir, frame_cache):
    meta = json.loads((fixtures_dir / "samples" / "collator_b2.json").read_text())
    samples = [[frame_cache(rel)] * 9 for rel in meta["samples"]]  # j = 0: frame 0 nine times
    collated = collate_frames(samples)
    assert collated.frames.shape == (2, 504, 644, 3) and collated.image_frames.tolist() == [0] * 9 + [1] * 9
    out = decode(samples, extra={"input_ids": torch.zeros(2, 3)})
    assert sha256(out["pixel_values"]) == meta["pixel_values_sha256"]
    assert list(out["pixel_values"].shape) == meta["keys"]["pixel_values"]["shape"]
    with np.load(fixtures_dir / "samples" / "collator_b2.npz") as z:
        np.testing.assert_array_equal(out["image_grid_thw"].numpy(), z["image_grid_thw"])
    assert [list(v.shape) for v in out["images_vggt"]] == [item["shape"] for item in meta["keys"]["images_vggt"]["items"]]
    assert set(out) == {"input_ids", "images_per_sample", "pixel_values", "image_grid_thw", "images_vggt"}


@pytest.mark.parametrize("rel", ["ep_a/step_0_MOVE_FORWARD.png", "ep_b/step_0_TURN_LEFT.png", "ep_c/step_0_STOP.png"])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_agrees_with_transformers_image_processor(frame_cache, image_processor, rel, mode):
    frame = frame_cache(rel, mode)
    collated = collate_frames([[frame]])
    canvas = place_on_canvas(collated.frames, collated.frame_geometry)
    pixel_values, grid = qwen_pixel_values(canvas)
    _, gh, gw = grid[0].tolist()
    image = canvas[0, :, : gh * 14, : gw * 14].permute(1, 2, 0).numpy()  # the original's crop to multiples of 28
    pixels = image.shape[0] * image.shape[1]
    reference = image_processor(images=[image], size={"shortest_edge": pixels, "longest_edge": pixels}, return_tensors="np")
    np.testing.assert_array_equal(reference["image_grid_thw"], grid.numpy())
    np.testing.assert_allclose(pixel_values.numpy(), reference["pixel_values"], rtol=0, atol=1e-6)


def test_crop_mode_grid_and_vggt_resize(fixtures_dir, frame_cache, image_processor):
    frame = frame_cache("ep_a/step_0_MOVE_FORWARD.png", "crop")
    out = decode([[frame, frame]])
    assert out["image_grid_thw"].tolist() == [[1, 34, 46]] * 2 and image_token_count(490, 644) == 391
    assert out["pixel_values"].shape == (2 * 34 * 46, 1176)
    with np.load(fixtures_dir / "vggt" / "load_and_preprocess_images.npz") as z:
        golden = torch.from_numpy(z["rgb_640x480_crop"]).float() / 255  # (1, 3, 490, 644) original crop canvas
    expected = F.interpolate(golden, size=(476, 644), mode="bilinear", align_corners=False)[0]
    vggt = out["images_vggt"][0]
    assert vggt.shape == (2, 3, 476, 644)
    torch.testing.assert_close(vggt[1], expected, rtol=0, atol=1e-6)
    image = (golden[0, :, :476] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # Qwen crop of the golden
    size = {"shortest_edge": 476 * 644, "longest_edge": 476 * 644}
    reference = image_processor(images=[image], size=size, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"][:1564].numpy(), reference["pixel_values"], rtol=0, atol=1e-6)


def test_place_on_canvas_matches_numpy_reference():
    rng = np.random.default_rng(0)
    sizes = [(490, 644, 77, 0), (644, 490, 0, 77), (504, 644, 70, 0), (490, 644, 77, 0), (28, 30, 600, 614)]
    frames = rng.integers(0, 256, (len(sizes), 644, 644, 3), dtype=np.uint8)  # junk outside the content too
    geometry = torch.tensor([(h, w, 644, 644, top, left) for h, w, top, left in sizes])
    expected = np.full((len(sizes), 644, 644, 3), 255, dtype=np.uint8)
    for i, (h, w, top, left) in enumerate(sizes):
        expected[i, top:top + h, left:left + w] = frames[i, :h, :w]
    canvas = place_on_canvas(torch.from_numpy(frames), geometry)
    np.testing.assert_array_equal(canvas.permute(0, 2, 3, 1).numpy(), expected)
    unit = canvas_from_frames(torch.from_numpy(frames), geometry)
    np.testing.assert_array_equal(unit.numpy(), expected.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))


def test_decoder_mixes_canvas_sizes_in_image_order(frame_cache):
    pad_a, pad_b = frame_cache("ep_a/step_0_MOVE_FORWARD.png"), frame_cache("ep_b/step_0_TURN_LEFT.png")
    crop_a, crop_c = frame_cache("ep_a/step_1_MOVE_FORWARD.png", "crop"), frame_cache("ep_c/step_0_STOP.png", "crop")
    samples = [[pad_a, pad_a, pad_b], [crop_a, crop_a], [pad_b], [crop_c]]
    collated = collate_frames(samples)
    assert collated.frames.shape[0] == 4 and collated.image_frames.tolist() == [0, 0, 1, 2, 2, 1, 3]
    assert collated.images_per_sample.tolist() == [3, 2, 1, 1]
    out = decode(samples)
    single = [decode([[f]]) for sample in samples for f in sample]  # each image alone: the reference order
    torch.testing.assert_close(out["pixel_values"], torch.cat([s["pixel_values"] for s in single]), rtol=0, atol=0)
    torch.testing.assert_close(out["image_grid_thw"], torch.cat([s["image_grid_thw"] for s in single]), rtol=0, atol=0)
    flat = [s["images_vggt"][0][0] for s in single]
    for got, want in zip(out["images_vggt"], [flat[0:3], flat[3:5], flat[5:6], flat[6:7]]):
        torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=0)
    shapes = [(3, 3, 644, 644), (2, 3, 476, 644), (1, 3, 644, 644), (1, 3, 504, 644)]
    assert [tuple(v.shape) for v in out["images_vggt"]] == shapes


def test_inconsistent_inputs_are_refused(frame_cache):
    pad_a, crop_a = frame_cache("ep_a/step_0_MOVE_FORWARD.png"), frame_cache("ep_a/step_0_MOVE_FORWARD.png", "crop")
    clash = CompactFrame(pad_a.key, crop_a.pixels, crop_a.canvas_h, crop_a.canvas_w, 0, 0)
    with pytest.raises(SchemaError, match="geometry"):
        collate_frames([[pad_a], [clash]])
    with pytest.raises(ValueError, match="mixes VGGT input sizes"):
        decode([[pad_a, crop_a]])
    with pytest.raises(ValueError, match="expected"):
        qwen_pixel_values(torch.zeros(1, 644, 644, 3, dtype=torch.uint8))


def as_row_deltas(frame: CompactFrame) -> CompactFrame:
    """The frame as the shard loader ships it: left-neighbour deltas, as stored."""
    return dataclasses.replace(frame, pixels=delta_filter(frame.pixels), row_deltas=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_row_delta_frames_decode_like_raw_ones(frame_cache, device):
    """Shard frames stay delta-coded until PixelDecoder: any mix with raw frames (and zero padding of smaller
    contents) decodes bit-identically to all-raw frames."""
    pad_a, pad_b = frame_cache("ep_a/step_0_MOVE_FORWARD.png"), frame_cache("ep_b/step_0_TURN_LEFT.png")
    crop_a = frame_cache("ep_a/step_1_MOVE_FORWARD.png", "crop")
    raw = [[pad_a, pad_b, pad_a], [crop_a], [pad_b]]
    mixed = [[as_row_deltas(pad_a), pad_b, as_row_deltas(pad_a)], [as_row_deltas(crop_a)], [pad_b]]
    collated = collate_frames(mixed)
    assert collated.frame_deltas.tolist() == [True, False, True]
    want, got = decode(raw, device), decode(mixed, device)
    for key in ("pixel_values", "image_grid_thw"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    for a, b in zip(got["images_vggt"], want["images_vggt"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    frames = collated.frames.to(device)
    decoded = undo_row_deltas(frames, collated.frame_deltas).cpu()
    h, w = pad_a.pixels.shape[:2]
    assert torch.equal(decoded[1], frames[1].cpu()) and torch.equal(decoded[0, :h, :w], torch.from_numpy(pad_a.pixels.copy()))
    with pytest.raises(SchemaError, match="row_deltas"):  # one key, two encodings: refused
        collate_frames([[pad_a], [as_row_deltas(pad_a)]])


@pytest.mark.gpu
def test_cuda_is_bit_identical(fixtures_dir, frame_cache):
    for name in FAST_SAMPLES:
        check_sample_golden(fixtures_dir, frame_cache, name, device="cuda")
    frame = frame_cache("ep_a/step_0_MOVE_FORWARD.png", "crop")
    on_gpu, on_cpu = decode([[frame]], "cuda"), decode([[frame]])
    torch.testing.assert_close(on_gpu["pixel_values"].cpu(), on_cpu["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(on_gpu["images_vggt"][0].cpu(), on_cpu["images_vggt"][0], rtol=0, atol=1e-6)
    assert vggt_images(canvas_from_frames(*collate_frames([[frame]])[:2]).cuda()).device.type == "cuda"
