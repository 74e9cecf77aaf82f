"""train.vision_attention: the fused vision paths equal transformers' own SDPA loop over windows (tiny towers)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from schemas.errors import SchemaError
from train import vision_attention as va
from train.model import JanusVLN

# window_size 56 = 2 merged tokens (4 patches) per side: 16-patch windows, partial ones at odd merged sizes
GRIDS = [(1, 8, 12), (2, 6, 6), (1, 10, 4)]
FUSED = [va.FLEX, va.SDPA_MASKED]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny_tower(seed: int = 0, hidden: int = 64, heads: int = 4) -> Qwen2_5_VisionTransformerPretrainedModel:
    cfg = Qwen2_5_VLVisionConfig(depth=4, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=heads,
                                 out_hidden_size=48, window_size=56, patch_size=14, spatial_merge_size=2,
                                 temporal_patch_size=2, fullatt_block_indexes=[1, 3])
    torch.manual_seed(seed)
    tower = Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
    assert tower.config._attn_implementation == "sdpa"
    return tower


def tower_inputs(grids=GRIDS, device: str = "cpu", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grids, device=device)
    generator = torch.Generator().manual_seed(seed)
    num_patches = int(grid_thw.prod(-1).sum())
    return torch.randn(num_patches, 3 * 2 * 14 * 14, generator=generator).to(device), grid_thw


@torch.no_grad()
def run(tower, pixels, grid_thw):
    out = tower(pixels, grid_thw=grid_thw)
    return out.last_hidden_state, out.pooler_output


def per_segment_sdpa(q, k, v, cu_seqlens):
    """Independent reference: SDPA on each segment separately."""
    bounds = cu_seqlens.tolist()
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                      for a, b in zip(bounds[:-1], bounds[1:])], dim=2).transpose(1, 2)


def test_segment_ids_match_repeat_interleave():
    cu = torch.tensor([0, 3, 3, 10, 11, 20], dtype=torch.int32)
    expected = torch.repeat_interleave(torch.arange(5), cu.diff())
    assert torch.equal(va.segment_ids(cu, 20), expected.to(torch.int32))


@pytest.mark.parametrize("name", FUSED)
def test_attention_functions_equal_per_segment_sdpa(name):
    va.register_vision_attention()
    fn = va.AttentionInterface().get_interface(name, None)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 50, 16) for _ in range(3))
    cu = torch.tensor([0, 16, 20, 36, 50], dtype=torch.int32)
    out, weights = fn(None, q, k, v, None, scaling=16 ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert weights is None and out.shape == (1, 50, 3, 16)
    torch.testing.assert_close(out, per_segment_sdpa(q, k, v, cu), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", FUSED)
def test_fused_tower_equals_sdpa_loop(name):
    tower = tiny_tower()
    pixels, grid_thw = tower_inputs()
    ref_hidden, ref_pooled = run(tower, pixels, grid_thw)
    fused = copy.deepcopy(tower)
    assert va.enable_fused_vision_attention(fused, name) == name
    assert fused.config._attn_implementation == name and tower.config._attn_implementation == "sdpa"
    hidden, pooled = run(fused, pixels, grid_thw)
    assert pooled.shape == (int(grid_thw.prod(-1).sum()) // 4, 48)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    # the tolerance can see a wrong segmentation: whole-frame attention in every layer differs from windows
    all_full = copy.deepcopy(fused)
    all_full.fullatt_block_indexes = [0, 1, 2, 3]
    assert (run(all_full, pixels, grid_thw)[1] - ref_pooled).abs().max() > 1e-3


def test_masks_built_once_per_forward_and_shared_by_layers():
    tower = tiny_tower()
    pixels, grid_thw = tower_inputs()
    va.enable_fused_vision_attention(tower, va.FLEX)
    before = va.MASK_CACHE.num_built
    run(tower, pixels, grid_thw)
    assert va.MASK_CACHE.num_built - before == 2  # windows + whole frames, for 4 layers
    run(tower, pixels, grid_thw)
    assert va.MASK_CACHE.num_built - before == 4  # a new forward: new cu_seqlens tensors, new masks


def test_cache_rebuilds_after_in_place_change():
    cache = va.SegmentMaskCache()
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    first = cache.get(cu, 8, "dense", va._build_dense_mask)
    assert cache.get(cu, 8, "dense", va._build_dense_mask) is first
    cu[1] = 2
    second = cache.get(cu, 8, "dense", va._build_dense_mask)
    assert cache.num_built == 2 and second[:, :2].sum() == 4


def test_auto_on_a_full_model_switches_only_the_vision_tower():
    janus = JanusVLN.tiny(vocab_size=512, with_vggt=False)
    text_impl = janus.qwen.config.text_config._attn_implementation
    path = va.enable_fused_vision_attention(janus)
    expected = va.FLASH_ATTENTION_2 if va.is_flash_attn_2_available() else va.FLEX
    assert path == expected == janus.qwen.model.visual.config._attn_implementation
    assert janus.qwen.config.text_config._attn_implementation == text_impl
    assert janus.qwen.model.language_model.config._attn_implementation == text_impl


def test_janus_encode_images_matches_after_switch():
    janus = JanusVLN.tiny(vocab_size=512, with_vggt=False).eval()
    pixels, grid_thw = tower_inputs([(1, 16, 12), (1, 8, 8)])
    with torch.no_grad():
        ref = janus.encode_images(pixels, grid_thw)
        va.enable_fused_vision_attention(janus, va.FLEX)
        fused = janus.encode_images(pixels, grid_thw)
        assert va.enable_fused_vision_attention(janus, "sdpa") == "sdpa"
        back = janus.encode_images(pixels, grid_thw)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(back, ref)


def test_bad_requests_name_what_was_expected():
    with pytest.raises(SchemaError, match="one of"):
        va.choose_vision_path("flex")
    if not va.is_flash_attn_2_available():
        with pytest.raises(SchemaError, match="flash_attn"):
            va.enable_fused_vision_attention(tiny_tower(), va.FLASH_ATTENTION_2)
    with pytest.raises(SchemaError, match="exactly one"):
        va.enable_fused_vision_attention(torch.nn.Linear(2, 2))
    fn = va.flex_varlen_attention
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(SchemaError, match="cu_seq_lens"):
        fn(None, q, q, q, None)
    with pytest.raises(SchemaError, match="dropout"):
        fn(None, q, q, q, None, dropout=0.1, cu_seq_lens_q=torch.tensor([0, 4]), cu_seq_lens_k=torch.tensor([0, 4]))


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(("hidden", "heads"), [(64, 4), (160, 2)])  # head_dim 16 and 80 (the 7B's)
def test_flex_on_cuda_equals_sdpa_loop(dtype, tol, hidden, heads):
    from torch._dynamo.utils import counters

    tower = tiny_tower(hidden=hidden, heads=heads).to("cuda", dtype)
    pixels, grid_thw = tower_inputs(device="cuda")
    ref_hidden, ref_pooled = run(tower, pixels.to(dtype), grid_thw)
    va.enable_fused_vision_attention(tower, va.FLEX)
    hidden_states, pooled = run(tower, pixels.to(dtype), grid_thw)
    graphs = counters["stats"]["unique_graphs"]
    run(tower, pixels.to(dtype), grid_thw)  # new masks, same shapes: no recompilation
    assert counters["stats"]["unique_graphs"] == graphs
    scale = ref_pooled.abs().max().item()
    assert (pooled - ref_pooled).abs().max().item() <= tol * max(scale, 1.0)
    assert (hidden_states - ref_hidden).abs().max().item() <= tol * max(ref_hidden.abs().max().item(), 1.0)
