"""The benchmark scripts' own arithmetic, against independent references: the VGGT FLOP count that the
"% of peak" figures divide by (torch's FlopCounterMode on the math SDPA path), and the loader's mixing figure."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # scripts run as `python bench/...`
from loader_throughput import worst_window  # noqa: E402
from vggt_features import count_flops  # noqa: E402

from train.vggt import VGGTAggregator, VGGTConfig, sample_features, tiny_config  # noqa: E402

TINY_DINOV2 = VGGTConfig(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4, patch_embed="dinov2",
                         dinov2_depth=2, dinov2_heads=4)


@pytest.mark.parametrize("config", [tiny_config(), TINY_DINOV2], ids=["conv", "dinov2"])
def test_counted_vggt_flops_equal_torchs_flop_counter(config):
    model = VGGTAggregator(config).eval()
    frames = torch.rand(2, 5, 3, 56, 56)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        sample_features(model, frames, "last")  # blocks up to depth − 1, as the stage runs them
    assert counter.get_total_flops() == 2 * count_flops(config, num_frames=5, size=56)


def test_worst_window_counts_the_largest_episode_share():
    ids = [f"ep{e}/s{i}" for e, i in [(0, 0), (1, 0), (0, 1), (0, 2), (2, 0), (1, 1)]]
    assert worst_window(ids, window=3) == 2  # (ep0, ep1, ep0) or (ep0, ep0, ep2)
    assert worst_window(ids, window=4) == 3  # (ep0, ep1, ep0, ep0)
    assert worst_window(ids, window=64) == 3  # shorter than the window: the whole list


@pytest.mark.parametrize("script", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")))
def test_every_bench_script_resolves_its_imports(script):
    """Scripts are not run in CI; their imports must still hold (a bench importing a helper another
    change removed fails here, not on the GPU machine)."""
    import importlib

    module = importlib.import_module(script)
    assert callable(getattr(module, "main", None)) or script == "tables"
