"""Input records: an episode folder's milestones and steps, and the reject record for anything skipped.

Every skipped episode or step becomes a `Reject` with a reason from `REJECT_REASONS`; nothing is
dropped silently (the original dropped missing JSONs, empty descriptions and odd file names without a count).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

REJECT_REASONS = (
    "no_milestones_file",
    "no_step_files",
    "invalid_milestones",
    "missing_step_json",
    "invalid_step_json",
    "empty_landmark_description",
    "empty_spatial_description",
    "unmatched_file_name",
    "unknown_action",
    "invalid_annotation",
    "unreadable_image",
    "too_long",
    "special_token_in_text",
    "duplicate_sample_id",
    "mixed_frame_sizes",
)
# Not a reject: the episode still yields samples, but its sub-instruction mapping follows the
# original's overwrite behaviour (fewer checkpoints than sub-instructions − 1); counted in the manifest.
AMBIGUOUS_SUBINSTRUCTION_MAPPING = "ambiguous_subinstruction_mapping"


@dataclass(frozen=True)
class Reject:
    """Something the build did not turn into a sample: `source` is `<episode>` or `<episode>/<file>`."""

    source: str
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        assert self.reason in REJECT_REASONS, self.reason

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepRecord:
    """One `step_<idx>_<ACTION>.<ext>` image with its (optional) description JSON."""

    idx: int
    action: str
    file_name: str
    image_path: str
    json_path: str


@dataclass(frozen=True)
class EpisodeRecord:
    """A validated episode folder; `steps` are sorted by idx (file name breaks ties, deterministically)."""

    name: str
    path: str
    instruction: str
    subinstructions: tuple[str, ...]
    checkpoints: tuple[int, ...]  # sorted checkpoint_frame_index values
    steps: tuple[StepRecord, ...]

    @property
    def total_frames(self) -> int:
        return max(s.idx for s in self.steps) + 1
