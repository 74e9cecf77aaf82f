"""The dataset manifest: the shards a build wrote (sizes, sha256, counts), totals, rejects, build parameters.

Parsed strictly (unknown or missing keys, wrong types, negative counts, and a schema version newer than
this reader are SchemaErrors naming the file and key); written deterministically (sorted keys), last
and atomically, so a manifest that exists lists only completely written shards.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from schemas import SCHEMA_VERSION
from schemas.errors import SchemaError

MANIFEST_NAME = "manifest.json"
IMAGE_MODES = ("pad", "crop")
REFERENCE_FRAMES = ("first", "last")
FEATURE_DTYPES = ("float16", "bfloat16", "float32")
_HEX = re.compile(r"[0-9a-f]{8,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


def _check(record: object, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise SchemaError(type(record).__name__, name, expected, getattr(record, name))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_problem(value: object, tp: Any) -> str | None:
    """What `value` should have been for annotation `tp`, or None if it fits (ints are counts: >= 0)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:  # only `X | None` is used
        return None if value is None else _type_problem(value, args[0])
    if tp is int:
        return None if type(value) is int and value >= 0 else "a non-negative integer"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, args[0]) for v in value)
        return None if ok else f"a list of {args[0].__name__}"
    if origin is dict:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and (args[1] is Any or _type_problem(v, args[1]) is None) for k, v in value.items())
        return None if ok else "a JSON object" + ("" if args[1] is Any else " of non-negative integers")
    return None if isinstance(value, tp) else f"a {tp.__name__} object"


def _check_types(record: object) -> None:
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        problem = _type_problem(getattr(record, f.name), _hints(type(record))[f.name])
        if problem:
            raise SchemaError(type(record).__name__, f.name, problem, getattr(record, f.name))


@dataclass(frozen=True)
class ShardRecord:
    """One shard as the build wrote it."""

    name: str  # file name relative to the manifest's folder, e.g. "shard-000012.tar"
    episodes: int
    samples: int
    frames: int
    bytes: int
    sha256: str
    text_tokens: int  # Σ (L − image-pad tokens) over its samples
    visual_tokens: int  # Σ image-pad tokens over its samples

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, "name", bool(_SHARD_NAME.fullmatch(self.name)), "a plain file name [A-Za-z0-9_.-]")
        _check(self, "sha256", bool(_SHA256.fullmatch(self.sha256)), "64 lowercase hex digits")


@dataclass(frozen=True)
class VggtTags:
    """Identity of precomputed VGGT features; `train.launch` refuses a build whose reference frame (and checkpoint
    sha256, when the model config names the checkpoint) differs from the model config."""

    checkpoint_sha256: str
    reference_frame: str
    dtype: str

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, "checkpoint_sha256", bool(_SHA256.fullmatch(self.checkpoint_sha256)), "64 lowercase hex")
        _check(self, "reference_frame", self.reference_frame in REFERENCE_FRAMES, f"one of {REFERENCE_FRAMES}")
        _check(self, "dtype", self.dtype in FEATURE_DTYPES, f"one of {FEATURE_DTYPES}")


