"""Verification of a build against its manifest; every problem is one line naming shard, member and problem.

Quick: each listed shard exists with its recorded size and sha256, no unknown `*.tar` sits beside them, the
totals add up (one streamed read per shard, ~1.5 GB/s/core). Deep adds decoding every member
(`shards_manifest.deep_verify`) in that same single read.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from schemas.errors import SchemaError
from schemas.manifest import MANIFEST_NAME, Manifest, ShardRecord, read_manifest
from shards_manifest import shard_io
from shards_manifest.deep_verify import ShardCheck, deep_verify

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Outcome of `verify_build`: problems (empty = good) and what was checked."""

    manifest_url: str
    deep: bool
    problems: list[str] = field(default_factory=list)
    num_shards: int = 0
    num_samples: int = 0  # deep: samples decoded; quick: samples the manifest lists
    num_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def locate(path: str) -> tuple[str, str]:
    """(build root URL, manifest URL) of a build folder/URL or of its `manifest.json`."""
    path = path.rstrip("/")
    if path.endswith(".json"):
        return (path.rsplit("/", 1)[0] if "/" in path else "."), path
    return path, f"{path}/{MANIFEST_NAME}"


def listing_problems(root_url: str, manifest: Manifest) -> tuple[list[str], set[str]]:
    """(unknown `*.tar` files beside the manifest, names of the files present in the build folder)."""
    fs, root = shard_io.url_to_fs(root_url)
    root = root.rstrip("/")
    present = set(shard_io.list_names(fs, root))
    listed = {s.name for s in manifest.shards}
    unknown = [f"shard {root_url.rstrip('/')}/{name}: not listed in the manifest (unknown shard beside the build)"
               for name in sorted(present - listed) if name.endswith(".tar") and not name.startswith(".")]
    return unknown, present


def _empty_record_problems(root_url: str, manifest: Manifest) -> list[str]:
    return [f"shard {root_url.rstrip('/')}/{s.name}: empty shard: the manifest lists it with 0 samples"
            for s in manifest.shards if s.samples == 0]


def quick_verify(root_url: str, manifest: Manifest, num_threads: int = 8,
                 on_shard: Callable[[ShardRecord], None] | None = None, hashes: bool = True) -> list[str]:
    """Problems found (empty list = all good); each names the shard and what was expected and found.

    `on_shard(record)` is called in the caller's thread as each shard's check finishes (progress bars).
    `hashes=False` checks listing, sizes and totals only, without reading the shards."""
    fs, root = shard_io.url_to_fs(root_url)
    root = root.rstrip("/")
    problems, present = listing_problems(root_url, manifest)
    base = root_url.rstrip("/")

    def check(record: ShardRecord) -> str | None:
        url = f"{base}/{record.name}"
        if record.name not in present:
            return f"shard {url}: missing (the manifest lists it with {record.bytes} bytes)"
        size = fs.size(f"{root}/{record.name}")
        if size != record.bytes:
            return f"shard {url}: expected {record.bytes} bytes (manifest), found {size}"
        digest = shard_io.sha256_of(url) if hashes else record.sha256
        if digest != record.sha256:
            return f"shard {url}: expected sha256 {record.sha256} (manifest), found {digest}"
        return None

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for record, problem in zip(manifest.shards, pool.map(check, manifest.shards)):
            problems += [problem] if problem else []
            if on_shard is not None:
                on_shard(record)
    problems += _empty_record_problems(root_url, manifest)
    problems += [f"manifest {base}/{MANIFEST_NAME}: {p}" for p in manifest.totals_problems()]
    return problems


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def verify_build(path: str, deep: bool = False, workers: int | None = None, executor: str = "process",
                 on_shard: Callable[[ShardCheck | ShardRecord], None] | None = None) -> VerifyReport:
    """Verify the build at `path` (folder, URL or manifest.json); never raises for a bad build, reports it.

    `on_shard` gets each finished shard (a ShardCheck when deep, else its ShardRecord) for progress display."""
    start = time.perf_counter()
    root_url, manifest_url = locate(path)
    report = VerifyReport(manifest_url, deep)
    try:
        manifest = read_manifest(manifest_url)
    except FileNotFoundError:
        report.problems.append(f"manifest {manifest_url}: missing (expected the build's {MANIFEST_NAME})")
        return report
    except SchemaError as e:
        report.problems.append(f"manifest {e}")
        return report
    workers = workers or default_workers()
    report.num_shards = len(manifest.shards)
    if deep:
        unknown, _ = listing_problems(root_url, manifest)
        shard_problems, checks = deep_verify(root_url, manifest, workers, executor, on_shard)
        report.problems += unknown + shard_problems + _empty_record_problems(root_url, manifest)
        report.problems += [f"manifest {manifest_url}: {p}" for p in manifest.totals_problems()]
        report.num_samples = sum(c.samples for c in checks)
        report.num_bytes = sum(c.bytes for c in checks)
    else:
        report.problems += quick_verify(root_url, manifest, max(workers, 8), on_shard)
        report.num_samples, report.num_bytes = manifest.totals.samples, manifest.totals.bytes
    report.seconds = time.perf_counter() - start
    log.info("verify %s (%s): %d problems in %.1f s", manifest_url, "deep" if deep else "quick",
             len(report.problems), report.seconds)
    return report
