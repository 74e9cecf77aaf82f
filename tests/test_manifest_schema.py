"""Manifest schema: strict parsing (keys, types, counts, versions), deterministic JSON, atomic fsspec I/O."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import fsspec
import pytest

from schemas import SCHEMA_VERSION
from schemas.errors import SchemaError
from schemas.manifest import Manifest, ShardRecord, Totals, VggtTags, read_manifest, write_manifest


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_manifest(vggt: bool = True) -> Manifest:
    shards = (ShardRecord("shard-000000.tar", 2, 30, 40, 10240, sha("a"), 150_000, 140_000),
              ShardRecord("shard-000001.tar", 1, 12, 15, 20480, sha("b"), 60_000, 57_000))
    totals = Totals(episodes=3, samples=42, frames=55, bytes=30720, text_tokens=210_000, visual_tokens=197_000,
                    source_image_bytes=9_000_000)
    return Manifest(
        schema_version=SCHEMA_VERSION, created_by="vln-shards 0.1.0 prep.build",
        build_config={"image_mode": "pad", "max_length": 8192, "zstd_level": 3, "nested": {"ü": [1, 2.5, None]}},
        build_config_hash=sha("config"), tokenizer_hash=sha("tok"), processor_hash=sha("proc"),
        image_mode="pad", max_history_images=8,
        vggt=VggtTags(sha("vggt-1b"), "last", "bfloat16") if vggt else None,
        shards=shards, totals=totals, rejects_by_reason={"empty_description": 2, "truncated_png": 1})


def as_dict(manifest: Manifest) -> dict:
    return json.loads(manifest.to_json())


def parse(obj: object) -> Manifest:
    return Manifest.from_json(json.dumps(obj), "gs://bucket/run/manifest.json")


def expect_schema_error(obj: object, field: str, expected: str) -> None:
    with pytest.raises(SchemaError) as info:
        parse(obj)
    message = str(info.value)
    assert message.startswith("gs://bucket/run/manifest.json: ") and f"field {field!r}" in message, message
    assert expected in message, message


@pytest.mark.parametrize("vggt", [True, False])
def test_json_round_trip_is_exact_and_deterministic(vggt: bool) -> None:
    manifest = make_manifest(vggt)
    text = manifest.to_json()
    assert parse(json.loads(text)) == manifest
    assert Manifest.from_json(text, "m").to_json() == text
    obj = json.loads(text)
    assert list(obj) == sorted(obj) and list(obj["totals"]) == sorted(obj["totals"])
    assert obj["shards"][1] == {"name": "shard-000001.tar", "episodes": 1, "samples": 12, "frames": 15,
                                "bytes": 20480, "sha256": sha("b"), "text_tokens": 60_000, "visual_tokens": 57_000}
    assert obj["vggt"] == ({"checkpoint_sha256": sha("vggt-1b"), "reference_frame": "last", "dtype": "bfloat16"}
                           if vggt else None)
    assert text.endswith("}\n") and '"ü"' in text


def test_totals_problems_names_each_disagreeing_total() -> None:
    manifest = make_manifest()
    assert manifest.totals_problems() == []
    wrong = dataclasses.replace(manifest, totals=dataclasses.replace(manifest.totals, samples=41, bytes=1))
    assert wrong.totals_problems() == ["totals.samples is 41 but the shards sum to 42",
                                       "totals.bytes is 1 but the shards sum to 30720"]


def test_newer_schema_version_is_refused_clearly() -> None:
    obj = as_dict(make_manifest())
    obj["schema_version"] = SCHEMA_VERSION + 1
    obj["a_key_from_the_future"] = 1  # the version is checked before the key set
    expect_schema_error(obj, "schema_version", "upgrade vln-shards")
    obj = as_dict(make_manifest())
    obj["schema_version"] = 0
    expect_schema_error(obj, "schema_version", f"1..{SCHEMA_VERSION}")


def test_invalid_json_names_the_file() -> None:
    with pytest.raises(SchemaError, match=r"^m\.json: field '\(document\)': expected valid JSON, found "
                                          r"'invalid JSON: Expecting .* at line 1 column \d+'"):
        Manifest.from_json('{"schema_version": 1,', "m.json")
    expect_schema_error([1, 2], "(document)", "a JSON object (Manifest)")


@pytest.mark.parametrize(("edit", "field", "expected"), [
    (lambda o: o.update(extra=1), "extra", "only the keys"),
    (lambda o: o.pop("tokenizer_hash"), "tokenizer_hash", "a missing key"),
    (lambda o: o["shards"][1].update(samples=-1), "shards[1].samples", "a non-negative integer"),
    (lambda o: o["shards"][0].update(samples=True), "shards[0].samples", "a non-negative integer"),
    (lambda o: o["shards"][0].update(frames=3.0), "shards[0].frames", "a non-negative integer"),
    (lambda o: o["shards"][0].update(sha256="ABC"), "shards[0].sha256", "64 lowercase hex digits"),
    (lambda o: o["shards"][0].update(name="../x.tar"), "shards[0].name", "a plain file name"),
    (lambda o: o["shards"][1].update(name="shard-000000.tar"), "shards", "distinct shard names"),
    (lambda o: o["shards"][0].pop("bytes"), "shards[0].bytes", "a missing key"),
    (lambda o: o["shards"][0].update(extra=0), "shards[0].extra", "only the keys"),
    (lambda o: o.update(shards={"a": 1}), "shards", "a list of ShardRecord"),
    (lambda o: o.update(image_mode="stretch"), "image_mode", "one of ('pad', 'crop')"),
    (lambda o: o["vggt"].update(reference_frame="middle"), "vggt.reference_frame", "one of ('first', 'last')"),
    (lambda o: o["vggt"].update(dtype="int8"), "vggt.dtype", "one of ('float16', 'bfloat16', 'float32')"),
    (lambda o: o.update(vggt="yes"), "vggt", "a JSON object (VggtTags)"),
    (lambda o: o["totals"].pop("source_image_bytes"), "totals.source_image_bytes", "a missing key"),
    (lambda o: o.update(rejects_by_reason={"x": "1"}), "rejects_by_reason", "of non-negative integers"),
    (lambda o: o.update(build_config=[1]), "build_config", "a JSON object"),
    (lambda o: o.update(created_by=3), "created_by", "a string"),
    (lambda o: o.update(processor_hash="xyz"), "processor_hash", "lowercase hex"),
])
def test_strict_validation_names_key_and_problem(edit, field: str, expected: str) -> None:
    obj = as_dict(make_manifest())
    edit(obj)
    expect_schema_error(obj, field, expected)


def test_constructor_validates_python_values_too() -> None:
    import numpy as np
    with pytest.raises(SchemaError, match="ShardRecord: field 'samples': expected a non-negative integer"):
        ShardRecord("s.tar", 1, np.int64(3), 1, 1, sha("a"), 1, 1)  # type: ignore[arg-type]


def test_write_and_read_local_atomic(tmp_path: Path) -> None:
    manifest = make_manifest()
    path = tmp_path / "new" / "manifest.json"
    write_manifest(str(path), manifest)
    assert path.read_text(encoding="utf-8") == manifest.to_json()
    assert read_manifest(str(path)) == manifest
    assert read_manifest(f"file://{path}") == manifest
    other = dataclasses.replace(manifest, created_by="second writer")
    write_manifest(str(path), other)  # replaces in one rename, no temporary left behind
    assert read_manifest(str(path)) == other
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_write_and_read_memory_filesystem() -> None:
    manifest = make_manifest(vggt=False)
    url = "memory://bucket/run/manifest.json"
    write_manifest(url, manifest)
    with fsspec.open(url, "rt") as f:
        assert f.read() == manifest.to_json()
    assert read_manifest(url) == manifest


def test_read_refuses_bad_bytes_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(SchemaError, match=f"^{path}: .*undecodable bytes at offset 0"):
        read_manifest(str(path))
    path.write_text('{"schema_version": 1', encoding="utf-8")
    with pytest.raises(SchemaError, match=f"^{path}: .*invalid JSON"):
        read_manifest(str(path))
