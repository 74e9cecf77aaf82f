"""Compact uint8 frames → the model's image inputs (SPEC §3), on whatever device the frames are on.

Bit-identical to the original on CPU and CUDA: canvas = float32(u8) / float32(255) and
(canvas − mean) / std as separate IEEE float32 ops, with the divisors as device tensors (CUDA turns
`x / 255` with a Python scalar into x · (1/255), which can differ in the last bit). A batch ships
~0.9 MB of uint8 per unique 640×480 frame instead of ~15 MB of float32 per image.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prep.frames import MERGE_SIZE, PATCH_SIZE, qwen_grid
from schemas.errors import SchemaError
from schemas.sample import CompactFrame

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPORAL_PATCH_SIZE = 2


class FrameBatch(NamedTuple):
    """The frame part of a collated batch (its field names are the batch keys)."""

    frames: torch.Tensor  # (F, Hmax, Wmax, 3) uint8, each unique frame once, content at [:h, :w]
    frame_geometry: torch.Tensor  # (F, 6) int64: content_h, content_w, canvas_h, canvas_w, top, left
    image_frames: torch.Tensor  # (NI,) int64: each image's row in `frames`, sample-major, oldest first
    images_per_sample: torch.Tensor  # (B,) int64
    frame_deltas: torch.Tensor  # (F,) bool: the row holds left-neighbour deltas (shards), undone on the device


FRAME_KEYS = FrameBatch._fields
CONSUMED_KEYS = tuple(k for k in FRAME_KEYS if k != "images_per_sample")  # it stays: the model maps 3D features


@functools.lru_cache(maxsize=None)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(255 as a 0-d tensor, mean (3, 1, 1), std (3, 1, 1)), float32 on `device`."""
    as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    return as_tensor(255.0), as_tensor(CLIP_MEAN).view(3, 1, 1), as_tensor(CLIP_STD).view(3, 1, 1)


