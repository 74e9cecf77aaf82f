"""prep.text against the original's golden samples, the literal chat rendering, an independent re-statement
of the original loss-weight route, and transformers' own Qwen2.5-VL `get_rope_index`."""
from __future__ import annotations

import json
import time
import types

import numpy as np
import pytest
import torch

from prep import text
from prep.text import IGNORE_INDEX, IMAGE_PAD_ID, TextEncoder, loss_weights_from_segments, rope_position_ids
from schemas import SampleRecord, SchemaError

GOLDEN_WEIGHTS = {1: 0.5, 2: 1.0, 3: 2.0, 4: 3.0}


def _record(entry: dict, **overrides) -> SampleRecord:
    fields = dict(
        sample_id=entry["id"], episode=entry["episode"], instruction=entry["instruction"],
        subinstruction=entry["subinstruction"], description_2d=entry["2D_description"],
        description_3d=entry["3D_description"], action=entry["action"],
        frame_ids=tuple(entry["images"]), frame_paths=tuple(entry["images"]),
    )
    fields.update(overrides)
    return SampleRecord(**fields)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> TextEncoder:
    return TextEncoder(tokenizer)


@pytest.fixture(scope="module")
def golden(fixtures_dir) -> list[tuple[dict, dict]]:
    samples = fixtures_dir / "samples"
    index = json.loads((samples / "index.json").read_text())["samples"]
    assert len(index) == 15
    return [(entry, dict(np.load(samples / f"{entry['sample']}.npz"))) for entry in index]


