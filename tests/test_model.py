"""train.model on tiny random models: per-sample 3D fusion, frozen towers without graph, freezing flags, training."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from train.loss import LossConfig, compute_loss
from train.model import (REAL_VISION_IDS, JanusConfig, JanusVLN, VGGTMerger, action_positions, feature_grid,
                         tiny_qwen_config)
from train.vggt import sample_features

VOCAB = 512
# per sample: number of images and the Qwen patch grid (h, w) of its images; the counts and sizes differ
SPECS = [(2, (4, 4)), (3, (4, 6))]


def make_batch(model: JanusVLN, specs=SPECS, seed: int = 0) -> dict:
    """Token layout as the real prompts: text, per image <vision_start> <image_pad>×(h·w/4) <vision_end>, text,
    then labelled answer tokens in segments 1..4; right-padded; VGGT frames (N, 3, 14h, 14w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    rows, labels, segments, pixel, grids, frames = [], [], [], [], [], []
    for b, (n, (h, w)) in enumerate(specs):
        ids = torch.randint(0, 400, (5 + b,), generator=g).tolist()
        for _ in range(n):
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
            pixel.append(torch.randn(h * w, 1176, generator=g))
            grids.append([1, h, w])
        ids += torch.randint(0, 400, (3,), generator=g).tolist()
        answer = torch.randint(0, 400, (8 + 2 * b,), generator=g).tolist()
        rows.append(ids + answer)
        labels.append([-100] * len(ids) + answer)
        segments.append([0] * len(ids) + [1 + 4 * i // len(answer) for i in range(len(answer))])
        frames.append(torch.rand(n, 3, 14 * h, 14 * w, generator=g))
    length = max(map(len, rows))
    pad = lambda seqs, v: torch.tensor([s + [v] * (length - len(s)) for s in seqs])  # noqa: E731
    input_ids = pad(rows, 0)
    mask = pad([[1] * len(r) for r in rows], 0).bool()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": pad(labels, -100),
            "segment_ids": pad(segments, 0),
            "position_ids": torch.arange(length).expand(3, len(specs), length).clone(),
            "pixel_values": torch.cat(pixel), "image_grid_thw": torch.tensor(grids),
            "images_per_sample": torch.tensor([n for n, _ in specs]),
            "action_label": torch.randint(0, 4, (len(specs),), generator=g), "images_vggt": frames,
            "vggt_features": [torch.randn(h * w, model.janus_config.vggt_dim, generator=g) for _, (h, w) in specs]}


@pytest.fixture()
def model() -> JanusVLN:
    return JanusVLN.tiny(vocab_size=VOCAB)


def llm_inputs(model: JanusVLN, batch: dict) -> torch.Tensor:
    """The inputs_embeds the LLM receives (captured by a forward pre-hook)."""
    seen = []

    def capture(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    hook = model.qwen.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**batch)
    finally:
        hook.remove()
    return seen[0]


def test_vggt_merger_groups_2x2_neighbours_in_raster_order():
    torch.manual_seed(0)
    merger = VGGTMerger(in_dim=6, hidden=16, out_dim=5).double()
    feats = torch.randn(5 * 7, 6, dtype=torch.float64)  # 5×7 grid: the odd last row and column are cropped
    out = merger([feats], [(5, 7)])
    grid = merger.ln_q(feats).view(5, 7, 6)
    expected = []
    for i in range(2):
        for j in range(3):
            cell = [grid[2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
            expected.append(merger.mlp(torch.cat(cell)))
    assert out.shape == (6, 5)
    assert torch.allclose(out, torch.stack(expected), atol=1e-12)
    rms = feats / feats.pow(2).mean(1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(merger.ln_q(feats), rms, atol=1e-12)


def test_feature_grid_allows_one_cropped_row_or_column():
    assert feature_grid(46 * 46, 46, 46, "x") == (46, 46)
    assert feature_grid(35 * 46, 34, 46, "x") == (35, 46)  # crop mode: 644×490 → Qwen drops one patch row
    with pytest.raises(ValueError, match="Qwen grid 4×4"):
        feature_grid(100, 4, 4, "x")


def test_encode_images_equals_transformers_image_features(model):
    """Split forward (blocks under no_grad, merger with grad) = the library's, with several windows per image."""
    grid = torch.tensor([[1, 20, 24], [1, 4, 4], [1, 8, 6]])
    pixel = torch.randn(int(grid.prod(1).sum()), 1176)
    expected = torch.cat(model.qwen.model.get_image_features(pixel, grid).pooler_output)
    got = model.encode_images(pixel, grid)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.grad_fn is not None


def test_each_sample_gets_only_its_own_3d_features(model):
    batch = make_batch(model)
    fused = llm_inputs(model, batch)
    model.janus_config = dataclasses.replace(model.janus_config, lam=0.0)
    plain = llm_inputs(model, batch)
    model.janus_config = dataclasses.replace(model.janus_config, lam=0.2)
    image = batch["input_ids"] == model.config.image_token_id
    assert torch.equal(fused[~image], plain[~image])  # text tokens untouched
    for b, (n, (h, w)) in enumerate(SPECS):
        own = model.vggt_merger([batch["vggt_features"][b]], [(h, w)]).detach()
        delta = (fused[b][image[b]] - plain[b][image[b]]).view(n, h * w // 4, -1)
        assert torch.allclose(delta, 0.2 * own.expand(n, -1, -1), atol=1e-6), f"sample {b}"
    # changing sample 1's features leaves sample 0 bit-identical and changes every image token of sample 1
    other = dict(batch, vggt_features=[batch["vggt_features"][0], torch.randn_like(batch["vggt_features"][1])])
    changed = llm_inputs(model, other)
    assert torch.equal(changed[0], fused[0])
    assert (changed[1][image[1]] != fused[1][image[1]]).any(1).all()


def test_vggt_path_runs_each_sample_alone(model):
    """images_vggt → frozen VGGT per sample (as alone, B=1) → the same fusion as the precomputed features."""
    batch = make_batch(model)
    feats = model.vggt_features(batch["images_vggt"])
    for b, frames in enumerate(batch["images_vggt"]):
        alone = sample_features(model.vggt, frames[None], "last")[0]
        assert torch.allclose(feats[b], alone, atol=1e-6)
    via_vggt = llm_inputs(model, dict(batch, vggt_features=None))
    precomputed = llm_inputs(model, dict(batch, vggt_features=feats, images_vggt=None))
    assert torch.allclose(via_vggt, precomputed, atol=1e-6)


def test_frozen_towers_build_no_graph_with_checkpointing(model):
    model.train()
    model.activation_checkpointing_enable()
    assert model.qwen.model.language_model.layers[0].gradient_checkpointing
    batch = make_batch(model)
    # control: transformers' input-grad hook makes the frozen tower differentiable when called directly
    direct = model.qwen.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert direct.last_hidden_state.grad_fn is not None
    seen = []
    hooks = [model.qwen.model.visual.register_forward_hook(lambda m, a, o: seen.append(o.last_hidden_state)),
             model.vggt.register_forward_hook(lambda m, a, o: seen.extend(o))]
    out = model(**dict(batch, vggt_features=None))
    for h in hooks:
        h.remove()
    assert len(seen) == 3 and all(  # the tower, then VGGT once per frame shape (2 here)
        t.grad_fn is None and not t.requires_grad for t in seen)
    compute_loss(out, batch, LossConfig(), step=0).loss.backward()
    visual = model.qwen.model.visual
    frozen = [*visual.patch_embed.parameters(), *visual.blocks.parameters(), *model.vggt.parameters()]
    assert all(p.grad is None for p in frozen)
    trained = [visual.merger, model.vggt_merger, model.action_head, model.qwen.lm_head,
               model.qwen.model.language_model.layers[0]]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in trained for p in m.parameters())


def trainable(model: JanusVLN) -> set[str]:
    parts = {"qwen.model.language_model": "llm", "qwen.lm_head": "lm_head", "qwen.model.visual.merger": "merger",
             "qwen.model.visual": "tower", "vggt_merger": "vggt_merger", "action_head": "action_head",
             "vggt": "vggt"}
    found = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            found.add(next(v for k, v in parts.items() if name.startswith(k + ".")))
    return found


def test_freezing_flags_on_parameters():
    everything = {"llm", "lm_head", "merger", "vggt_merger", "action_head"}
    assert trainable(JanusVLN.tiny(vocab_size=VOCAB)) == everything
    frozen_llm = JanusVLN.tiny(vocab_size=VOCAB, janus_config=JanusConfig(vggt_dim=128, tune_llm=False))
    assert trainable(frozen_llm) == everything - {"llm", "lm_head"}
    assert frozen_llm.qwen.lm_head.weight.requires_grad is False  # the original set it on the module
    head_only = JanusConfig(vggt_dim=128, tune_llm=False, tune_lm_head=True, tune_vision_merger=False,
                            tune_vggt_merger=False, tune_action_head=False)
    assert trainable(JanusVLN.tiny(vocab_size=VOCAB, janus_config=head_only)) == {"lm_head"}
    tower = JanusConfig(vggt_dim=128, tune_vision_tower=True)
    assert trainable(JanusVLN.tiny(vocab_size=VOCAB, janus_config=tower)) == everything | {"tower"}


def test_action_head_reads_the_position_before_the_first_label():
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, 5, 6, 7, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]).bool()
    assert action_positions(labels, mask).tolist() == [2, 0]
    assert action_positions(None, mask).tolist() == [4, 3]
    with pytest.raises(ValueError, match="at least one labelled token"):
        action_positions(torch.full((1, 4), -100), mask[:1, :4])


def test_tiny_config_keeps_the_real_vision_token_ids():
    real = tiny_qwen_config()
    assert {k: getattr(real, k) for k in REAL_VISION_IDS} == REAL_VISION_IDS
    assert real.text_config.vocab_size == 151936
    small = tiny_qwen_config(VOCAB)
    assert small.image_token_id == VOCAB - 2 and small.vision_start_token_id == VOCAB - 5


def test_tiny_model_trains_on_a_fixed_batch(model):
    batch = make_batch(model, seed=1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    config = LossConfig(segment_weights=(0.5, 1.0, 2.0, 3.0))
    losses = []
    for step in range(20):
        parts = compute_loss(model(**batch), batch, config, step=step)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
        losses.append(parts.loss.item())
    assert losses[0] > 6.0  # ≈ ln(512) + ln(4) at random init
    assert losses[-1] < 0.5 * losses[0]
