"""Episode reader and history/sub-instruction policies against the original's golden sample list."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from prep.episodes import read_samples
from prep.history import is_mapping_ambiguous, map_subinstructions, select_history


def test_samples_match_golden_index(episodes_dir, fixtures_dir):
    samples, rejects, ambiguous = read_samples(episodes_dir, max_history_images=8)
    golden = json.loads((fixtures_dir / "samples" / "index.json").read_text())
    assert [s.sample_id for s in samples] == [g["id"] for g in golden["samples"]]
    for sample, g in zip(samples, golden["samples"]):
        assert list(sample.frame_ids) == g["images"]
        assert (sample.instruction, sample.subinstruction) == (g["instruction"], g["subinstruction"])
        assert (sample.description_2d, sample.description_3d) == (g["2D_description"], g["3D_description"])
        assert (sample.action, sample.action_label) == (g["action"], g["action_label"])
    by_source = {r.source: r.reason for r in rejects}
    assert by_source["ep_b/step_1_MOVE_FORWARD.png"] == "missing_step_json"
    assert by_source["ep_b/step_3_STOP.png"] == "empty_landmark_description"
    assert by_source["ep_z_no_milestones"] == "no_milestones_file"
    assert by_source["ep_a/step_99_STOP.PNG"] == "unmatched_file_name"
    assert len(rejects) == 4
    assert ambiguous == ["ep_b"]  # 3 sub-instructions, 1 usable checkpoint


def test_golden_skips_are_all_reported(episodes_dir, fixtures_dir):
    golden = json.loads((fixtures_dir / "samples" / "index.json").read_text())
    _, rejects, _ = read_samples(episodes_dir, max_history_images=8)
    reported = {r.source for r in rejects}
    assert {s["id"] for s in golden["skipped_steps"]} <= reported
    assert {e["episode"] for e in golden["skipped_episodes"]} <= reported


@pytest.mark.parametrize("position, expected", [
    (0, [0] * 9), (2, [0, 0, 0, 0, 0, 0, 0, 1, 2]), (8, list(range(9))),
    (9, [0, 1, 2, 3, 4, 5, 6, 7, 9]), (20, [0, 2, 5, 7, 10, 12, 15, 17, 20]),
])
def test_select_history_examples(position, expected):
    assert select_history(position, 8) == expected


@given(st.integers(0, 5000), st.integers(1, 20))
def test_select_history_invariants(position, history):
    frames = select_history(position, history)
    assert len(frames) == history + 1
    assert frames[-1] == position and frames[0] == 0
    assert frames == sorted(frames) and all(0 <= f <= position for f in frames)
    if position > history:
        assert frames == np.linspace(0, position, history + 1, dtype=int).tolist()


@pytest.mark.parametrize("subs, checkpoints, total, expected", [
    (["A", "B", "C"], [5, 12], 20, "A" * 6 + "B" * 7 + "C" * 7),
    (["A", "B", "C"], [5], 20, "C" * 20),
    (["A", "B", "C"], [], 20, "C" * 20),
    (["A", "B"], [3, 8, 15], 20, "A" * 4 + "B" * 16),
    (["A", "B", "C"], [30, 40], 20, "A" * 20),
])
def test_map_subinstructions_reproduces_original(subs, checkpoints, total, expected):
    assert "".join(map_subinstructions(subs, checkpoints, total)) == expected


def test_map_subinstructions_empty_and_ambiguity():
    assert map_subinstructions([], [1, 2], 3) == ["", "", ""]
    assert is_mapping_ambiguous(3, 1) and not is_mapping_ambiguous(3, 2) and not is_mapping_ambiguous(0, 0)
