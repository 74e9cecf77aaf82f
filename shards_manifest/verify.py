"""Quick verification of a build: every shard of the manifest exists with its recorded size and sha256,
and no unknown shard files sit beside them. (Deep verification lives in `shards_manifest.deep_verify`.)"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from schemas.manifest import Manifest
from shards_manifest import shard_io

SHARD_FILE = re.compile(r"^shard-\d{6}\.tar$")


def quick_verify(root_url: str, manifest: Manifest, num_threads: int = 8) -> list[str]:
    """Problems found (empty list = all good); each names the shard and what was expected and found."""
    fs, root = shard_io.url_to_fs(root_url)
    root = root.rstrip("/")
    listed = {s.name for s in manifest.shards}
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    problems = [f"{root_url}/{name}: not listed in the manifest (unknown shard beside the build)"
                for name in sorted(present - listed) if SHARD_FILE.match(name)]

    def check(record) -> str | None:
        path = f"{root}/{record.name}"
        if record.name not in present:
            return f"{root_url}/{record.name}: missing (expected {record.bytes} bytes)"
        size = fs.size(path)
        if size != record.bytes:
            return f"{root_url}/{record.name}: expected {record.bytes} bytes, found {size}"
        digest = shard_io.sha256_of(f"{root_url.rstrip('/')}/{record.name}")
        if digest != record.sha256:
            return f"{root_url}/{record.name}: expected sha256 {record.sha256}, found {digest}"
        return None

    with ThreadPoolExecutor(num_threads) as pool:
        problems += [p for p in pool.map(check, manifest.shards) if p]
    problems += [f"{root_url}/manifest.json: {p}" for p in manifest.totals_problems()]
    return problems