def _original_route_weights(tokenizer, input_ids, labels, segments, weights) -> np.ndarray:
    """The original's loss weights as facts §2 describes them: first occurrence of the encoded target in
    input_ids, segment k on [start + len(enc(prefix_{k-1})), start + len(enc(prefix_k))), labelled zeros → 1."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, target = input_ids.tolist(), enc("\n".join(segments))
    start = next((i for i in range(len(ids)) if ids[i : i + len(target)] == target), None)
    if start is None:
        start = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    out = np.zeros(len(ids), dtype=np.float32)
    prefix, prev = "", 0
    for k, segment in enumerate(segments):
        prefix += segment + ("\n" if k < len(segments) - 1 else "")
        end = len(enc(prefix))
        out[start + prev : start + end] = weights[k + 1]
        prev = end
    out[(labels != IGNORE_INDEX) & (out == 0)] = 1.0
    return out


def test_goldens_bit_identical(encoder, golden):
    for entry, g in golden:
        record = _record(entry)
        enc = encoder.encode_text(record, g["image_grid_thw"])
        name = entry["sample"]
        assert np.array_equal(enc.input_ids, g["input_ids"]), name
        assert np.array_equal(enc.labels, g["labels"]), name
        assert np.array_equal(enc.segment_ids, g["segment_ids"]), name
        assert np.array_equal(enc.position_ids, g["position_ids"][:, 0]), name
        assert enc.input_ids.dtype == enc.labels.dtype == enc.segment_ids.dtype == enc.position_ids.dtype == np.int64
        assert len(enc) == entry["seq_len"] and (enc.labels != IGNORE_INDEX).sum() == entry["num_label_tokens"]
        weights = loss_weights_from_segments(enc.segment_ids, enc.labels, GOLDEN_WEIGHTS, enc.input_ids)
        assert weights.dtype == np.float32 and np.array_equal(weights, g["loss_weights"]), name
        assert np.array_equal(weights, loss_weights_from_segments(
            enc.segment_ids, enc.labels, [0.5, 1.0, 2.0, 3.0], enc.input_ids))


def test_single_call_equals_per_message_literal_tokenisation(encoder, tokenizer, golden):
    """The pad-expansion shortcut gives the ids of tokenising the original's rendered messages one by one,
    and of tokenising the whole conversation string in one call."""
    for entry, g in golden[::4]:
        record, counts = _record(entry), [529] * len(entry["images"])
        messages = text.render_conversation(record, counts)
        per_message = sum((tokenizer(m, add_special_tokens=False)["input_ids"] for m in messages), [])
        whole = tokenizer("".join(messages), add_special_tokens=False)["input_ids"]
        assert per_message == whole == g["input_ids"].tolist()


def test_prompt_layout_and_stripping(golden):
    entry = next(e for e, _ in golden if e["sample"] == "ep_a__step_4_TURN_LEFT")
    assert entry["2D_description"] != entry["2D_description"].strip()  # the fixture's whitespace case
    record = _record(entry, instruction="  go\n")
    user = text.render_user_text(record, 9)
    lines = user.split("\n")
    assert len(lines) == 14 and not user.endswith("\n")
    assert lines[1] == "This is your historical observation:" + "<image>" * 8
    assert lines[2] == "This is your current observation:<image>" and lines[3] == "Your task is to go"
    assert lines[10:] == ["SUBINSTRUCTION: ...", "2D_DESCRIPTION: ...", "3D_DESCRIPTION: ...", "ACTION: ..."]
    target = text.render_target_text(record)
    assert target.split("\n")[1] == "2D_DESCRIPTION: " + entry["2D_description"].strip()
    assert len(target.split("\n")) == 4 and target.endswith("ACTION: TURN_LEFT")
    assert text.render_message("system", "x") == "<|im_start|>system\nx<|im_end|>\n"


def test_empty_subinstruction_line(encoder, golden):
    entry, g = next((e, g) for e, g in golden if e["sample"] == "ep_c__step_0_STOP")
    assert entry["subinstruction"] == ""
    assert text.render_target_text(_record(entry)).startswith("SUBINSTRUCTION: \n2D_DESCRIPTION: ")
    input_ids, labels, segment_ids = encoder.encode(_record(entry, subinstruction="   "), [529] * 9)
    labelled = labels != IGNORE_INDEX
    assert input_ids[labelled][:5].tolist() == [29038, 687, 57455, 25, 715]  # SUB IN STRUCTION : " \n"
    assert segment_ids[labelled][:6].tolist() == [1, 1, 1, 1, 1, 2]
    assert np.array_equal(input_ids, g["input_ids"]) and np.array_equal(segment_ids, g["segment_ids"])


def _marker_case(tokenizer, target: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    ids = np.asarray(tokenizer("<|im_start|>assistant\n" + target, add_special_tokens=False)["input_ids"])
    labels = ids.copy()
    labels[:3] = IGNORE_INDEX
    return ids, labels, ids[3:].tolist()


def test_missing_marker_stops_search(encoder, tokenizer):
    ids, labels, _ = _marker_case(tokenizer, "SUBINSTRUCTION: a\n3D_DESCRIPTION: b\nACTION: STOP<|im_end|>\n")
    seg = text.segment_ids_from_labels(ids, labels, encoder.marker_variants)
    assert seg[:3].tolist() == [0, 0, 0] and (seg[3:] == 1).all()  # 2D missing: sub runs to the end, rest 0
    ids, labels, _ = _marker_case(tokenizer, "no markers here ACTION: STOP")
    assert not text.segment_ids_from_labels(ids, labels, encoder.marker_variants).any()


def test_marker_prefix_variant_earliest_match(encoder, tokenizer):
    target = "SUBINSTRUCTION: a\n\n2D_DESCRIPTION: b\n3D_DESCRIPTION: c\nACTION: d"
    ids, labels, tokens = _marker_case(tokenizer, target)
    seg = text.segment_ids_from_labels(ids, labels, encoder.marker_variants)[3:].tolist()
    newline2 = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert len(newline2) == 1 and tokens.count(newline2[0]) == 1
    boundary = tokens.index(newline2[0])  # the "\n\n"+marker variant matches before the bare marker
    assert seg[:boundary] == [1] * boundary and seg[boundary] == 2
    action = tokens.index(tokenizer("ACTION", add_special_tokens=False)["input_ids"][0])
    # "c" + "\n" are separate tokens: the "\n"+"ACTION:" variant matches first, so "\n" opens segment 4
    assert tokens[action - 1] == 198 and seg[action - 2] == 3 and set(seg[action - 1 :]) == {4}


def test_different_image_counts_and_sizes(encoder, tokenizer, golden):
    entry = golden[0][0]
    record = _record(entry, frame_ids=("a", "b", "c"), frame_paths=("a", "b", "c"))
    grids = np.array([[1, 46, 46], [1, 34, 46], [1, 2, 6]])
    counts = text.num_image_tokens(grids)
    assert counts == [529, 391, 3]
    enc = encoder.encode_text(record, grids)
    literal = sum((tokenizer(m, add_special_tokens=False)["input_ids"]
                   for m in text.render_conversation(record, counts)), [])
    assert enc.input_ids.tolist() == literal
    assert (enc.input_ids == IMAGE_PAD_ID).sum() == 923 and (enc.input_ids == 151652).sum() == 3
    assert np.array_equal(enc.position_ids, _transformers_rope(enc.input_ids, grids))
    with pytest.raises(SchemaError, match="image_token_counts"):
        encoder.encode(record, [529, 529])


def test_invalid_text_rejected(encoder, golden):
    record = _record(golden[0][0], instruction="look at <image> here")
    with pytest.raises(SchemaError, match="instruction"):
        encoder.encode(record, [529] * 9)
    with pytest.raises(SchemaError, match="description_3d"):
        encoder.encode(_record(golden[0][0], description_3d="x<|im_end|>"), [529] * 9)


def _transformers_rope(input_ids: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """transformers' own Qwen2_5_VLModel.get_rope_index, called unbound on a stub carrying the config."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    stub = types.SimpleNamespace(config=Qwen2_5_VLConfig())
    stub.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stub)
    ids = torch.as_tensor(input_ids, dtype=torch.long)[None]
    position_ids, _ = Qwen2_5_VLModel.get_rope_index(
        stub, ids, mm_token_type_ids=(ids == IMAGE_PAD_ID).int(), image_grid_thw=torch.as_tensor(grids))
    return position_ids[:, 0].numpy()


