"""Annotation-file reader: aliases, action normalisation, rejects naming file/line/field."""
from __future__ import annotations

import json

import pytest

from prep.annotations import normalize_action, read_annotations
from schemas.errors import SchemaError


@pytest.mark.parametrize("value, expected", [
    (0, "STOP"), (3, "TURN_RIGHT"), ("move forward", "MOVE_FORWARD"), ("turn-left", "TURN_LEFT"),
    ("FORWARD", "MOVE_FORWARD"), (["right"], "TURN_RIGHT"), ("TurnLeft", "TURN_LEFT"), ([[1]], "MOVE_FORWARD"),
])
def test_normalize_action(value, expected):
    assert normalize_action(value) == expected


@pytest.mark.parametrize("value", [4, "JUMP", [], True, None])
def test_normalize_action_rejects(value):
    with pytest.raises(SchemaError, match="action"):
        normalize_action(value)


def test_jsonl_aliases_and_rejects(tmp_path):
    good = {"instruction_text": ["  Go to the door. "], "sub_instruction": "Go.", "2d_description": "A door.",
            "description_3d": "1 m ahead.", "actions": [2], "history_images": ["a/0.png"], "current_image": "a/1.png"}
    bad = dict(good)
    del bad["2d_description"]
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    samples, rejects = read_annotations(path, image_root=tmp_path / "imgs")
    assert len(samples) == 1 and len(rejects) == 1
    s = samples[0]
    assert (s.instruction, s.subinstruction, s.description_2d, s.action) == ("Go to the door.", "Go.", "A door.", "TURN_LEFT")
    assert s.frame_ids == ("a/0.png", "a/1.png")
    assert s.frame_paths[-1] == str(tmp_path / "imgs" / "a/1.png")
    assert rejects[0].source == f"{path}:3" and "description_2d" in rejects[0].detail


def test_json_list_must_be_a_list(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SchemaError, match="JSON list"):
        read_annotations(path)
