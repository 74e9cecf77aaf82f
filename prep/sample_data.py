"""The embedded sample data: a small synthetic episode set generated on demand, and the Qwen2.5 tokenizer.

Episodes are drawn by code (deterministic; 640×480 PNGs like R2R-CE-640x480) so the repo stays small;
the tokenizer (vocab + merges, 1.5 MB zstd) ships in `prep/sample_data/tokenizer.tar.zst`.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image

TOKENIZER_ARCHIVE = Path(__file__).with_name("sample_data") / "tokenizer.tar.zst"
ACTIONS = ("MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLN_SHARDS_CACHE", Path.home() / ".cache" / "vln-shards"))


def ensure_tokenizer(cache_dir: Path | None = None) -> Path:
    """Unpack the shipped tokenizer once; returns a directory `AutoTokenizer.from_pretrained` accepts."""
    target = (cache_dir or default_cache_dir()) / "tokenizer"
    if not (target / "vocab.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        raw = zstandard.ZstdDecompressor().stream_reader(TOKENIZER_ARCHIVE.open("rb"))
        with tarfile.open(fileobj=io.BytesIO(raw.read()), mode="r:") as tar:
            tar.extractall(target, filter="data")
    return target


def _draw_frame(rng: np.random.Generator, step: int, width: int = 640, height: int = 480) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    image = np.stack([base[c] + 40 * np.sin((x + 13 * step) / (60 + 10 * c)) + 30 * np.cos(y / 50) for c in range(3)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 120), rng.integers(0, height - 90)
        image[y0:y0 + rng.integers(30, 90), x0:x0 + rng.integers(40, 120)] = rng.uniform(0, 255, size=3)
    noise = rng.normal(0, 6, size=(height // 4, width // 4, 3)).repeat(4, 0).repeat(4, 1)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8), "RGB")


def write_sample_episodes(root: Path, num_episodes: int = 6, seed: int = 0) -> Path:
    """Write `num_episodes` synthetic episodes (5–14 steps) in the original on-disk layout under `root`."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for e in range(num_episodes):
        episode = root / f"episode_{e:03d}"
        episode.mkdir(exist_ok=True)
        num_steps = int(rng.integers(5, 15))
        subs = [f"Walk to landmark {k} of episode {e}." for k in range(3)]
        checkpoints = sorted(rng.choice(np.arange(1, num_steps - 1), size=2, replace=False).tolist())
        (episode / "milestones_result.json").write_text(json.dumps({
            "instruction_text": f"Go through the hall, pass {e + 2} doors and stop at the red chair.",
            "subinstructions": subs,
            "completion_checkpoints": [{"checkpoint_frame_index": c} for c in checkpoints]}))
        for step in range(num_steps):
            action = "STOP" if step == num_steps - 1 else ACTIONS[int(rng.integers(0, 3))]
            stem = episode / f"step_{step}_{action}"
            _draw_frame(rng, step).save(stem.with_suffix(".png"), optimize=False)
            if e == 1 and step == 2:
                continue  # a step without its JSON: reported as a reject, still used as history
            stem.with_suffix(".json").write_text(json.dumps({
                "landmark_description": f"A hallway with {step % 4 + 1} doors and a lamp, view {step}.",
                "spatial_description": f"The nearest door is {1 + step * 0.5:.1f} m ahead and slightly left."}))
    return root


def ensure_sample_episodes(cache_dir: Path | None = None) -> Path:
    target = (cache_dir or default_cache_dir()) / "sample_episodes"
    if not (target / ".complete").is_file():
        write_sample_episodes(target)
        (target / ".complete").write_text("ok\n")
    return target