def test_rope_matches_transformers_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(5):
        grids = np.array([[1, 2 * rng.integers(1, 12), 2 * rng.integers(1, 12)] for _ in range(rng.integers(1, 6))])
        pieces: list[np.ndarray] = [rng.integers(0, 151643, rng.integers(0 if trial else 1, 20))]
        for t, h, w in grids:
            pieces += [np.array([151652]), np.full(t * h * w // 4, IMAGE_PAD_ID), np.array([151653]),
                       rng.integers(0, 151643, rng.integers(0, 4))]  # adjacent images when 0 text tokens
        ids = np.concatenate(pieces).astype(np.int64)
        ours = rope_position_ids(ids, grids)
        assert ours.shape == (3, len(ids)) and ours.dtype == np.int64
        assert np.array_equal(ours, _transformers_rope(ids, grids)), trial
    with pytest.raises(SchemaError, match="image_grid_thw"):
        rope_position_ids(ids, grids[:-1])


def test_loss_weights_follow_the_original_route(encoder, tokenizer, golden):
    weights = {1: 0.3, 2: 0.0, 3: 2.0, 4: 5.0}  # a zero weight acts as 1.0 in the original
    entry = golden[3][0]
    variants = [dict(), dict(subinstruction=""), dict(description_2d=" multi\nline  desc. "),
                dict(description_3d="ends with a space-like char。", instruction="x"),
                # segments ending in a letter/digit: a lone "\n" opens the next segment in segment_ids
                dict(subinstruction="Go left", description_2d="door 2", description_3d="Chair 出口"),
                dict(subinstruction="", description_2d="a)", description_3d="b 3")]
    for overrides in variants:
        record = _record(entry, **overrides)
        input_ids, labels, segment_ids = encoder.encode(record, [529] * 9)
        expected = _original_route_weights(tokenizer, input_ids, labels, text.target_segments(record), weights)
        ours = loss_weights_from_segments(segment_ids, labels, weights, input_ids)
        assert np.array_equal(ours, expected), overrides


def test_loss_weights_torch_batched(encoder, golden):
    rows = [encoder.encode(_record(entry), [529] * 9) for entry, _ in (golden[0], golden[-1])]
    length = max(len(r[0]) for r in rows)
    input_ids = torch.full((2, length), 151643)
    labels = torch.full((2, length), IGNORE_INDEX)
    segments = torch.zeros((2, length), dtype=torch.long)
    for b, (ids, lab, seg) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.from_numpy(ids)
        labels[b, : len(lab)], segments[b, : len(seg)] = torch.from_numpy(lab), torch.from_numpy(seg)
    batched = loss_weights_from_segments(segments, labels, GOLDEN_WEIGHTS, input_ids)
    assert isinstance(batched, torch.Tensor) and batched.dtype == torch.float32 and batched.shape == (2, length)
    for b, (entry, g) in enumerate((golden[0], golden[-1])):
        n = len(g["loss_weights"])
        assert np.array_equal(batched[b, :n].numpy(), g["loss_weights"]) and not batched[b, n:].any()
    with pytest.raises(SchemaError):
        loss_weights_from_segments(segments, labels, [1.0, 2.0], input_ids)
    with pytest.raises(SchemaError):
        loss_weights_from_segments(segments, labels[:1], GOLDEN_WEIGHTS, input_ids)


def test_encode_time(encoder, golden):
    record = _record(golden[-4][0])
    encoder.encode(record, [529] * 9)
    start, n = time.perf_counter(), 200
    for _ in range(n):
        encoder.encode_text(record, np.tile([1, 46, 46], (9, 1)))
    per_call_ms = (time.perf_counter() - start) / n * 1e3
    print(f"encode_text: {per_call_ms:.2f} ms per sample (L={len(encoder.encode(record, [529] * 9)[0])})")
    assert per_call_ms < 50
