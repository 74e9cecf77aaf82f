"""The build's bookkeeping around the tasks: output checks, rejects report, manifest, summary table."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter

from prep.shard_task import TASKS_DIR, ShardResult, read_task_record
from schemas import SCHEMA_VERSION
from schemas.config import PROCESSOR_FILES, TOKENIZER_FILES, BuildConfig, files_hash
from schemas.episode import AMBIGUOUS_SUBINSTRUCTION_MAPPING
from schemas.errors import SchemaError
from schemas.manifest import Manifest, ShardRecord, Totals, VggtTags, write_bytes_atomic
from shards_manifest import shard_io

log = logging.getLogger(__name__)
CREATED_BY = "vln-shards 0.1.0 prep.build"
SHARD_FILE = re.compile(r"shard-\d{6}\.tar")
IDENTITY_FILE = f"{TASKS_DIR}/build_identity.json"  # the options of the build in this folder


def check_output(config: BuildConfig) -> None:
    """Refuse to mix builds: an output made with another config needs --overwrite (which clears it)."""
    fs, root = shard_io.url_to_fs(config.output)
    root = root.rstrip("/")
    hashes = set()
    if fs.exists(f"{root}/manifest.json"):
        try:
            hashes.add(shard_io.read_manifest(f"{config.output.rstrip('/')}/manifest.json").build_config_hash)
        except SchemaError as e:
            if not config.overwrite:
                raise FileExistsError(f"{config.output}/manifest.json is unreadable ({e}); use --overwrite to "
                                      "replace the build there or choose another --output") from e
            hashes.add("unreadable manifest")
    if fs.exists(f"{root}/{TASKS_DIR}"):
        for name in shard_io.list_names(fs, f"{root}/{TASKS_DIR}"):
            path = f"{root}/{TASKS_DIR}/{name}"
            record = read_task_record(fs, path) if SHARD_FILE.fullmatch(name.removesuffix(".json")) else None
            if record is not None:  # unreadable records only mean "not finished"
                hashes.add(record.config_hash)
    foreign = hashes - {config.output_hash()}
    if foreign and not config.overwrite:
        raise FileExistsError(f"{config.output} holds a build with another configuration "
                              f"({_differences(fs, root, config)}); use --overwrite to replace it or choose another "
                              "--output")
    if foreign:
        log.warning("--overwrite: removing the previous build in %s", config.output)
        for name in shard_io.list_names(fs, root):
            if name.startswith("shard-") or name in ("manifest.json", "rejects.jsonl", TASKS_DIR):
                fs.rm(f"{root}/{name}", recursive=True)
    fs.makedirs(root, exist_ok=True)
    write_bytes_atomic(f"{config.output.rstrip('/')}/{IDENTITY_FILE}",
                       json.dumps({"hash": config.output_hash(), "values": config.identity()}, indent=1,
                                  sort_keys=True).encode())


def _differences(fs, root: str, config: BuildConfig) -> str:
    """What differs between the build in the folder (its identity file) and `config`, for the refusal message."""
    try:
        stored = json.loads(fs.cat_file(f"{root}/{IDENTITY_FILE}"))["values"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"this build's config hash is {config.output_hash()[:12]}; the folder's options are not recorded"
    current = config.identity()
    changed = [f"{key} {stored.get(key)!r} → {current.get(key)!r}" for key in sorted(set(stored) | set(current))
               if stored.get(key) != current.get(key)]
    return "differs in " + "; ".join(changed) if changed else "same options, other hash"


def remove_stale_shards(config: BuildConfig, planned: set[str], written: set[str]) -> list[str]:
    """Remove shards this run did not produce (left by an earlier run of this build over an input that has since
    lost episodes, or whose samples are now all rejected), and the records of tasks no longer planned. Every
    remaining `shard-*.tar` is then one the manifest lists. Returns the removed shard names."""
    fs, root = shard_io.url_to_fs(config.output)
    root = root.rstrip("/")
    stale = sorted(name for name in shard_io.list_names(fs, root) if SHARD_FILE.fullmatch(name) and name not in written)
    for name in stale:
        fs.rm(f"{root}/{name}")
        if name not in planned and fs.exists(f"{root}/{TASKS_DIR}/{name}.json"):
            fs.rm(f"{root}/{TASKS_DIR}/{name}.json")
    if stale:
        log.warning("removed %d shard(s) that this build no longer produces (the input changed since an earlier run): "
                    "%s", len(stale), ", ".join(stale[:5]) + (" …" if len(stale) > 5 else ""))
    return stale


def write_rejects(config: BuildConfig, rejects: list[dict]) -> None:
    fs, root = shard_io.url_to_fs(config.output)
    with fs.open(f"{root.rstrip('/')}/rejects.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects)


def manifest_from_results(config: BuildConfig, results: list[ShardResult], rejects: list[dict],
                          vggt: VggtTags | None = None) -> Manifest:
    shards = tuple(ShardRecord(name=r.name, episodes=r.episodes, samples=r.samples, frames=r.frames, bytes=r.bytes,
                               sha256=r.sha256, text_tokens=r.text_tokens, visual_tokens=r.visual_tokens)
                   for r in results if r.samples)
    totals = Totals(**{k: sum(getattr(s, k) for s in shards) for k in
                       ("episodes", "samples", "frames", "bytes", "text_tokens", "visual_tokens")},
                    source_image_bytes=sum(r.source_image_bytes for r in results))
    ambiguous = sum(r.ambiguous_episodes for r in results)
    return Manifest(
        schema_version=SCHEMA_VERSION, created_by=CREATED_BY, build_config=config.output_dict(),
        build_config_hash=config.output_hash(), tokenizer_hash=files_hash(config.model_path, TOKENIZER_FILES),
        processor_hash=files_hash(config.model_path, PROCESSOR_FILES), image_mode=config.image_mode,
        max_history_images=config.max_history_images, vggt=vggt, shards=shards, totals=totals,
        rejects_by_reason=dict(sorted(Counter(r["reason"] for r in rejects).items())),
        episode_flags={AMBIGUOUS_SUBINSTRUCTION_MAPPING: ambiguous} if ambiguous else {})


def print_summary(config: BuildConfig, results: list[ShardResult], rejects: list[dict], manifest: Manifest) -> dict:
    t = manifest.totals
    seconds = sum(r.seconds for r in results if not r.skipped)
    summary = {
        "output": config.output, "shards": len(manifest.shards), "shards_skipped_already_done": sum(r.skipped for r in results),
        "episodes": t.episodes, "samples": t.samples, "unique_frames": t.frames, "rejects": len(rejects),
        "shard_bytes": t.bytes, "bytes_per_sample": t.bytes // max(1, t.samples),
        "ratio_to_source_png_bytes": round(t.bytes / max(1, t.source_image_bytes), 3),
        "task_seconds": round(seconds, 2),
        "frames_per_task_second": round(sum(r.frames for r in results if not r.skipped) / max(seconds, 1e-9), 1),
    }
    if manifest.vggt is not None:
        computed = [r for r in results if r.samples and not r.vggt_skipped]
        vggt_seconds = sum(r.vggt_seconds for r in computed)
        summary.update(vggt_shards_computed=len(computed),
                       vggt_shards_skipped_already_done=sum(r.vggt_skipped for r in results),
                       vggt_samples_per_second=round(sum(r.samples for r in computed) / max(vggt_seconds, 1e-9), 2))
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))
    for reason, count in manifest.rejects_by_reason.items():
        print(f"{'  reject: ' + reason:<{width}}  {count}")
    for flag, count in manifest.episode_flags.items():
        print(f"{'  episodes with ' + flag:<{width}}  {count}")
    return summary
