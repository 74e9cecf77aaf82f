"""VGGT aggregator vs the original's golden outputs (tiny random-weight models), streaming vs batched
agreement, causality, and loading by name against the VGGT-1B key list (on the meta device)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from schemas.errors import SchemaError
from train.vggt import (FramePatches, VGGTAggregator, VGGTConfig, load_aggregator, load_aggregator_weights, sample_features,
                        tiny_config, vggt1b)
from train.vggt_layers import DinoV2

TOL32, TOL64 = 1e-5, 1e-12
REFS = ("last", "first")


@pytest.fixture(scope="module")
def vggt_dir(fixtures_dir):
    return fixtures_dir / "vggt"


@pytest.fixture(scope="module")
def golden(vggt_dir):
    return dict(np.load(vggt_dir / "aggregator_tiny_golden.npz"))


@pytest.fixture(scope="module")
def tiny_state(vggt_dir):
    return load_file(str(vggt_dir / "aggregator_tiny_state_dict.safetensors"))


def make_tiny(state, dtype=torch.float32) -> VGGTAggregator:
    model = VGGTAggregator(tiny_config())
    load_aggregator_weights(model, state)
    return model.to(dtype).eval()


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float, what: str) -> None:
    assert tuple(actual.shape) == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {expected.shape}"
    diff = np.abs(actual.detach().numpy() - expected).max()
    assert diff <= tol, f"{what}: max |diff| {diff:.3g} > {tol}"


def processing_order(golden, ref: str, dtype) -> torch.Tensor:
    frames = torch.from_numpy(golden["frames"])[None].to(dtype)
    return frames.flip(1) if ref == "last" else frames


@pytest.mark.parametrize("name", ["x56", "x84", "x56x70"])
def test_dinov2_patch_embed_matches_golden(vggt_dir, name):
    gold = np.load(vggt_dir / "dinov2_tiny_golden.npz")
    model = DinoV2(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4)
    model.load_state_dict(load_file(str(vggt_dir / "dinov2_tiny_state_dict.safetensors")))
    x = torch.from_numpy(gold[f"{name}_input"])
    with torch.no_grad():
        out = model.eval()(x)
        for key in ("x_norm_patchtokens", "x_norm_clstoken", "x_norm_regtokens", "x_prenorm"):
            assert_close(out[key], gold[f"{name}_{key}"], TOL32, f"{name} {key}")
        out64 = model.double()(x.double())["x_norm_patchtokens"]
    assert_close(out64, gold[f"{name}_x_norm_patchtokens_f64"], TOL64, f"{name} float64")


def run_streaming(model, frames):
    cache, per_frame = None, []
    with torch.no_grad():
        for s in range(frames.shape[1]):
            outputs, cache = model.forward_frame(frames[:, s], cache)
            per_frame.append(outputs)
    return per_frame, cache


@pytest.mark.parametrize("dtype,suffix,tol", [(torch.float32, "", TOL32), (torch.float64, "_f64", TOL64)])
@pytest.mark.parametrize("ref", REFS)
def test_streaming_matches_golden(golden, tiny_state, ref, dtype, suffix, tol):
    model = make_tiny(tiny_state, dtype)
    per_frame, cache = run_streaming(model, processing_order(golden, ref, dtype))
    key = f"stream_{ref}_{{}}{suffix}"
    m2 = torch.stack([outputs[-2][:, model.num_special:] for outputs in per_frame])
    assert_close(m2, golden[key.format("m2_patch")], tol, "block -2 patch tokens per processed frame")
    assert_close(m2[-1], golden[key.format("features")], tol, "features")
    last = torch.stack(per_frame[-1])[:, :, None]
    assert_close(last, golden[key.format("last_frame_all_blocks")], tol, "last frame, all blocks")
    assert_close(torch.stack([k for k, _ in cache]), golden[key.format("cache_k")], tol, "cache k")
    assert_close(torch.stack([v for _, v in cache]), golden[key.format("cache_v")], tol, "cache v")


@pytest.mark.parametrize("dtype,suffix,tol", [(torch.float32, "", TOL32), (torch.float64, "_f64", TOL64)])
@pytest.mark.parametrize("ref", REFS)
def test_masked_pass_matches_golden(golden, tiny_state, ref, dtype, suffix, tol):
    model = make_tiny(tiny_state, dtype)
    with torch.no_grad():
        outputs = model(processing_order(golden, ref, dtype))
    assert_close(torch.stack(outputs), golden[f"masked_{ref}_all_blocks{suffix}"], tol, "masked pass")


@pytest.mark.parametrize("method", ["batched", "streaming"])
@pytest.mark.parametrize("ref", REFS)
def test_sample_features_match_golden(golden, tiny_state, ref, method):
    model = make_tiny(tiny_state)
    frames = torch.from_numpy(golden["frames"])[None]  # dataset order, oldest first
    with torch.no_grad():
        features = sample_features(model, frames, reference_frame=ref, method=method)
    assert_close(features, golden[f"stream_{ref}_features"], TOL32, f"{method} features")


def test_streaming_equals_batched_for_different_samples(tiny_state):
    model = make_tiny(tiny_state)
    frames = torch.rand(2, 4, 3, 56, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = sample_features(model, frames, "last", "batched")
        streamed = sample_features(model, frames, "last", "streaming")
        alone = sample_features(model, frames[1:], "last", "batched")
    assert batched.shape == (2, 4 * 5, 128)
    assert (batched - streamed).abs().max() <= TOL32
    assert (batched[1:] - alone).abs().max() <= TOL32, "samples of one batch must not see each other"
    assert (batched[0] - batched[1]).abs().max() > 1e-2


@pytest.mark.parametrize("ref", REFS)
def test_shared_patch_tokens_equal_the_images_path(tiny_state, ref):
    """Patch tokens computed once per unique frame and gathered per sample give each sample's features."""
    model = make_tiny(tiny_state)
    unique = torch.rand(5, 3, 56, 70, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([[0, 0, 1, 2], [1, 2, 3, 4]])
    with torch.no_grad():
        from_images = sample_features(model, unique[rows], ref)
        patches = FramePatches(model.patch_tokens(unique)[rows], 56, 70)
        from_patches = sample_features(model, patches, ref)
    assert from_patches.shape == (2, 4 * 5, 128)
    assert (from_images - from_patches).abs().max() <= TOL32
    with pytest.raises(ValueError, match="batched"):
        sample_features(model, patches, ref, method="streaming")


def test_global_attention_is_frame_causal(tiny_state):
    model = make_tiny(tiny_state)
    frames = torch.rand(1, 3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    changed = frames.clone()
    changed[:, 2] = 1 - changed[:, 2]
    with torch.no_grad():
        before, after = model(frames)[-1], model(changed)[-1]
        alone = model(frames[:, :1])[-1]
    assert (before[:, :2] - after[:, :2]).abs().max() == 0, "a later frame changed earlier frames"
    assert (before[:, 2] - after[:, 2]).abs().max() > 1e-2
    assert (before[:, 0] - alone[:, 0]).abs().max() <= TOL32, "first frame must equal that frame alone"


def test_flex_backend_matches_sdpa(tiny_state):
    model = make_tiny(tiny_state)
    frames = torch.rand(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU warns that it is unfused
        flex = sample_features(model, frames, "last", backend="flex")
        sdpa = sample_features(model, frames, "last", backend="sdpa")
    assert (flex - sdpa).abs().max() <= TOL32


def read_key_file(path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, _kind, shape, _dtype, in_state_dict, _part = line.split("\t")
        if in_state_dict == "True":
            shapes[name] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return shapes


@pytest.fixture(scope="module")
def vggt1b_meta_state(vggt_dir):
    """The official VGGT-1B checkpoint layout (aggregator and heads) as zero-size-cost meta tensors."""
    shapes = read_key_file(vggt_dir / "aggregator_keys_vggt1b.txt")
    return {name: torch.zeros(shape, device="meta") for name, shape in shapes.items()}


def test_vggt1b_checkpoint_layout_loads_by_name(vggt1b_meta_state):
    with torch.device("meta"):
        model = VGGTAggregator(vggt1b())
    load_aggregator_weights(model, vggt1b_meta_state, assign=True)
    expected = {k.removeprefix("aggregator."): tuple(v.shape)
                for k, v in vggt1b_meta_state.items() if k.startswith("aggregator.")}
    loaded = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert loaded == expected
    assert len(loaded) == 1210 and sum(p.numel() for p in model.parameters()) == 909_112_320
    assert model._resnet_std.device.type == "meta"


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape"])
def test_checkpoint_mismatch_names_the_key(vggt1b_meta_state, change):
    state = dict(vggt1b_meta_state)
    name = "aggregator.global_blocks.7.attn.k_norm.weight"
    if change == "missing":
        del state[name]
    elif change == "unexpected":
        name = "aggregator.global_blocks.24.attn.k_norm.weight"
        state[name] = torch.zeros(64, device="meta")
    else:
        state[name] = torch.zeros(32, device="meta")
    with torch.device("meta"):
        model = VGGTAggregator(vggt1b())
    with pytest.raises(SchemaError, match=name.removeprefix("aggregator.")) as error:
        load_aggregator_weights(model, state, assign=True)
    listed = getattr(error.value, change)
    assert len(listed) == 1 and listed[0].startswith(name.removeprefix("aggregator."))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_aggregator_from_file_with_prefix_and_heads(tmp_path, golden, tiny_state, suffix):
    state = {f"aggregator.{k}": v for k, v in tiny_state.items()}
    state["camera_head.trunk.0.norm1.weight"] = torch.ones(3)  # head weights are ignored
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = load_aggregator(path, tiny_config())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        features = sample_features(model, torch.from_numpy(golden["frames"])[None], "last")
    assert_close(features, golden["stream_last_features"], TOL32, "features after load_aggregator")


def test_config_and_input_validation(tiny_state):
    with pytest.raises(SchemaError, match="patch_embed"):
        VGGTConfig(patch_embed="resnet")
    model = make_tiny(tiny_state)
    with pytest.raises(ValueError, match="multiples of 14"):
        sample_features(model, torch.zeros(1, 2, 3, 56, 60))
    with pytest.raises(ValueError, match="reference_frame"):
        sample_features(model, torch.zeros(1, 2, 3, 56, 56), reference_frame="middle")
