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
        pytest.skip(f"golden fixtures not found at {path}/fixtures/original (the ../shared folder beside the repo; "
                    "set VLN_SHARED to point elsewhere)")
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


@pytest.fixture(scope="session")
def good_build(tmp_path_factory, episodes_dir, tokenizer_dir) -> Path:
    """A build of the golden episodes (2 episodes per shard: ep_a + ep_b, ep_c); copy it before corrupting it."""
    from prep.build import build
    from schemas.config import BuildConfig

    out = tmp_path_factory.mktemp("good-build") / "good"
    build(BuildConfig(input=str(episodes_dir), model_path=str(tokenizer_dir), output=str(out), episodes_per_shard=2,
                      max_reject_fraction=0.5, progress=False))
    return out