@dataclass(frozen=True)
class Totals:
    episodes: int
    samples: int
    frames: int
    bytes: int
    text_tokens: int
    visual_tokens: int
    source_image_bytes: int  # bytes of the distinct source images read

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    created_by: str  # e.g. "vln-shards 0.1.0 prep.build"
    build_config: dict[str, Any]
    build_config_hash: str
    tokenizer_hash: str
    processor_hash: str
    image_mode: str
    max_history_images: int
    vggt: VggtTags | None
    shards: tuple[ShardRecord, ...]
    totals: Totals
    rejects_by_reason: dict[str, int]
    # Counts of kept episodes that carry a known quirk, e.g. "ambiguous_subinstruction_mapping" (SPEC §1).
    episode_flags: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, "schema_version", 1 <= self.schema_version <= SCHEMA_VERSION, f"1..{SCHEMA_VERSION}")
        for name in ("build_config_hash", "tokenizer_hash", "processor_hash"):
            _check(self, name, bool(_HEX.fullmatch(getattr(self, name))), "8 to 128 lowercase hex digits")
        _check(self, "image_mode", self.image_mode in IMAGE_MODES, f"one of {IMAGE_MODES}")
        names = [s.name for s in self.shards]
        _check(self, "shards", len(set(names)) == len(names), "distinct shard names")

    def totals_problems(self) -> list[str]:
        """Totals that do not equal the sum over shards (empty when consistent)."""
        fields = ("episodes", "samples", "frames", "bytes", "text_tokens", "visual_tokens")
        sums = {name: sum(getattr(s, name) for s in self.shards) for name in fields}
        return [f"totals.{name} is {getattr(self.totals, name)} but the shards sum to {sums[name]}"
                for name in fields if getattr(self.totals, name) != sums[name]]

    def to_json(self) -> str:
        """Deterministic JSON text: sorted keys, 2-space indent, trailing newline."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and validate; `where` (the file or URL) is named in every error."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(where, "(document)", "valid JSON",
                              f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
        version = obj.get("schema_version") if isinstance(obj, dict) else None
        if type(version) is int and version > SCHEMA_VERSION:
            raise SchemaError(where, "schema_version", f"a schema version this reader understands (<= "
                              f"{SCHEMA_VERSION}); the build is newer than this code, upgrade vln-shards", version)
        return _parse_record(cls, obj, where, "")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _parse_record(cls: type, obj: object, where: str, path: str) -> Any:
    """Build dataclass `cls` from a JSON object: exact key set, nested records and lists converted."""
    if not isinstance(obj, dict):
        raise SchemaError(where, path or "(document)", f"a JSON object ({cls.__name__})", type(obj).__name__)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown, missing = sorted(set(obj) - set(names)), [n for n in names if n not in obj]
    if unknown:
        raise SchemaError(where, _join(path, unknown[0]), f"only the keys {names}", "an unknown key")
    if missing:
        raise SchemaError(where, _join(path, missing[0]), "a value", "a missing key")
    kwargs = {name: _convert(obj[name], _hints(cls)[name], where, _join(path, name)) for name in names}
    try:
        return cls(**kwargs)
    except SchemaError as e:
        raise SchemaError(where, _join(path, e.field), e.expected, e.found) from None


def _convert(value: object, tp: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType and value is not None:
        return _convert(value, args[0], where, path)
    if dataclasses.is_dataclass(tp):
        return _parse_record(tp, value, where, path)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        return tuple(_convert(v, args[0], where, f"{path}[{i}]") for i, v in enumerate(value))
    return value  # scalars and dicts are type-checked by the record's __post_init__


def check_vggt_tags(manifest: Manifest, expected: VggtTags | dict[str, str], where: str = "manifest") -> VggtTags:
    """The manifest's VGGT tags, refused (naming every differing field) unless they equal the training config's.

    `expected`: a `VggtTags`, or a dict with any of its fields plus `image_mode` (compared with the manifest's).
    """
    wanted = dataclasses.asdict(expected) if isinstance(expected, VggtTags) else dict(expected)
    known = [f.name for f in dataclasses.fields(VggtTags)] + ["image_mode"]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SchemaError("expected VGGT tags", unknown[0], f"only the keys {known}", "an unknown key")
    if manifest.vggt is None:
        raise SchemaError(where, "vggt", f"precomputed VGGT features tagged {wanted}", "a build without features")
    check_manifest_compat(manifest, {("vggt." if name != "image_mode" else "") + name: wanted[name]
                                     for name in known if name in wanted}, where)
    return manifest.vggt


def check_manifest_compat(manifest: Manifest, expected: dict[str, Any], where: str = "manifest") -> None:
    """Refuse a build whose parameters differ from the training configuration, naming every differing field.

    Keys are manifest fields (tokenizer_hash, processor_hash, image_mode, max_history_images, vggt) or dotted
    paths (`vggt.reference_frame`, `build_config.max_length`); `vggt` compares the tags (None = no features).
    """
    def plain(value: Any) -> Any:
        fields = getattr(value, "__dataclass_fields__", None)
        return {name: getattr(value, name) for name in fields} if fields else value

    problems = []
    for key, want in expected.items():
        found: Any = manifest
        for part in key.split("."):
            if not (isinstance(found, dict) and part in found) and not hasattr(found, part):
                raise SchemaError(where, key, "a manifest field to compare", "no such field")
            found = found[part] if isinstance(found, dict) else getattr(found, part)
        if plain(found) != plain(want):
            problems.append((key, f"{key}={plain(found)!r} in the build, {plain(want)!r} in the training config"))
    if problems:
        raise SchemaError(where, ", ".join(k for k, _ in problems), "build parameters equal to the training "
                          "configuration", "; ".join(text for _, text in problems))


def manifest_url(source: str) -> str:
    """`source` itself, or `source/manifest.json` when `source` is a folder (a build's output)."""
    if source.endswith(".json"):
        return source
    try:
        fs, path = fsspec.core.url_to_fs(source)
        is_folder = fs.isdir(path)
    except (ImportError, ValueError, OSError):  # a URL scheme fsspec cannot list: leave it to the shard reader
        return source
    return source.rstrip("/") + "/manifest.json" if is_folder else source


def read_manifest(url: str) -> Manifest:
    """Read and validate a manifest from a local path or fsspec URL."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(url, "(document)", "UTF-8 JSON", f"undecodable bytes at offset {e.start}") from e
    return Manifest.from_json(text, url)


def write_manifest(url: str, manifest: Manifest) -> None:
    """Write atomically: local files via a temporary file + rename; object stores with one put."""
    write_bytes_atomic(url, manifest.to_json().encode("utf-8"))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """A whole file or none: local files via a temporary `.<name>.*.tmp` + rename; object stores with one put."""
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
