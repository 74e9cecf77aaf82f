"""Episode-folder reader (SPEC §1): list episodes, read one episode, expand it into samples.

Split in three so a build task can read only its own episodes: listing the root is cheap (directory
names only), reading JSON happens per episode inside the task.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from prep.history import is_mapping_ambiguous, map_subinstructions, select_history
from schemas.episode import EpisodeRecord, Reject, StepRecord
from schemas.sample import ACTION_LABELS, SampleRecord

log = logging.getLogger(__name__)

MILESTONES_FILE = "milestones_result.json"
STEP_IMAGE = re.compile(r"^step_(\d+)_([A-Za-z_]+)\.(png|jpg|jpeg)$")
_LOOKS_LIKE_STEP = re.compile(r"^step_.*\.(?!json$)[^.]+$", re.IGNORECASE)


def list_episode_dirs(root: str | Path) -> list[Path]:
    """Episode folders under `root`: directories whose names do not start with '.', sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input root {root}: expected a directory of episode folders, found nothing there")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_episode(path: str | Path) -> tuple[EpisodeRecord | None, list[Reject]]:
    """Read `milestones_result.json` and the step file names of one episode folder."""
    path = Path(path)
    name = path.name
    milestones_path = path / MILESTONES_FILE
    if not milestones_path.is_file():
        return None, [Reject(name, "no_milestones_file", f"{milestones_path} does not exist")]
    try:
        milestones = json.loads(milestones_path.read_text(encoding="utf-8"))
        if not isinstance(milestones, dict):
            raise ValueError(f"expected a JSON object, found {type(milestones).__name__}")
        instruction, subs, checkpoints = _read_milestones(milestones)
    except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON, or wrong field types
        return None, [Reject(name, "invalid_milestones", f"{milestones_path}: {e}")]
    steps, rejects = _read_step_files(path)
    if not steps:
        return None, rejects + [Reject(name, "no_step_files", f"no file matches {STEP_IMAGE.pattern} in {path}")]
    return EpisodeRecord(name, str(path), instruction, subs, checkpoints, tuple(steps)), rejects


def _read_milestones(milestones: dict) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    instruction = milestones.get("instruction_text", "")
    subs = milestones.get("subinstructions", [])
    if not isinstance(instruction, str):
        raise ValueError(f"instruction_text: expected a string, found {instruction!r}")
    if not isinstance(subs, list) or not all(isinstance(s, str) for s in subs):
        raise ValueError(f"subinstructions: expected a list of strings, found {subs!r}")
    checkpoints = []
    for entry in milestones.get("completion_checkpoints", []) or []:
        try:  # the original keeps entries whose index casts to int and ignores the rest
            checkpoints.append(int(entry["checkpoint_frame_index"]))
        except (KeyError, TypeError, ValueError):
            continue
    return instruction, tuple(subs), tuple(sorted(checkpoints))


def _read_step_files(path: Path) -> tuple[list[StepRecord], list[Reject]]:
    steps, rejects = [], []
    for entry in sorted(os.listdir(path)):
        match = STEP_IMAGE.match(entry)
        if match is None:
            if _LOOKS_LIKE_STEP.match(entry):
                rejects.append(Reject(f"{path.name}/{entry}", "unmatched_file_name",
                                      "expected step_<idx>_<ACTION>.png|jpg|jpeg (lowercase extension)"))
            continue
        image_path = path / entry
        steps.append(StepRecord(int(match.group(1)), match.group(2).upper(), entry, str(image_path),
                                str(image_path.with_suffix(".json"))))
    steps.sort(key=lambda s: (s.idx, s.file_name))
    return steps, rejects


def expand_samples(episode: EpisodeRecord, max_history_images: int) -> tuple[list[SampleRecord], list[Reject]]:
    """One sample per step with a valid description JSON; skipped steps still serve as history."""
    by_frame = map_subinstructions(list(episode.subinstructions), list(episode.checkpoints), episode.total_frames)
    samples, rejects = [], []
    for position, step in enumerate(episode.steps):
        source = f"{episode.name}/{step.file_name}"
        descriptions, reject = _read_step_json(step, source)
        if reject is not None:
            rejects.append(reject)
            continue
        if step.action not in ACTION_LABELS:
            rejects.append(Reject(source, "unknown_action", f"expected one of {sorted(ACTION_LABELS)}, found {step.action!r}"))
            continue
        history = [episode.steps[p] for p in select_history(position, max_history_images)]
        samples.append(SampleRecord(
            sample_id=source, episode=episode.name, instruction=episode.instruction,
            subinstruction=by_frame[step.idx], description_2d=descriptions[0], description_3d=descriptions[1],
            action=step.action, frame_ids=tuple(f"{episode.name}/{s.file_name}" for s in history),
            frame_paths=tuple(s.image_path for s in history)))
    return samples, rejects


def _read_step_json(step: StepRecord, source: str) -> tuple[tuple[str, str], Reject | None]:
    json_path = Path(step.json_path)
    if not json_path.is_file():
        return ("", ""), Reject(source, "missing_step_json", f"{json_path} does not exist")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable (permissions), not UTF-8, or not JSON
        return ("", ""), Reject(source, "invalid_step_json", f"{json_path}: {e}")
    if not isinstance(data, dict):
        return ("", ""), Reject(source, "invalid_step_json", f"{json_path}: expected an object, found {type(data).__name__}")
    d2, d3 = data.get("landmark_description"), data.get("spatial_description")
    for field, value, reason in (("landmark_description", d2, "empty_landmark_description"),
                                 ("spatial_description", d3, "empty_spatial_description")):
        if not value:
            return ("", ""), Reject(source, reason, f"{json_path}: {field} is missing or empty")
        if not isinstance(value, str):
            return ("", ""), Reject(source, "invalid_step_json", f"{json_path}: {field}: expected a string, found {value!r}")
    return (d2, d3), None


def is_ambiguous(episode: EpisodeRecord) -> bool:
    """True when the original's sub-instruction mapping misbehaves for this episode (counted in the manifest)."""
    return is_mapping_ambiguous(len(episode.subinstructions), len(episode.checkpoints))


def read_samples(root: str | Path, max_history_images: int) -> tuple[list[SampleRecord], list[Reject], list[str]]:
    """Every sample under `root` in the original's order, the rejects, and the ambiguous episodes' names."""
    samples, rejects, ambiguous = [], [], []
    for path in list_episode_dirs(root):
        episode, episode_rejects = read_episode(path)
        rejects += episode_rejects
        if episode is None:
            continue
        if is_ambiguous(episode):
            ambiguous.append(episode.name)
        episode_samples, step_rejects = expand_samples(episode, max_history_images)
        samples += episode_samples
        rejects += step_rejects
    return samples, rejects, ambiguous
