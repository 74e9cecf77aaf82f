"""Shared fixtures: the ../shared folder (golden data), the real-size tokenizer, tiny synthetic episodes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("VLN_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_dir()
    if not (path / "fixtures" / "original").is_dir():
        pytest.fail(f"golden fixtures not found: expected {path}/fixtures/original (set VLN_SHARED)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "original"


@pytest.fixture(scope="session")
def episodes_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "episodes"


@pytest.fixture(scope="session")
def tokenizer_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "tokenizer"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=True)
