"""train.loss against the original's golden loss_weights and a float64 loop over tokens (facts §7)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from train.loss import (SEGMENT_NAMES, LossConfig, StepNorm, compute_loss, step_denominators, summarize,
                        token_weights)
from train.model import JanusOutput

GOLDEN_WEIGHTS = (0.5, 1.0, 2.0, 3.0)  # the fixtures' subinstruction/2D/3D/action weights


@pytest.fixture(scope="module")
def samples_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "samples"


@pytest.fixture(scope="module")
def golden_batch(samples_dir: Path) -> dict[str, torch.Tensor]:
    """The original collator's batch of 2 (ep_a step 0, L 5032; ep_c step 0, padded by 61)."""
    data = np.load(samples_dir / "collator_b2.npz")
    return {k: torch.from_numpy(data[k]) for k in ("input_ids", "labels", "segment_ids", "loss_weights",
                                                      "action_label")}


def fake_output(batch: dict[str, torch.Tensor], vocab: int, seed: int) -> JanusOutput:
    """Random logits where train.model would put them: rows t with labels[:, t+1] labelled, row-major."""
    g = torch.Generator().manual_seed(seed)
    mask = batch["labels"][:, 1:] != -100
    b = batch["labels"].shape[0]
    return JanusOutput(action_logits=torch.randn(b, 4, generator=g) * 2, hidden_states=torch.empty(0),
                       token_logits=torch.randn(int(mask.sum()), vocab, generator=g) * 3, token_mask=mask)


def reference(batch, out, lam: float):
    """Explicit float64 loop: Σw·CE/Σw over labelled tokens (original weights) + λ·mean action CE, per segment."""
    labels, weights, segs = batch["labels"].tolist(), batch["loss_weights"].double(), batch["segment_ids"].tolist()
    logits, row = out.token_logits.double(), 0
    num = den = 0.0
    seg_num, seg_den = [0.0] * 4, [0.0] * 4
    for b in range(len(labels)):
        for t in range(len(labels[b]) - 1):
            target = labels[b][t + 1]
            if target == -100:
                continue
            x = logits[row]
            ce = float(torch.logsumexp(x, 0) - x[target])
            w = float(weights[b, t + 1])
            num, den = num + w * ce, den + w
            if segs[b][t + 1] > 0:
                seg_num[segs[b][t + 1] - 1] += w * ce
                seg_den[segs[b][t + 1] - 1] += w
            row += 1
    act = out.action_logits.double()
    action = [float(torch.logsumexp(act[b], 0) - act[b, int(a)]) for b, a in enumerate(batch["action_label"])]
    return num, den, sum(action), len(action), seg_num, seg_den, num / den + lam * sum(action) / len(action)


def test_token_weights_equal_the_originals_loss_weights(samples_dir: Path):
    config = LossConfig(segment_weights=GOLDEN_WEIGHTS)
    files = sorted(samples_dir.glob("*.npz"))
    assert len(files) == 16
    for path in files:
        data = np.load(path)
        batch = {k: torch.from_numpy(data[k]) for k in ("input_ids", "labels", "segment_ids")}
        expected = torch.from_numpy(data["loss_weights"])
        assert torch.equal(token_weights(batch, config), expected), path.name


def test_loss_equals_float64_reference_on_golden_batch(golden_batch):
    config = LossConfig(segment_weights=GOLDEN_WEIGHTS, action_weight=1.0, action_weight_end=0.2,
                        action_weight_warmup_steps=10)
    out = fake_output(golden_batch, vocab=151936, seed=1)
    parts = compute_loss(out, golden_batch, config, step=5)
    assert parts.action_weight == pytest.approx(0.6)
    num, den, act, n_act, seg_num, seg_den, loss = reference(golden_batch, out, lam=0.6)
    assert parts.loss.dtype == torch.float32
    assert float(parts.loss) == pytest.approx(loss, rel=1e-6)
    s = parts.stats.tolist()
    assert s[:4] == pytest.approx([num, den, act, n_act], rel=1e-6)
    assert s[4:8] == pytest.approx(seg_num, rel=1e-6)
    assert s[8:12] == pytest.approx(seg_den, rel=1e-6)
    assert all(d > 0 for d in seg_den)  # every segment is present in the golden batch
    logs = summarize(parts.stats, parts.action_weight)
    assert logs["loss"] == pytest.approx(loss, rel=1e-6)
    for k, name in enumerate(SEGMENT_NAMES):
        assert logs[f"loss_{name}"] == pytest.approx(seg_num[k] / seg_den[k], rel=1e-6)


