"""`python -m prep.build`: episode folders (or annotation files) → zstd WebDataset shards + manifest.

config → plan → execute(run_task) → rejects report → manifest (written last) → quick verify.
With no arguments it builds the embedded sample data into ./shards. `--executor ray` runs the same
tasks on a local Ray or on the cluster named by `--ray-address` / $RAY_ADDRESS. `--vggt-model PATH` adds
each sample's VGGT features to its shard (a second pass on GPU holders, see prep/vggt_stage.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator

from tqdm import tqdm

from prep.build_report import check_output, manifest_from_results, print_summary, remove_stale_shards, write_rejects
from prep.plan import plan_shards
from prep.shard_task import ShardResult, run_task
from schemas.config import BuildConfig
from schemas.errors import SchemaError
from schemas.manifest import VggtTags
from shards_manifest import shard_io
from shards_manifest.verify import quick_verify

log = logging.getLogger("prep.build")


def build(config: BuildConfig) -> dict:
    """Run a whole build; returns the summary dict. Raises BuildError past the allowed reject fraction."""
    tasks, input_rejects = plan_shards(config)
    check_output(config)
    manifest_url = f"{config.output.rstrip('/')}/manifest.json"
    fs, manifest_path = shard_io.url_to_fs(manifest_url)
    if fs.exists(manifest_path):  # a manifest describes a finished build: this one is not, until it ends
        fs.rm(manifest_path)
    checkpoint_sha256 = _checkpoint_sha256(config)
    results_iter = _execute(tasks, config, checkpoint_sha256)
    results = _collect_with_progress(results_iter, len(tasks), config.progress)
    results.sort(key=lambda r: r.index)
    rejects = [r.to_dict() for r in input_rejects] + [rej for r in results for rej in r.rejects]
    write_rejects(config, rejects)
    manifest = manifest_from_results(config, results, rejects, _vggt_tags(config, results, checkpoint_sha256))
    num_samples = manifest.totals.samples
    fraction = len(rejects) / max(1, len(rejects) + num_samples)
    if fraction > config.max_reject_fraction:
        by_reason = Counter(r["reason"] for r in rejects)
        raise BuildError(f"{len(rejects)} of {len(rejects) + num_samples} inputs rejected ({fraction:.1%}), more than "
                         f"max_reject_fraction {config.max_reject_fraction:.1%}; by reason: {dict(by_reason)}; "
                         f"see {config.output}/rejects.jsonl. No manifest was written.")
    remove_stale_shards(config, {t.name for t in tasks}, {r.name for r in results if r.samples})
    # Before the manifest is written. Listing, sizes and totals only: every shard's sha256 was just computed by its
    # task, from the bytes as they were written or, for a skipped shard, read back. Re-hashing here would re-read
    # the whole build through this one process; `python -m shards_manifest verify` does that on demand.
    problems = quick_verify(config.output, manifest, hashes=False)
    if problems:
        raise BuildError("the build's shards do not match its manifest; no manifest was written:\n"
                         + "\n".join(problems))
    shard_io.write_manifest(manifest_url, manifest)
    return print_summary(config, results, rejects, manifest)


class BuildError(RuntimeError):
    pass


def _execute(tasks: list, config: BuildConfig, checkpoint_sha256: str) -> Iterator[ShardResult]:
    """Shard results as tasks finish; with a VGGT checkpoint each shard then gets its features (prep.vggt_stage)."""
    if config.executor == "ray":
        from prep.ray_executor import execute_on_ray
        return execute_on_ray(tasks, config, checkpoint_sha256)
    results = (run_task(task, config) for task in tasks)
    if checkpoint_sha256:
        from prep.vggt_stage import FeatureStage
        results = map(FeatureStage(config, checkpoint_sha256).process, results)
    return results


def _checkpoint_sha256(config: BuildConfig) -> str:
    """The VGGT checkpoint's content hash ("" without --vggt-model): the features' identity, not its path."""
    if not config.vggt_model:
        return ""
    from prep.vggt_stage import file_sha256
    digest = file_sha256(config.vggt_model)
    log.info("VGGT checkpoint %s: sha256 %s", config.vggt_model, digest)
    return digest


def _vggt_tags(config: BuildConfig, results: list[ShardResult], checkpoint_sha256: str) -> VggtTags | None:
    if not checkpoint_sha256:
        return None
    missing = [r.name for r in results if r.samples and r.vggt != checkpoint_sha256]
    if missing:
        raise BuildError(f"shards without the VGGT features of {config.vggt_model}: {missing[:5]}")
    from prep.vggt_stage import vggt_tags
    return vggt_tags(config, checkpoint_sha256)


def _collect_with_progress(results_iter, num_tasks: int, show: bool) -> list[ShardResult]:
    results, start = [], time.perf_counter()
    totals = Counter()
    with tqdm(total=num_tasks, unit="shard", disable=not show, dynamic_ncols=True) as bar:
        for result in results_iter:
            results.append(result)
            totals.update(samples=result.samples, frames=result.frames, bytes=result.bytes, rejects=len(result.rejects))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(samples=totals["samples"], frames_s=f"{totals['frames'] / elapsed:.1f}",
                            MB_s=f"{totals['bytes'] / elapsed / 1e6:.1f}", rejects=totals["rejects"], refresh=False)
            bar.update(1)
    return results


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    parser = argparse.ArgumentParser(
        prog="python -m prep.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option can also be set in a TOML/YAML file given with --config; flags override the file.")
    parser.add_argument("--config", help="TOML or YAML file of build options (keys as below, with underscores)")
    for f in dataclasses.fields(BuildConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} ".replace("%", "%%") if f.metadata.get("help") else ""  # argparse formats %
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text}(default {f.default})")
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=f"{text}(default {f.default!r})")
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        config = BuildConfig.from_file(config_file, overrides) if config_file else BuildConfig.from_mapping(overrides)
    except SchemaError as e:
        parser.error(str(e))
    return _with_sample_defaults(config)


def _with_sample_defaults(config: BuildConfig) -> BuildConfig:
    """No --input: the embedded sample episodes; no --model-path: the shipped Qwen2.5 tokenizer."""
    from prep.sample_data import ensure_sample_episodes, ensure_tokenizer

    changes = {}
    if not config.input:
        changes["input"] = str(ensure_sample_episodes())
        log.info("no --input: building the embedded sample episodes (%s)", changes["input"])
    if not config.model_path:
        changes["model_path"] = str(ensure_tokenizer())
        log.info("no --model-path: using the bundled Qwen2.5 tokenizer; real runs pass --model-path "
                 "<local Qwen2.5-VL-7B-Instruct folder> (its tokenizer and preprocessor_config.json)")
    return config.replace(**changes) if changes else config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build(parse_args(argv))
    except (BuildError, SchemaError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
