"""Pure policies of the original loader (facts §1): which frames form a sample's history, and which
sub-instruction each frame gets. Both reproduce the original exactly, including its mapping quirk."""
from __future__ import annotations

import numpy as np


def select_history(position: int, max_history_images: int) -> list[int]:
    """List positions of the H+1 images for the step at list position `position`, oldest first.

    j ≤ H: 0..j left-padded with 0 to H+1 entries; else linspace(0, j, H+1) truncated toward zero.
    """
    if position < 0 or max_history_images < 0:
        raise ValueError(f"position and max_history_images must be ≥ 0, found {position}, {max_history_images}")
    if position <= max_history_images:
        return [0] * (max_history_images - position) + list(range(position + 1))
    return np.linspace(0, position, max_history_images + 1, dtype=int).tolist()


def map_subinstructions(subinstructions: list[str], checkpoints: list[int], total_frames: int) -> list[str]:
    """Sub-instruction per frame index, as the original computes it.

    Sub-instruction i covers [c[i-1]+1 (or 0 when i-1 ≥ len(c)), c[i] (or the last frame)], clamped;
    later ones overwrite earlier ones; frames still empty get the last sub-instruction. With fewer than
    len(subs)-1 checkpoints, later sub-instructions overwrite from frame 0 (see `is_mapping_ambiguous`).
    """
    if not subinstructions:
        return [""] * total_frames
    c = sorted(checkpoints)
    last = total_frames - 1
    by_frame = [""] * total_frames
    for i, text in enumerate(subinstructions):
        start = 0 if i == 0 else (c[i - 1] + 1 if i - 1 < len(c) else 0)
        end = c[i] if i < len(c) else last
        start, end = max(start, 0), min(end, last)  # a start past the end skips the range (facts §1: [30,40] → all A)
        for frame in range(start, end + 1):
            by_frame[frame] = text
    return [text or subinstructions[-1] for text in by_frame]


def is_mapping_ambiguous(num_subinstructions: int, num_checkpoints: int) -> bool:
    return num_subinstructions > 0 and num_checkpoints < num_subinstructions - 1