def test_action_weight_schedule():
    linear = LossConfig(action_weight=1.0, action_weight_end=0.2, action_weight_warmup_steps=10)
    assert [linear.action_weight_at(s) for s in (-3, 0, 5, 10, 50)] == pytest.approx([1.0, 1.0, 0.6, 0.2, 0.2])
    assert LossConfig(action_weight=3.0).action_weight_at(100) == 3.0
    assert LossConfig(action_weight=2.0, action_weight_end=0.0).action_weight_at(7) == 2.0  # W = 0: constant


def test_step_shares_sum_to_the_step_loss(golden_batch):
    """Two micro-batches (one sample each) with StepNorm give exactly the loss of the whole step."""
    config = LossConfig(segment_weights=GOLDEN_WEIGHTS, action_weight=0.7)
    whole_out = fake_output(golden_batch, vocab=151936, seed=2)
    whole = compute_loss(whole_out, golden_batch, config, step=0)
    micro, outs, start = [], [], 0
    for b in range(2):
        batch = {k: v[b:b + 1] for k, v in golden_batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        outs.append(JanusOutput(action_logits=whole_out.action_logits[b:b + 1], hidden_states=torch.empty(0),
                                token_logits=whole_out.token_logits[start:start + n],
                                token_mask=batch["labels"][:, 1:] != -100))
        micro.append(batch)
        start += n
    totals = step_denominators(micro, config)
    assert totals.tolist() == pytest.approx([float(whole.stats[1]), 2.0])
    norm = StepNorm(text_weight=float(totals[0]), num_actions=float(totals[1]))
    parts = [compute_loss(o, b, config, step=0, norm=norm) for o, b in zip(outs, micro)]
    assert float(sum(p.loss for p in parts)) == pytest.approx(float(whole.loss), rel=1e-6)
    # a per-micro-batch mean would weigh the 30-token sample like the 66-token one: not the step loss
    naive = sum(float(compute_loss(o, b, config, step=0).loss) for o, b in zip(outs, micro)) / 2
    assert not math.isclose(naive, float(whole.loss), rel_tol=1e-3)
    summed = summarize(sum(p.stats for p in parts), 0.7)
    assert summed == pytest.approx(summarize(whole.stats, 0.7), rel=1e-6)


def test_gradient_flows_only_through_labelled_logits(golden_batch):
    config = LossConfig(segment_weights=GOLDEN_WEIGHTS)
    out = fake_output(golden_batch, vocab=1000, seed=3)
    batch = dict(golden_batch, labels=torch.where(golden_batch["labels"] >= 0, golden_batch["labels"] % 1000,
                                                  golden_batch["labels"]))
    out.token_logits.requires_grad_(True)
    out.action_logits.requires_grad_(True)
    compute_loss(out, batch, config, step=0).loss.backward()
    # d loss / d logit row t = w_t / Σw · (softmax − onehot): row sums are zero, row norms scale with w_t
    grad = out.token_logits.grad.double()
    assert torch.allclose(grad.sum(1), torch.zeros(grad.shape[0], dtype=torch.float64), atol=1e-7)
    w = batch["loss_weights"][:, 1:][out.token_mask].double()
    probs = torch.softmax(out.token_logits.detach().double(), 1)
    target = batch["labels"][:, 1:][out.token_mask]
    expected = (probs - torch.nn.functional.one_hot(target, 1000)) * (w / w.sum())[:, None]
    assert torch.allclose(grad, expected, atol=1e-6)
