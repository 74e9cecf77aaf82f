"""Image file → canonical `CompactFrame` (SPEC §3, facts §3(a)): PIL decode, RGBA on white, bicubic resize.

Stores only the resized uint8 content plus its place on the canvas; the float32 canvas the original
builds is exactly float32(u8)/255 of these bytes (ToTensor), so nothing is lost. Also the Qwen grid
arithmetic (crop to multiples of 28), shared by the text side (token counts) and `train.pixels`.
numpy + PIL only: this runs in the offline build workers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from schemas.errors import SchemaError
from schemas.sample import CompactFrame

logger = logging.getLogger(__name__)

ImageMode = Literal["pad", "crop"]
IMAGE_MODES = ("pad", "crop")
TARGET_SIZE = 644  # the original's VGGT loader target (facts §3(a); the 518 line is commented out there)
PATCH_SIZE = 14
MERGE_SIZE = 2


def _open_rgb(path: Path) -> Image.Image:
    """Decode `path` to an RGB PIL image; RGBA is alpha-composited on opaque white first."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGBA":
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, img).convert("RGB")
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SchemaError(str(path), "image", "a readable PNG/JPEG image", f"{type(e).__name__}: {e}") from e


def resized_size(width: int, height: int, image_mode: ImageMode, target_size: int = TARGET_SIZE) -> tuple[int, int]:
    """(new_w, new_h) of the bicubic resize, with the original's float expression and Python round.

    The product `h * (target / w)` is kept in this order on purpose: for 640×480 it gives
    34.50000000000001 patches, which rounds to 35 (490 px), not 34 (facts §3(a)).
    """
    if image_mode == "pad" and width < height:
        return round(width * (target_size / height) / PATCH_SIZE) * PATCH_SIZE, target_size
    return target_size, round(height * (target_size / width) / PATCH_SIZE) * PATCH_SIZE


def load_compact_frame(
    path: str | Path, key: str, image_mode: ImageMode = "pad", target_size: int = TARGET_SIZE
) -> CompactFrame:
    """Load one image as the original VGGT loader would, stored compactly (uint8 content + placement).

    pad: long side `target_size`, content centred on a white `target_size`² canvas (`pad//2` before).
    crop: width `target_size`, centre-cropped to `target_size` rows if taller; the canvas is the content.
    """
    if image_mode not in IMAGE_MODES:
        raise SchemaError(str(path), "image_mode", f"one of {IMAGE_MODES}", image_mode)
    img = _open_rgb(Path(path))
    new_w, new_h = resized_size(img.width, img.height, image_mode, target_size)
    min_side = PATCH_SIZE if image_mode == "pad" else PATCH_SIZE * MERGE_SIZE  # crop: Qwen grid must be non-empty
    if min(new_w, new_h) < min_side:
        raise SchemaError(str(path), "image size", f"an aspect ratio giving ≥ {min_side} px on the short side "
                          f"after resizing to {target_size} ({image_mode} mode)", f"{img.width}x{img.height}")
    pixels = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    if image_mode == "pad":
        top, left = (target_size - new_h) // 2, (target_size - new_w) // 2
        return CompactFrame(key, np.ascontiguousarray(pixels), target_size, target_size, top, left)
    if new_h > target_size:
        start = (new_h - target_size) // 2
        pixels = pixels[start:start + target_size]
    pixels = np.ascontiguousarray(pixels)
    return CompactFrame(key, pixels, pixels.shape[0], pixels.shape[1], 0, 0)


def qwen_grid(canvas_h: int, canvas_w: int, patch: int = PATCH_SIZE, merge: int = MERGE_SIZE) -> tuple[int, int, int]:
    """`image_grid_thw` (1, gh, gw) of a canvas: patches per side, an odd count loses its last patch.

    Mirrors the original's crop of the right-most/bottom 14 px when a side has an odd patch count
    (facts §3(c)); the processor then sees multiples of 28, so its smart_resize is the identity.
    """
    if canvas_h % patch or canvas_w % patch:
        raise SchemaError("qwen_grid", "canvas size", f"multiples of {patch}", (canvas_h, canvas_w))
    gh = canvas_h // patch - (canvas_h // patch) % merge
    gw = canvas_w // patch - (canvas_w // patch) % merge
    if gh == 0 or gw == 0:
        raise SchemaError("qwen_grid", "canvas size", f"≥ {patch * merge} px per side", (canvas_h, canvas_w))
    return 1, gh, gw


def image_token_count(canvas_h: int, canvas_w: int, patch: int = PATCH_SIZE, merge: int = MERGE_SIZE) -> int:
    """LLM tokens (`<|image_pad|>` count) of one image: merged cells of its Qwen grid (529 for 644×644)."""
    t, gh, gw = qwen_grid(canvas_h, canvas_w, patch, merge)
    return t * gh * gw // (merge * merge)