def place_on_canvas(frames: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """uint8 canvases (F, 3, H, W), white (255) around each frame's content, for frames sharing one canvas size.

    `frames` (F, Hmax, Wmax, 3) uint8 holds content at [:h, :w]; `geometry` (F, 6) is
    (content_h, content_w, canvas_h, canvas_w, top, left). One slice copy per distinct geometry
    (a batch of one dataset usually has one or two).
    """
    rows_by_geometry: dict[tuple[int, ...], list[int]] = {}
    for row, geo in enumerate(geometry.tolist()):
        rows_by_geometry.setdefault(tuple(geo), []).append(row)
    canvas_sizes = {geo[2:4] for geo in rows_by_geometry}
    if len(canvas_sizes) != 1:
        raise ValueError(f"place_on_canvas: expected one canvas size, found {sorted(canvas_sizes)}")
    (canvas_h, canvas_w), = canvas_sizes
    canvas = frames.new_full((frames.shape[0], canvas_h, canvas_w, 3), 255)
    for (h, w, _, _, top, left), rows in rows_by_geometry.items():
        if len(rows) == frames.shape[0]:
            canvas[:, top:top + h, left:left + w] = frames[:, :h, :w]
        else:
            index = torch.tensor(rows, device=frames.device)
            canvas[index, top:top + h, left:left + w] = frames[index, :h, :w]
    return canvas.permute(0, 3, 1, 2).contiguous()


def unit_values(canvases: torch.Tensor) -> torch.Tensor:
    """float32(u8) / float32(255) of a uint8 tensor: what the original's ToTensor gives, bit for bit."""
    d255, _, _ = _constants(canvases.device)
    return canvases.float().div_(d255)


def canvas_from_frames(frames: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """float32 canvases (F, 3, H, W) in [0, 1], padding 1.0: the original loader's output, bit for bit."""
    return unit_values(place_on_canvas(frames, geometry))


def _as_unit(canvases: torch.Tensor, who: str) -> torch.Tensor:
    if canvases.ndim != 4 or canvases.shape[1] != 3 or canvases.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"{who}: expected (N, 3, H, W) uint8 or float32 in [0, 1], "
                         f"found {canvases.dtype} {tuple(canvases.shape)}")
    return unit_values(canvases) if canvases.dtype == torch.uint8 else canvases


def qwen_pixel_values(canvases: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL `pixel_values` (K·gh·gw, 1176) float32 and `image_grid_thw` (K, 3) int64 of canvases (N, 3, H, W).

    Canvases are uint8 or float32 in [0, 1]; `index` (K,) picks the images to emit as rows of
    `canvases`, repeats allowed (default: all N): each canvas is normalised once, and the output is
    written in one copy. Crops to multiples of 28 (drops the last 14 px of a side with an odd patch
    count), CLIP-normalises, repeats the frame to 2 time steps and patchifies in Qwen's order:
    merged cell (row-major), dy, dx; each row is channel, time, 14×14.
    """
    unit = _as_unit(canvases, "qwen_pixel_values")
    n, channels = unit.shape[:2]
    _, gh, gw = qwen_grid(unit.shape[2], unit.shape[3])
    m, p, t = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    _, mean, std = _constants(unit.device)
    normalised = (unit[:, :, : gh * p, : gw * p] - mean).div_(std)
    cells = normalised.view(n, channels, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    cells = cells.unsqueeze(6).expand(*cells.shape[:6], t, p, p)  # n, cy, cx, dy, dx, C, time, py, px
    cells = cells.contiguous() if index is None else torch.index_select(cells, 0, index.to(unit.device))
    pixel_values = cells.view(-1, channels * t * p * p)
    grid = torch.tensor([1, gh, gw], dtype=torch.int64, device=unit.device).expand(cells.shape[0], 3).contiguous()
    return pixel_values, grid


def vggt_images(canvases: torch.Tensor) -> torch.Tensor:
    """VGGT input (N, 3, gh·14, gw·14) float32 in [0, 1] of canvases (N, 3, H, W), uint8 or float32 in [0, 1].

    The canvas itself in pad mode (644² → 46×46 grid); when the Qwen crop changed the size (crop mode,
    e.g. 490 rows → 476), the original bilinearly resizes the VGGT copy to the grid (facts §3(e)).
    """
    unit = _as_unit(canvases, "vggt_images")
    _, gh, gw = qwen_grid(unit.shape[2], unit.shape[3])
    target = (gh * PATCH_SIZE, gw * PATCH_SIZE)
    if tuple(unit.shape[2:]) != target:
        unit = F.interpolate(unit, size=target, mode="bilinear", align_corners=False)
    return unit


def collate_frames(samples: Sequence[Sequence[CompactFrame]]) -> FrameBatch:
    """Batch the frames of B samples, each unique `key` stored once (zero-padded to the largest content).

    Frames keep their encoding (`CompactFrame.row_deltas`; `undo_row_deltas` decodes on the device): the
    shard loader ships them as stored, so a worker never runs the cumulative sum (0.5 ms per 640×480 frame).
    """
    unique: dict[str, int] = {}
    kept: list[CompactFrame] = []
    image_frames: list[int] = []
    for sample in samples:
        for frame in sample:
            row = unique.setdefault(frame.key, len(kept))
            if row == len(kept):
                kept.append(frame)
            elif (kept[row].geometry, kept[row].row_deltas) != (frame.geometry, frame.row_deltas):
                raise SchemaError(f"frame {frame.key!r}", "geometry, row_deltas", f"{kept[row].geometry}, "
                                  f"{kept[row].row_deltas} (same key earlier in the batch)",
                                  f"{frame.geometry}, {frame.row_deltas}")
            image_frames.append(row)
    max_h = max((f.pixels.shape[0] for f in kept), default=0)
    max_w = max((f.pixels.shape[1] for f in kept), default=0)
    shape = (len(kept), max_h, max_w, 3)
    if torch.utils.data.get_worker_info() is not None:
        frames_t = torch.empty(shape, dtype=torch.uint8).share_memory_()  # filled once, sent without a copy
    else:  # numpy's allocator: huge pages, 2.6× faster to fill than a fresh torch.empty (bench/loader_throughput.py)
        frames_t = torch.from_numpy(np.empty(shape, dtype=np.uint8))
    frames = frames_t.numpy()
    for row, frame in enumerate(kept):
        h, w = frame.pixels.shape[:2]
        frames[row, :h, :w] = frame.pixels
        frames[row, h:] = 0
        frames[row, :h, w:] = 0
    geometry = np.array([f.geometry for f in kept], dtype=np.int64).reshape(len(kept), 6)
    return FrameBatch(frames_t, torch.from_numpy(geometry), torch.tensor(image_frames, dtype=torch.int64),
                      torch.tensor([len(s) for s in samples], dtype=torch.int64),
                      torch.tensor([f.row_deltas for f in kept], dtype=torch.bool))


def undo_row_deltas(frames: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Pixels of (F, H, W, 3) uint8 frames whose rows flagged in `deltas` (F,) hold left-neighbour differences
    mod 256 (`schemas.stored.delta_filter`): a uint8 cumulative sum along the width, on the frames' device.
    The zero padding right of a frame's content turns into copies of its last pixel; only [:h, :w] is read."""
    rows = [i for i, flag in enumerate(deltas.tolist()) if flag]
    if not rows:
        return frames
    if len(rows) == frames.shape[0]:
        return frames.cumsum(2, dtype=torch.uint8)
    index = torch.tensor(rows, device=frames.device)
    return frames.index_copy(0, index, frames[index].cumsum(2, dtype=torch.uint8))


class PixelDecoder(torch.nn.Module):
    """Collated uint8 frame keys → `pixel_values`, `image_grid_thw`, `images_vggt`, on the frames' device.

    Each unique frame is decoded once per batch (a sample's 9 history images often repeat frame 0);
    frames sharing a canvas size are decoded in one batched op, then picked per image in one copy.
    """

    def forward(self, batch: dict) -> dict:
        frames = undo_row_deltas(batch["frames"], batch["frame_deltas"])
        device = frames.device
        geometry = batch["frame_geometry"].to(device)
        image_frames: list[int] = batch["image_frames"].tolist()
        images_per_sample: list[int] = batch["images_per_sample"].tolist()
        if sum(images_per_sample) != len(image_frames) or frames.ndim != 4 or geometry.shape != (frames.shape[0], 6):
            raise ValueError(f"PixelDecoder: inconsistent frame keys: frames {tuple(frames.shape)}, "
                             f"frame_geometry {tuple(geometry.shape)}, {len(image_frames)} images, "
                             f"images_per_sample {images_per_sample}")
        groups: dict[tuple[int, int], list[int]] = {}  # canvas size → frame rows
        for row, (_, _, canvas_h, canvas_w, _, _) in enumerate(geometry.tolist()):
            groups.setdefault((canvas_h, canvas_w), []).append(row)
        patches, grids, vggt = [], [], {}  # vggt: frame row → (N_g, 3, h, w) tensor of its group, position
        for rows in groups.values():
            position = {row: i for i, row in enumerate(rows)}
            images = [i for i, row in enumerate(image_frames) if row in position]
            index = torch.tensor(rows, device=device) if len(rows) < frames.shape[0] else slice(None)
            unit = canvas_from_frames(frames[index], geometry[index])
            local = torch.tensor([position[image_frames[i]] for i in images], device=device)
            values, grid = qwen_pixel_values(unit, local)
            patches.append((images, values.view(len(images), -1, values.shape[-1])))
            grids.append((images, grid))
            group_vggt = vggt_images(unit)
            vggt.update({row: (group_vggt, position[row]) for row in rows})
        out = {key: value for key, value in batch.items() if key not in CONSUMED_KEYS}
        if len(patches) == 1:  # one canvas size (the usual case): already in image order, no extra copy
            out["pixel_values"], out["image_grid_thw"] = patches[0][1].flatten(0, 1), grids[0][1]
        else:
            out["pixel_values"] = torch.cat(self._in_image_order(patches, len(image_frames)))
            out["image_grid_thw"] = torch.stack(self._in_image_order(grids, len(image_frames)))
        out["images_vggt"] = self._vggt_per_sample([vggt[row] for row in image_frames], images_per_sample)
        return out

    @staticmethod
    def _in_image_order(parts: list[tuple[list[int], torch.Tensor]], num_images: int) -> list[torch.Tensor]:
        """Interleave per-group results (image positions, tensor with one entry per image) back into image order."""
        by_image: list[torch.Tensor | None] = [None] * num_images
        for images, values in parts:
            for i, image in enumerate(images):
                by_image[image] = values[i]
        return by_image

    @staticmethod
    def _vggt_per_sample(images: list[tuple[torch.Tensor, int]], images_per_sample: list[int]) -> list[torch.Tensor]:
        """(N_i, 3, H, W) per sample: one index op when the sample's frames share a group (always, in practice)."""
        result, start = [], 0
        for b, count in enumerate(images_per_sample):
            chunk, start = images[start:start + count], start + count
            sources = {id(group) for group, _ in chunk}
            if len(sources) == 1:
                group = chunk[0][0]
                result.append(group[torch.tensor([pos for _, pos in chunk], device=group.device)])
                continue
            shapes = sorted({tuple(group.shape[1:]) for group, _ in chunk})
            if len(shapes) > 1:
                raise ValueError(f"PixelDecoder: sample {b} mixes VGGT input sizes {shapes}")
            result.append(torch.stack([group[pos] for group, pos in chunk]))
        return result
