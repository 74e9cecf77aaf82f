"""Second input form (facts §1): JSON list or JSONL annotation files with the original's field aliases.

Produces the same `SampleRecord`s as the episode reader. Histories are not padded (image count varies
per sample, as in the original); a bad record becomes a reject naming file, line and field.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from schemas.episode import Reject
from schemas.errors import SchemaError
from schemas.sample import ACTIONS, SampleRecord

log = logging.getLogger(__name__)

ALIASES = {
    "instruction": ("instruction", "instruction_text", "full_instruction", "instructions"),
    "subinstruction": ("subinstruction", "sub_instruction", "sub_instruction_text"),
    "description_2d": ("2D_description", "2d_description", "description_2d"),
    "description_3d": ("3D_description", "3d_description", "description_3d"),
    "action": ("action", "action_label", "actions"),
}
ACTION_ALIASES = {"FORWARD": "MOVE_FORWARD", "MOVEFORWARD": "MOVE_FORWARD", "LEFT": "TURN_LEFT",
                  "TURNLEFT": "TURN_LEFT", "RIGHT": "TURN_RIGHT", "TURNRIGHT": "TURN_RIGHT"}


def _first_present(record: dict, field: str, where: str) -> Any:
    for alias in ALIASES[field]:
        if record.get(alias) is not None:
            return record[alias]
    raise SchemaError(where, field, f"one of {list(ALIASES[field])}", "no such key")


def _text(value: Any, field: str, where: str) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if not isinstance(value, str):
        raise SchemaError(where, field, "a string or a list of strings", value)
    return value.strip()


def normalize_action(value: Any, where: str = "action") -> str:
    """The original's action normalisation: first element of containers, ints 0..3, aliases, upper-case."""
    while isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        value = value.tolist() if hasattr(value, "tolist") else value
        if isinstance(value, (list, tuple)):
            if not value:
                raise SchemaError(where, "action", "a non-empty value", value)
            value = value[0]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(ACTIONS):
        return ACTIONS[value]
    if isinstance(value, str):
        name = value.strip().upper().replace(" ", "_").replace("-", "_")
        name = ACTION_ALIASES.get(name, name)
        if name in ACTIONS:
            return name
    raise SchemaError(where, "action", f"0..3 or one of {list(ACTIONS)} (or an alias)", value)


def _images(record: dict, image_root: Path, where: str) -> list[str]:
    images = record.get("images", record.get("image"))
    if images is None and "current_image" in record:
        images = list(record.get("history_images") or []) + [record["current_image"]]
    if isinstance(images, str):
        images = [images]
    if not images or not all(isinstance(p, str) for p in images):
        raise SchemaError(where, "images", "a path or a non-empty list of paths", images)
    return images


def record_to_sample(record: dict, image_root: Path, where: str) -> SampleRecord:
    if not isinstance(record, dict):
        raise SchemaError(where, "record", "a JSON object", record)
    fields = {f: _first_present(record, f, where) for f in ALIASES}
    images = _images(record, image_root, where)
    current = images[-1]
    sample_id = record.get("id", where)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
        raise SchemaError(where, "id", "a non-empty string or an integer (or no id: file and line)", sample_id)
    return SampleRecord(
        sample_id=str(sample_id),
        episode=str(record.get("episode", Path(current).parent.as_posix() or ".")),
        instruction=_text(fields["instruction"], "instruction", where),
        subinstruction=_text(fields["subinstruction"], "subinstruction", where),
        description_2d=_text(fields["description_2d"], "description_2d", where),
        description_3d=_text(fields["description_3d"], "description_3d", where),
        action=normalize_action(fields["action"], where),
        frame_ids=tuple(images),
        frame_paths=tuple(str(p if Path(p).is_absolute() else image_root / p) for p in images))


def read_annotations(path: str | Path, image_root: str | Path | None = None) -> tuple[list[SampleRecord], list[Reject]]:
    """Samples of one `.json` (list of objects) or `.jsonl` file; relative image paths join `image_root`."""
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        items = [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise SchemaError(str(path), "(document)", "a UTF-8 JSON list of objects (or a .jsonl file)", str(e)) from e
        if not isinstance(data, list):
            raise SchemaError(str(path), "(top level)", "a JSON list of objects", type(data).__name__)
        items = [(f"{path}[{i}]", item) for i, item in enumerate(data)]
    samples, rejects = [], []
    first_seen: dict[str, str] = {}
    for where, item in items:
        try:
            record = json.loads(item) if isinstance(item, str) else item
            sample = record_to_sample(record, image_root, where)
        except (SchemaError, ValueError) as e:
            rejects.append(Reject(where, "invalid_annotation", str(e)))
            continue
        if sample.sample_id in first_seen:  # ids name samples in shards, dumps and logs: one sample each
            rejects.append(Reject(where, "duplicate_sample_id",
                                  f"id {sample.sample_id!r} is already used at {first_seen[sample.sample_id]}"))
            continue
        first_seen[sample.sample_id] = where
        samples.append(sample)
    _warn_about_large_episodes(path, samples)
    return samples, rejects


LARGE_EPISODE_SAMPLES = 2000


def _warn_about_large_episodes(path: Path, samples: list[SampleRecord]) -> None:
    """Records without an `episode` field are grouped by their current image's folder; a flat image folder then
    makes one huge "episode" (one shard task holding all its frames). Say so."""
    sizes = Counter(sample.episode for sample in samples)
    large = [name for name, n in sizes.items() if n > LARGE_EPISODE_SAMPLES]
    if large:
        name, n = sizes.most_common(1)[0]
        log.warning("%s: %d episode(s) with more than %d samples (largest: %r, %d samples). Records without an "
                    "`episode` field are grouped by their image's folder; give each record an `episode` field so "
                    "that shards split by episode", path, len(large), LARGE_EPISODE_SAMPLES, name, n)
