"""Records that flow from the episode readers to the shards and back: one training sample and one frame.

A sample stores text tensors and references to frames; a frame is stored once per shard as its uint8
content without the padding (a 640×480 frame: 947 kB instead of 4.97 MB float32 canvas + 9.95 MB patches).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

ACTIONS = ("STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")  # index = action label (SPEC §2)
ACTION_LABELS = {name: i for i, name in enumerate(ACTIONS)}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str, max_chars: int = 48) -> str:
    """A WebDataset key for `text`: readable prefix (`/` shown as `__`) + 10 hex digits of the sha1 of `text` itself,
    so distinct texts never share a key (also `a/b` and `a__b`, whose readable parts are equal)."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    readable = _UNSAFE.sub("_", text.replace("/", "__")).strip("_")[:max_chars]
    return f"{readable}-{digest}" if readable else digest


@dataclass(frozen=True)
class SampleRecord:
    """One training sample before tokenisation (what the original loader's sample dict holds).

    `frame_paths` are the sample's images, oldest first and the current view last; `frame_ids` name
    them relative to the input root (`<episode>/<file>`), which is also what frame keys are made from.
    """

    sample_id: str  # the original id: "<episode>/<image file name>"
    episode: str
    instruction: str
    subinstruction: str
    description_2d: str
    description_3d: str
    action: str
    frame_ids: tuple[str, ...]
    frame_paths: tuple[str, ...]

    @property
    def key(self) -> str:
        return safe_key(self.sample_id)

    @property
    def action_label(self) -> int:
        return ACTION_LABELS[self.action]

    @property
    def frame_keys(self) -> tuple[str, ...]:
        return tuple(frame_key(f) for f in self.frame_ids)


def frame_key(frame_id: str) -> str:
    return "f-" + safe_key(frame_id)


@dataclass(frozen=True, eq=False)
class CompactFrame:
    """A canonical frame in storage form: uint8 content (h, w, 3) placed at (top, left) of a white canvas.

    Pad mode: canvas 644×644, content e.g. 490×644 at top=77. Crop mode: the canvas is the content.
    Every model input (canvas, Qwen pixel_values, VGGT input) is a function of this record (SPEC §3).
    """

    key: str
    pixels: np.ndarray  # (h, w, 3) uint8, C-contiguous
    canvas_h: int
    canvas_w: int
    top: int
    left: int
    row_deltas: bool = False  # pixels hold left-neighbour differences mod 256 (as stored; the loader's form)

    def __post_init__(self) -> None:
        h, w = self.pixels.shape[:2]
        assert self.pixels.dtype == np.uint8 and self.pixels.ndim == 3 and self.pixels.shape[2] == 3
        assert 0 <= self.top and self.top + h <= self.canvas_h and 0 <= self.left and self.left + w <= self.canvas_w

    @property
    def geometry(self) -> tuple[int, int, int, int, int, int]:
        """(content_h, content_w, canvas_h, canvas_w, top, left)."""
        h, w = self.pixels.shape[:2]
        return (h, w, self.canvas_h, self.canvas_w, self.top, self.left)


@dataclass(eq=False)
class EncodedText:
    """Tokenised text of one sample; every array has length L (position_ids: (3, L))."""

    input_ids: np.ndarray  # int64 (L,)
    labels: np.ndarray  # int64 (L,), -100 = not a target
    segment_ids: np.ndarray  # int64 (L,), 0 none, 1 sub-instruction, 2 2D, 3 3D, 4 action
    position_ids: np.ndarray  # int64 (3, L) mRoPE ids

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
