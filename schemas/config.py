"""Build configuration: one frozen, validated dataclass; a config file plus CLI overrides produce it.

`output_hash()` is the build's identity: the fields that shape the shards plus the bytes of the tokenizer and
preprocessor files. A re-run with another executor, output path or a moved model folder is the same build;
changed tokenizer files (even at the same path) or another image mode make another build, which is refused.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from schemas.errors import SchemaError

# Fields that do not influence the shards' contents.
_RUNTIME_FIELDS = {"output", "executor", "ray_address", "overwrite", "max_in_flight", "num_cpus", "progress"}
# Recorded in the manifest, but not part of the build's identity: paths whose contents are hashed instead, the
# reject budget (decides whether a manifest is written, not what the shards hold), and the VGGT stage's speed knobs
_NOT_IDENTITY = {"model_path", "vggt_model", "max_reject_fraction", "vggt_batch_samples", "vggt_compile"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json")
PROCESSOR_FILES = ("preprocessor_config.json",)


def files_hash(directory: str, names: tuple[str, ...]) -> str:
    """sha256 over (name, bytes) of the given files that exist in `directory`."""
    digest = hashlib.sha256()
    for name in names:
        path = Path(directory) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _model_files_hash(directory: str) -> str:
    """files_hash of the tokenizer and preprocessor files, recomputed only when one of them changes (stat)."""
    names = TOKENIZER_FILES + PROCESSOR_FILES
    stats = []
    for name in names:
        try:
            info = (Path(directory) / name).stat()
            stats.append((name, info.st_size, info.st_mtime_ns, info.st_ino))
        except OSError:
            stats.append((name, None))
    return _cached_files_hash(directory, names, tuple(stats))


@functools.lru_cache(maxsize=8)
def _cached_files_hash(directory: str, names: tuple[str, ...], stats: tuple) -> str:
    return files_hash(directory, names)


def option(default: Any, help: str) -> Any:
    """A config field with its `--help` text (`python -m prep.build --help` lists them)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BuildConfig:
    input: str = option("", "episode root folder, or a .json/.jsonl annotation file")
    output: str = option("shards", "local path or fsspec URL")
    model_path: str = option("", "tokenizer + preprocessor directory (e.g. a Qwen2.5-VL-7B-Instruct folder)")
    image_root: str = option("", "for annotation input: where relative image paths start")
    executor: str = option("local", "local (in-process) | ray (local Ray or the cluster at --ray-address)")
    ray_address: str = option("", "empty: $RAY_ADDRESS or a new local Ray")
    image_mode: str = option("pad", "pad (training) | crop (evaluation)")
    max_history_images: int = option(8, "history images per sample besides the current one (the original: 8)")
    episodes_per_shard: int = option(8, "episodes per shard (one build task; at ~70 steps per episode ≈ 0.2 GB, ≈ 4 GB with VGGT features)")
    zstd_level: int = option(1, "zstd level of frames and tokens; on delta-filtered frames 1 is faster and smaller than 3 (LOG.md)")
    limit: int = option(0, "number of episodes (0 = all)")
    max_length: int = option(8192, "samples longer than this are rejected, never truncated")
    max_reject_fraction: float = option(0.05, "fail the build when rejects ÷ (rejects + samples) exceeds this; an episode-level reject counts once (rejects.jsonl says why)")
    seed: int = option(0, "order of the samples inside each shard")
    overwrite: bool = option(False, "replace an output folder that holds a different build (else refused)")
    max_in_flight: int = option(0, "Ray tasks in flight (0 = 2 × cluster CPUs)")
    num_cpus: int = option(0, "local Ray CPUs (0 = all)")
    progress: bool = option(True, "a progress bar on stderr")
    vggt_model: str = option("", "VGGT checkpoint (.pt/.safetensors); empty = no feature precompute")
    vggt_config: str = option("vggt1b", "vggt1b | tiny (tests)")
    reference_frame: str = option("last", "first | last (the original's training default)")
    vggt_dtype: str = option("bfloat16", "float32 | bfloat16 | float16 (compute and storage)")
    vggt_batch_samples: int = option(16, "samples per aggregator call (H200, VGGT-1B: 16 → 7.2 samples/s, 32 → 7.1)")
    vggt_compile: bool = option(True, "torch.compile the aggregator's blocks when the stage runs on a GPU (+40 %)")

    def __post_init__(self) -> None:
        choices = {"executor": ("local", "ray"), "image_mode": ("pad", "crop"), "reference_frame": ("first", "last"),
                   "vggt_dtype": ("float32", "bfloat16", "float16"), "vggt_config": ("vggt1b", "tiny")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SchemaError("build config", name, f"one of {allowed}", getattr(self, name))
        positive = ("episodes_per_shard", "max_length", "vggt_batch_samples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SchemaError("build config", name, "a positive integer", getattr(self, name))
        for name in ("max_history_images", "limit", "max_in_flight", "num_cpus"):
            if getattr(self, name) < 0:
                raise SchemaError("build config", name, "an integer ≥ 0", getattr(self, name))
        if not 1 <= self.zstd_level <= 22:
            raise SchemaError("build config", "zstd_level", "an integer in 1..22", self.zstd_level)
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise SchemaError("build config", "max_reject_fraction", "a fraction in [0, 1]", self.max_reject_fraction)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "build config") -> "BuildConfig":
        """Build from a dict (config file + overrides); unknown keys and wrong types are refused."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                raise SchemaError(where, key, f"one of {sorted(known)}", "an unknown key")
            default = known[key].default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            else:
                ok = isinstance(value, type(default)) and not isinstance(value, bool)
            if not ok:
                raise SchemaError(where, key, type(default).__name__, value)
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "BuildConfig":
        values = read_config_file(path, "a mapping of build options")
        return cls.from_mapping({**values, **(overrides or {})}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_dict(self) -> dict[str, Any]:
        """The fields that determine the shards' bytes."""
        return {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}

    def output_hash(self) -> str:
        """The build's identity (module docstring): output_dict without the model folder's and the checkpoint's
        paths and without settings that do not change what is stored, plus the sha256 of the tokenizer and
        preprocessor files. The checkpoint's identity is its sha256, kept per shard by the VGGT stage: another
        checkpoint recomputes the features of finished shards."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """The values `output_hash` covers (a build folder keeps them, so a refusal can name what differs)."""
        values = {k: v for k, v in self.output_dict().items() if k not in _NOT_IDENTITY}
        values["model_files_sha256"] = _model_files_hash(self.model_path)
        values["with_vggt"] = bool(self.vggt_model)
        return values

    def replace(self, **changes: Any) -> "BuildConfig":
        return dataclasses.replace(self, **changes)


def read_config_file(path: str | Path, expected: str) -> dict[str, Any]:
    """A TOML (`.toml`) or YAML (anything else) file whose top level must be a mapping."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib
        values = tomllib.loads(text)
    else:
        import yaml
        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise SchemaError(str(path), "(top level)", expected, type(values).__name__)
    return values
