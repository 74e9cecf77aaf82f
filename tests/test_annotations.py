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
    path.write_text('[{"id": 1},')
    with pytest.raises(SchemaError, match=r"ann.json.*\(document\).*Expecting value"):
        read_annotations(path)


def test_duplicate_and_invalid_ids_are_rejects_naming_the_line(tmp_path):
    record = {"instruction": "Go.", "subinstruction": "Go.", "2D_description": "A door.", "3D_description": "Ahead.",
              "action": 0, "images": ["e/0.png"]}
    lines = [{**record, "id": "e/0"}, {**record, "id": "e/1"}, {**record, "id": "e/0"}, {**record, "id": None},
             {**record, "id": 7}, {**record, "id": "7"}]
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    samples, rejects = read_annotations(path)
    assert [s.sample_id for s in samples] == ["e/0", "e/1", "7"]
    assert [(r.source, r.reason) for r in rejects] == [(f"{path}:3", "duplicate_sample_id"),
                                                      (f"{path}:4", "invalid_annotation"),
                                                      (f"{path}:6", "duplicate_sample_id")]
    assert rejects[0].detail == f"id 'e/0' is already used at {path}:1"
