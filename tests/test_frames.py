"""prep.frames against the original VGGT loader's golden canvases (fixtures/original/vggt) and the facts' sizes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prep.frames import image_token_count, load_compact_frame, qwen_grid, resized_size
from schemas.errors import SchemaError
from schemas.sample import CompactFrame

GOLDEN_TYPES = ("rgb_640x480", "rgba_480x640", "gray_333x257")


@pytest.fixture(scope="module")
def loader_golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "vggt" / "load_and_preprocess_images.npz") as z:
        return {key: z[key] for key in z.files}


def on_canvas(frame: CompactFrame) -> np.ndarray:
    """(3, H, W) uint8 canvas, white around the content (numpy reference placement)."""
    canvas = np.full((frame.canvas_h, frame.canvas_w, 3), 255, dtype=np.uint8)
    h, w = frame.pixels.shape[:2]
    canvas[frame.top:frame.top + h, frame.left:frame.left + w] = frame.pixels
    return canvas.transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("kind", GOLDEN_TYPES)
def test_canvas_equals_original_loader(fixtures_dir, loader_golden, kind, mode):
    source = fixtures_dir / str(loader_golden[f"{kind}_{mode}_source"])
    frame = load_compact_frame(source, "k", image_mode=mode)
    golden = loader_golden[f"{kind}_{mode}"][0]
    assert frame.pixels.dtype == np.uint8 and frame.pixels.flags.c_contiguous
    assert on_canvas(frame).shape == golden.shape
    np.testing.assert_array_equal(on_canvas(frame), golden)


@pytest.mark.parametrize("rel, mode, geometry", [
    ("ep_a/step_0_MOVE_FORWARD.png", "pad", (490, 644, 644, 644, 77, 0)),  # rows 77–566
    ("ep_b/step_0_TURN_LEFT.png", "pad", (644, 490, 644, 644, 0, 77)),  # columns 77–566
    ("ep_c/step_0_STOP.png", "pad", (504, 644, 644, 644, 70, 0)),  # rows 70–573
    ("ep_a/step_0_MOVE_FORWARD.png", "crop", (490, 644, 490, 644, 0, 0)),
    ("ep_b/step_0_TURN_LEFT.png", "crop", (644, 644, 644, 644, 0, 0)),  # 644×854, centre rows 105–748
])
def test_geometry_as_documented(episodes_dir, rel, mode, geometry):
    assert load_compact_frame(episodes_dir / rel, "k", mode).geometry == geometry


def test_short_side_uses_the_originals_float_expression():
    # 480·(644/640)/14 = 34.50000000000001 → 35 patches (490 px); 480·644/640/14 = 34.5 would give 34.
    assert resized_size(640, 480, "pad") == (644, 490)
    assert resized_size(480, 640, "pad") == (490, 644)
    assert resized_size(480, 640, "crop") == (644, 854)
    assert resized_size(333, 257, "pad") == (644, 504)


def test_rgba_transparency_is_white_and_other_modes_convert(tmp_path):
    rgba = np.zeros((60, 80, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, 40:, 3] = 255  # left half fully transparent, right half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    frame = load_compact_frame(tmp_path / "a.png", "a")
    content = frame.pixels
    assert (content[:, :300] == 255).all()  # transparent → white, not the hidden green
    assert (content[:, 340:] == (10, 200, 30)).all()
    Image.fromarray(np.full((60, 80), 77, dtype=np.uint8), "L").save(tmp_path / "g.png")
    assert (load_compact_frame(tmp_path / "g.png", "g").pixels == 77).all()


def test_unreadable_and_invalid_inputs_name_the_file(tmp_path):
    bad = tmp_path / "step_0_STOP.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SchemaError, match="step_0_STOP.png"):
        load_compact_frame(bad, "k")
    with pytest.raises(SchemaError, match="missing.png"):
        load_compact_frame(tmp_path / "missing.png", "k")
    Image.fromarray(np.zeros((4, 400, 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(SchemaError, match="strip.png"):
        load_compact_frame(tmp_path / "strip.png", "k", "crop")  # 644×14: empty Qwen grid
    with pytest.raises(SchemaError, match="image_mode"):
        load_compact_frame(bad, "k", "stretch")


def test_qwen_grid_and_token_counts():
    assert qwen_grid(644, 644) == (1, 46, 46) and image_token_count(644, 644) == 529
    assert qwen_grid(490, 644) == (1, 34, 46) and image_token_count(490, 644) == 391  # crop mode, facts §3
    assert qwen_grid(504, 644) == (1, 36, 46) and image_token_count(504, 644) == 414
    assert qwen_grid(644, 490) == (1, 46, 34)
    with pytest.raises(SchemaError):
        qwen_grid(650, 644)
    with pytest.raises(SchemaError):
        qwen_grid(14, 644)
