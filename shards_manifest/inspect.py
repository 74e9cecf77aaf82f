"""`show` (what a build holds: parameters, counts, rejects, token and storage distributions) and `diff` (two builds).

`show` reads shard contents with frames left compressed (tokens decoded, ~1 ms/sample); `--scan-shards 0`
prints the manifest only. `diff` compares manifests only: configs, counts and per-shard sha256.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from prep.text import IGNORE_INDEX, IMAGE_PAD_ID
from schemas.manifest import Manifest
from schemas.stored import MAX_SEQUENCE_LENGTH, PackedFrame
from shards_manifest.deep_verify import map_shards
from shards_manifest.shard_io import iter_shard

PERCENTILES = (0, 5, 50, 95, 100)
DISTRIBUTIONS = {"sequence_length": "sequence length L (tokens)", "text_tokens": "text tokens per sample",
                 "visual_tokens": "visual (<|image_pad|>) tokens per sample",
                 "label_tokens": "labelled tokens per sample", "images": "images per sample"}


@dataclass
class ShardStats:
    """Per-sample token counts and frame byte counts of one shard."""

    name: str
    values: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in DISTRIBUTIONS})
    frames: int = 0
    frame_bytes: int = 0  # zstd payloads
    frame_raw_bytes: int = 0  # h·w·3 uint8
    vggt_raw_bytes: int = 0  # decompressed precomputed features (they barely compress)


def scan_shard(url: str, name: str, max_length: int = MAX_SEQUENCE_LENGTH) -> ShardStats:
    stats = ShardStats(name)
    for record in iter_shard(url, lazy_frames=True, max_length=max_length):
        if isinstance(record, PackedFrame):
            stats.frames += 1
            stats.frame_bytes += len(record.payload)
            stats.frame_raw_bytes += record.geometry[0] * record.geometry[1] * 3
            continue
        if record.vggt_features is not None:
            stats.vggt_raw_bytes += np.asarray(record.vggt_features).nbytes
        ids = record.tokens.input_ids
        pads = int(np.count_nonzero(ids == IMAGE_PAD_ID))
        for key, value in (("sequence_length", len(ids)), ("text_tokens", len(ids) - pads), ("visual_tokens", pads),
                           ("label_tokens", int(np.count_nonzero(record.tokens.labels != IGNORE_INDEX))),
                           ("images", len(record.frame_keys))):
            stats.values[key].append(value)
    return stats


def _percentiles(values: list[int]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    return {**out, "mean": float(array.mean())}


def build_summary(root_url: str, manifest: Manifest, scan_shards: int | None = None, workers: int = 1,
                  on_shard: Callable[[ShardStats], None] | None = None) -> dict:
    """Everything `show` prints, as a JSON-able dict; reads the first `scan_shards` shards (None: all)."""
    totals = manifest.totals
    samples = max(1, totals.samples)
    summary = {
        "schema_version": manifest.schema_version, "created_by": manifest.created_by,
        "build_config": manifest.build_config,
        "identity": {"build_config_hash": manifest.build_config_hash, "tokenizer_hash": manifest.tokenizer_hash,
                     "processor_hash": manifest.processor_hash, "image_mode": manifest.image_mode,
                     "max_history_images": manifest.max_history_images,
                     "vggt": dataclasses.asdict(manifest.vggt) if manifest.vggt else None},
        "counts": {"shards": len(manifest.shards), **dataclasses.asdict(totals)},
        "rejects_by_reason": dict(manifest.rejects_by_reason), "episode_flags": dict(manifest.episode_flags),
        "storage_per_sample": {"shard_bytes": totals.bytes / samples, "source_image_bytes": totals.source_image_bytes
                               / samples, "unique_frames": totals.frames / samples},
    }
    records = manifest.shards if scan_shards is None else manifest.shards[:scan_shards]
    calls = [(f"{root_url.rstrip('/')}/{s.name}", s.name, _max_length(manifest)) for s in records]
    scanned = []
    for stats in map_shards(scan_shard, calls, workers):
        scanned.append(stats)
        if on_shard is not None:
            on_shard(stats)
    if scanned:
        summary.update(_scan_summary(scanned, sum(s.bytes for s in records)))
    return summary


def _max_length(manifest: Manifest) -> int:
    value = manifest.build_config.get("max_length", MAX_SEQUENCE_LENGTH)
    return value if type(value) is int and value > 0 else MAX_SEQUENCE_LENGTH


def _scan_summary(scanned: list[ShardStats], shard_bytes: int) -> dict:
    values = {key: [v for s in scanned for v in s.values[key]] for key in DISTRIBUTIONS}
    samples = max(1, len(values["sequence_length"]))
    frame_bytes = sum(s.frame_bytes for s in scanned)
    raw = sum(s.frame_raw_bytes for s in scanned)
    return {
        "scanned": {"shards": len(scanned), "samples": len(values["sequence_length"]),
                    "frames": sum(s.frames for s in scanned)},
        "distributions": {key: _percentiles(v) for key, v in values.items() if v},
        "storage_scanned_per_sample": {
            "shard_bytes": shard_bytes / samples, "frame_bytes": frame_bytes / samples,
            "frame_raw_uint8_bytes": raw / samples, "frame_compression_ratio": raw / max(1, frame_bytes),
            "vggt_feature_raw_bytes": sum(s.vggt_raw_bytes for s in scanned) / samples,
            "other_bytes_tokens_features_json_tar": (shard_bytes - frame_bytes) / samples},
    }


def _lines(title: str, mapping: dict, fmt: Callable[[object], str] = str) -> list[str]:
    if not mapping:
        return [f"{title}: none"]
    width = max(map(len, mapping))
    return [f"{title}:"] + [f"  {key:<{width}}  {fmt(value)}" for key, value in mapping.items()]


def _number(value: object) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def format_summary(summary: dict) -> str:
    """The text `python -m shards_manifest show` prints."""
    out = [f"schema_version {summary['schema_version']}, created by {summary['created_by']}"]
    out += _lines("build parameters", summary["build_config"], json.dumps)
    out += _lines("identity", summary["identity"])
    out += _lines("counts", summary["counts"], _number)
    out += _lines("rejects by reason", summary["rejects_by_reason"], _number)
    out += _lines("episode flags (kept episodes)", summary["episode_flags"], _number)
    out += _lines("storage per sample (manifest)", summary["storage_per_sample"], _number)
    if "distributions" in summary:
        scanned = summary["scanned"]
        out.append(f"distributions over {scanned['samples']:,} samples of {scanned['shards']} shards "
                   f"({', '.join(f'p{p}' for p in PERCENTILES)}, mean):")
        width = max(len(DISTRIBUTIONS[k]) for k in summary["distributions"])
        for key, stats in summary["distributions"].items():
            out.append(f"  {DISTRIBUTIONS[key]:<{width}}  " + "  ".join(f"{v:>9,.1f}" for v in stats.values()))
        out += _lines("storage per sample (scanned shards, bytes)", summary["storage_scanned_per_sample"], _number)
    return "\n".join(out)


# ---------------------------------------------------------------- diff
def _compare(prefix: str, a: dict, b: dict) -> list[str]:
    return [f"{prefix}{key}: A {json.dumps(a.get(key, '(absent)'))}, B {json.dumps(b.get(key, '(absent)'))}"
            for key in sorted(set(a) | set(b), key=str) if a.get(key, "(absent)") != b.get(key, "(absent)")]


def diff_builds(a: Manifest, b: Manifest, max_shard_lines: int = 50) -> tuple[list[str], list[str]]:
    """(differences, one summary line per section); no differences = same configs, counts and shard bytes."""
    identity = ("schema_version", "created_by", "build_config_hash", "tokenizer_hash", "processor_hash", "image_mode",
                "max_history_images")
    ident_a = {k: getattr(a, k) for k in identity} | {"vggt": dataclasses.asdict(a.vggt) if a.vggt else None}
    ident_b = {k: getattr(b, k) for k in identity} | {"vggt": dataclasses.asdict(b.vggt) if b.vggt else None}
    config = _compare("config ", ident_a, ident_b) + _compare("config build_config.", a.build_config, b.build_config)
    counts = (_compare("counts ", {"shards": len(a.shards), **dataclasses.asdict(a.totals)},
                       {"shards": len(b.shards), **dataclasses.asdict(b.totals)})
              + _compare("counts rejects_by_reason.", a.rejects_by_reason, b.rejects_by_reason)
              + _compare("counts episode_flags.", a.episode_flags, b.episode_flags))
    shards_a, shards_b = {s.name: s for s in a.shards}, {s.name: s for s in b.shards}
    both = [n for n in shards_a if n in shards_b]
    differ = [n for n in both if shards_a[n].sha256 != shards_b[n].sha256]
    only = [(n, "A") for n in shards_a if n not in shards_b] + [(n, "B") for n in shards_b if n not in shards_a]
    shard_lines = [f"shard {n}: sha256 A {shards_a[n].sha256[:16]}… ({shards_a[n].samples} samples), "
                   f"B {shards_b[n].sha256[:16]}… ({shards_b[n].samples} samples)" for n in differ]
    shard_lines += [f"shard {n}: only in {side}" for n, side in only]
    if len(shard_lines) > max_shard_lines:
        shard_lines = shard_lines[:max_shard_lines] + [f"shard …: {len(shard_lines) - max_shard_lines} more not shown"]
    summary = [f"config: {len(config)} differences", f"counts: {len(counts)} differences",
               f"shards: {len(both) - len(differ)} identical, {len(differ)} differ, "
               f"{sum(s == 'A' for _, s in only)} only in A, {sum(s == 'B' for _, s in only)} only in B"]
    return config + counts + shard_lines, summary
