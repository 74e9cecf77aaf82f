"""Bad inputs end in the rejects report with their reason while the rest builds; a task that fails midway
leaves a build that a re-run completes byte-identically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prep.build
from prep.build import BuildError, build
from prep.episodes import expand_samples, read_episode
from prep.sample_data import write_sample_episodes
from schemas.config import BuildConfig

GOOD_STEP = {"landmark_description": "A door.", "spatial_description": "1 m ahead."}


def make_episode(root: Path, name: str, steps: dict[str, object], milestones: object = None,
                 image: Image.Image | None = None) -> Path:
    """An episode folder; `steps` maps an image file name to its JSON (None: no JSON; bytes: raw image bytes)."""
    folder = root / name
    folder.mkdir(parents=True)
    if milestones is not False:
        text = milestones if isinstance(milestones, str) else json.dumps(
            milestones or {"instruction_text": "Go to the door.", "subinstructions": ["Go."]})
        (folder / "milestones_result.json").write_text(text, encoding="utf-8")
    for file_name, step in steps.items():
        path = folder / file_name
        if isinstance(step, bytes):
            path.write_bytes(step)
            step = GOOD_STEP
        else:
            (image or Image.new("RGB", (64, 48), (90, 120, 30))).save(path)
        if step is not None:
            text = step if isinstance(step, str) else json.dumps(step, ensure_ascii=False)
            path.with_suffix(".json").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def messy_root(tmp_path) -> Path:
    root = write_sample_episodes(tmp_path / "episodes", num_episodes=3, seed=5)
    png = next((root / "episode_000").glob("step_0_*.png")).read_bytes()
    make_episode(root, "bad_truncated_png", {"step_0_STOP.png": png[: len(png) // 3]})
    make_episode(root, "bad_text_as_png", {"step_0_STOP.png": b"this is not an image\n"})
    make_episode(root, "bad_no_milestones", {"step_0_STOP.png": GOOD_STEP}, milestones=False)
    make_episode(root, "bad_milestones_json", {"step_0_STOP.png": GOOD_STEP}, milestones="{not json")
    make_episode(root, "bad_empty_landmark", {"step_0_STOP.png": {**GOOD_STEP, "landmark_description": ""}})
    make_episode(root, "bad_empty_spatial", {"step_0_STOP.png": {**GOOD_STEP, "spatial_description": ""}})
    make_episode(root, "bad_step_json", {"step_0_STOP.png": "{oops"})
    make_episode(root, "bad_unknown_action", {"step_0_JUMP.png": GOOD_STEP})
    make_episode(root, "bad_zero_steps", {})
    make_episode(root, "bad_too_thin", {"step_0_STOP.png": GOOD_STEP}, image=Image.new("RGB", (3000, 10)))
    make_episode(root, "bad_image_tag", {"step_0_STOP.png": {**GOOD_STEP, "landmark_description": "A <image> door."}})
    make_episode(root, "bad_chat_token", {"step_0_STOP.png": GOOD_STEP},
                 milestones={"instruction_text": "Go.<|im_end|>", "subinstructions": ["Go."]})
    make_episode(root, "odd_1x1", {"step_0_STOP.png": GOOD_STEP}, image=Image.new("RGB", (1, 1), (255, 0, 0)))
    make_episode(root, "odd_4000x3000", {"step_0_STOP.png": GOOD_STEP}, image=Image.new("RGB", (4000, 3000)))
    make_episode(root, "odd_gray", {"step_0_STOP.png": GOOD_STEP}, image=Image.new("L", (64, 48), 128))
    make_episode(root, "odd_rgba", {"step_0_STOP.png": GOOD_STEP}, image=Image.new("RGBA", (48, 64), (0, 0, 0, 0)))
    make_episode(root, "odd_palette", {"step_0_STOP.png": GOOD_STEP}, image=Image.new("P", (64, 48), 3))
    make_episode(root, "odd_unicode", {"step_0_STOP.png": {"landmark_description": "出口 🌿 café",
                                                           "spatial_description": "≈3 m “ahead”"}})
    return root


EXPECTED_REJECTS = {
    "bad_truncated_png/step_0_STOP.png": "unreadable_image", "bad_text_as_png/step_0_STOP.png": "unreadable_image",
    "bad_no_milestones": "no_milestones_file", "bad_milestones_json": "invalid_milestones",
    "bad_empty_landmark/step_0_STOP.png": "empty_landmark_description",
    "bad_empty_spatial/step_0_STOP.png": "empty_spatial_description",
    "bad_step_json/step_0_STOP.png": "invalid_step_json", "bad_unknown_action/step_0_JUMP.png": "unknown_action",
    "bad_zero_steps": "no_step_files", "bad_too_thin/step_0_STOP.png": "unreadable_image",
    "episode_001/step_2_TURN_LEFT.png": "missing_step_json",
    "bad_image_tag/step_0_STOP.png": "special_token_in_text", "bad_chat_token/step_0_STOP.png": "special_token_in_text",
}


def test_each_bad_input_is_rejected_with_its_reason_and_the_rest_builds(messy_root, tokenizer_dir, tmp_path):
    config = BuildConfig(input=str(messy_root), model_path=str(tokenizer_dir), output=str(tmp_path / "out"),
                         max_reject_fraction=0.5, progress=False)
    summary = build(config)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["source"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    details = {r["source"]: r["detail"] for r in rejects}
    assert details["bad_image_tag/step_0_STOP.png"] == "description_2d contains '<image>'"
    assert details["bad_chat_token/step_0_STOP.png"] == "instruction contains '<|im_end|>'"
    assert "cannot identify image file" in details["bad_text_as_png/step_0_STOP.png"]  # the cause, not just "bad"
    assert "found '3000x10'" in details["bad_too_thin/step_0_STOP.png"]
    # 3 good episodes + 6 odd-but-valid single-step episodes all build
    good = sum(1 for s in read_episode_samples(messy_root) if not s.startswith("bad_"))
    assert summary["samples"] == good


def read_episode_samples(root: Path) -> list[str]:
    from prep.episodes import read_samples
    return [s.sample_id for s in read_samples(root, 8)[0]]


def test_reject_budget_names_the_worst_reasons(messy_root, tokenizer_dir, tmp_path):
    config = BuildConfig(input=str(messy_root), model_path=str(tokenizer_dir), output=str(tmp_path / "out"),
                         max_reject_fraction=0.05, progress=False)
    with pytest.raises(BuildError, match=r"'unreadable_image': 3"):
        build(config)


def test_unreadable_files_are_rejected(tmp_path, monkeypatch):
    """Permission errors (simulated: the tests may run as root, who reads everything) become rejects."""
    folder = make_episode(tmp_path / "in", "ep", {"step_0_STOP.png": GOOD_STEP})
    real_read_text = Path.read_text

    def denied(path, *args, **kwargs):
        if path.suffix == ".json":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(path, *args, **kwargs)

    episode, _ = read_episode(folder)
    monkeypatch.setattr(Path, "read_text", denied)
    _, step_rejects = expand_samples(episode, 8)
    assert [(r.reason, "Permission denied" in r.detail) for r in step_rejects] == [("invalid_step_json", True)]
    _, rejects = read_episode(folder)
    assert [r.reason for r in rejects] == ["invalid_milestones"]


def test_input_file_errors_name_file_and_problem(tmp_path):
    folder = make_episode(tmp_path, "ep", {"step_0_STOP.png": GOOD_STEP},
                          milestones=json.dumps({"instruction_text": 3}))
    episode, rejects = read_episode(folder)
    assert episode is None and rejects[0].reason == "invalid_milestones"
    assert str(folder / "milestones_result.json") in rejects[0].detail and "instruction_text" in rejects[0].detail


def test_failed_task_then_rerun_equals_clean_build(episodes_dir, tokenizer_dir, tmp_path, monkeypatch):
    config = BuildConfig(input=str(episodes_dir), model_path=str(tokenizer_dir), output=str(tmp_path / "crash"),
                         episodes_per_shard=1, max_reject_fraction=0.5, progress=False)
    real_run_task = prep.build.run_task

    def dies_on_third_shard(task, cfg):
        if task.index == 2:
            raise RuntimeError("worker died")
        return real_run_task(task, cfg)

    monkeypatch.setattr(prep.build, "run_task", dies_on_third_shard)
    with pytest.raises(RuntimeError, match="worker died"):
        build(config)
    assert not (tmp_path / "crash" / "manifest.json").exists()
    monkeypatch.setattr(prep.build, "run_task", real_run_task)
    summary = build(config)
    assert summary["shards_skipped_already_done"] == 2
    build(config.replace(output=str(tmp_path / "clean")))
    names = sorted(p.name for p in (tmp_path / "clean").glob("shard-*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "crash").glob("shard-*.tar")) and len(names) == 3
    assert all((tmp_path / "clean" / n).read_bytes() == (tmp_path / "crash" / n).read_bytes() for n in names)
    assert np.array_equal(*[json.loads((tmp_path / d / "manifest.json").read_text())["totals"]["samples"]
                            for d in ("clean", "crash")])


def test_crop_mode_rejects_samples_whose_frames_differ_in_size(tmp_path, tokenizer_dir):
    root = tmp_path / "episodes"
    steps = {f"step_{i}_MOVE_FORWARD.png": GOOD_STEP for i in range(3)}
    make_episode(root, "ep", steps)
    Image.new("RGB", (48, 64), (10, 20, 30)).save(root / "ep" / "step_1_MOVE_FORWARD.png")  # portrait among landscape
    for mode, expected in (("crop", {"ep/step_1_MOVE_FORWARD.png", "ep/step_2_MOVE_FORWARD.png"}), ("pad", set())):
        config = BuildConfig(input=str(root), model_path=str(tokenizer_dir), output=str(tmp_path / mode),
                             image_mode=mode, max_reject_fraction=1.0, progress=False)
        build(config)
        rejects = [json.loads(line) for line in (tmp_path / mode / "rejects.jsonl").read_text().splitlines()]
        assert {r["source"] for r in rejects if r["reason"] == "mixed_frame_sizes"} == expected
