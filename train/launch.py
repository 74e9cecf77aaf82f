"""`python -m train.launch --config FILE [--set section.key=value ...]`: train JanusVLN with JanusTrainer, alone,
under `torchrun` or under the `deepspeed` launcher. FILE (YAML or TOML) has the sections `data` (a manifest,
shard URLs, or `online:` episodes), `model` (a Qwen2.5-VL folder or `tiny: true`, a VGGT checkpoint,
JanusConfig fields), `loss` (LossConfig fields), `training` (TrainingArguments, passed through) and
`deepspeed` (a JSON path). The rules of hf-trainer-facts are enforced here; derived values are logged.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import faulthandler
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import TrainingArguments, set_seed

from schemas.config import TOKENIZER_FILES, files_hash, read_config_file
from schemas.errors import SchemaError
from schemas.manifest import check_vggt_tags, manifest_url, read_manifest
from train.callbacks import LoaderStateCallback, StepLogCallback
from train.collate import Collator
from train.loss import LossConfig
from train.model import JanusConfig, JanusVLN
from train.trainer import JanusTrainer

logger = logging.getLogger(__name__)

SECTIONS = ("data", "model", "loss", "training", "deepspeed")
DATA_KEYS = ("manifest", "shards", "online", "stream", "expect")
MODEL_KEYS = ("tiny", "vocab_size", "seed", "with_vggt", "qwen", "vggt_checkpoint", "vggt_config", "dtype",
              "vision_attention")
TINY_JANUS = {"vggt_dim": 128, "merger_hidden": 128}  # JanusVLN.tiny's aggregator gives 128-d features
TRAINING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
REQUIRED_ACCELERATOR = {"dispatch_batches": False, "split_batches": False}
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The config file as a dict, with `section.key=value` overrides (values parsed as YAML scalars/lists)."""
    config = read_config_file(path, f"a mapping with sections {SECTIONS}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SchemaError("--set", item, "section.key=value", item)
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise SchemaError("--set", ".".join(parents[: depth + 1]), f"a mapping to set {leaf!r} in", node[part])
            node = node[part]
        node[leaf] = _override_value(parents[0] if parents else "", node.get(leaf), leaf, value)
    config = _floats(config)
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise SchemaError(str(path), ", ".join(unknown), f"only the sections {SECTIONS}", "unknown sections")
    if isinstance(config.get("deepspeed"), str):  # a dict is a DeepSpeed config given inline
        config["deepspeed"] = _deepspeed_path(config["deepspeed"], Path(path))
    return config


def _override_value(section: str, current: Any, leaf: str, text: str) -> Any:
    """A `--set` value parsed as YAML, except that no/off/yes/on stay strings where the option takes a string
    (`training.save_strategy=no`): YAML 1.1 would read them as booleans."""
    parsed = yaml.safe_load(text)
    if isinstance(parsed, bool) and text.lower() not in ("true", "false"):
        reference = current if current is not None else TRAINING_DEFAULTS.get(leaf) if section == "training" else None
        if isinstance(reference, (str, enum.Enum)):
            return text
    return parsed


def _deepspeed_path(value: str, config_path: Path) -> str:
    """The DeepSpeed JSON as given (relative to the working directory), else relative to the config file."""
    for candidate in (Path(value), config_path.parent / value):
        if candidate.is_file():
            return str(candidate)
    raise SchemaError("config deepspeed", value, "a DeepSpeed JSON file, relative to the working directory or to "
                      f"the config file's folder {config_path.parent}", "no such file")


def _floats(node: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; every such leaf becomes the float it spells."""
    if isinstance(node, dict):
        return {key: _floats(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_floats(value) for value in node]
    return float(node) if isinstance(node, str) and _EXPONENT_FLOAT.fullmatch(node) else node


def build_model(section: dict[str, Any]) -> JanusVLN:
    """`tiny: true` (random, float32, for tests) or `qwen: DIR` [+ `vggt_checkpoint`]; other keys are JanusConfig."""
    janus_fields = {k: v for k, v in section.items() if k not in MODEL_KEYS}
    try:
        if section.get("tiny"):
            janus = JanusConfig(**{**TINY_JANUS, **janus_fields})
            model = JanusVLN.tiny(vocab_size=section.get("vocab_size", 151936), janus_config=janus,
                                  with_vggt=section.get("with_vggt", True), seed=section.get("seed", 0))
        elif section.get("qwen"):
            from train.vggt import tiny_config
            vggt_config = tiny_config() if section.get("vggt_config") == "tiny" else None
            model = JanusVLN.from_pretrained_parts(section["qwen"], section.get("vggt_checkpoint"),
                                                   JanusConfig(**janus_fields),
                                                   dtype=getattr(torch, section.get("dtype", "bfloat16")),
                                                   vggt_config=vggt_config)
        else:
            raise SchemaError("config model", "tiny/qwen", "`tiny: true` or `qwen: <Qwen2.5-VL folder>`", section)
    except TypeError as e:  # an unknown JanusConfig field
        raise SchemaError("config model", ", ".join(sorted(janus_fields)), f"JanusConfig fields or {MODEL_KEYS}",
                          str(e)) from e
    if section.get("vision_attention"):
        from train.vision_attention import enable_fused_vision_attention
        enable_fused_vision_attention(model, section["vision_attention"])
    return model


def check_precomputed_features(manifest_url: str, model: dict[str, Any]) -> None:
    """Refuse precomputed VGGT features made with another reference frame or checkpoint than the model section
    names (SPEC §4); a build without features needs no check (the model runs VGGT itself)."""
    manifest = read_manifest(manifest_url)
    if manifest.vggt is None:
        return
    expected = {"reference_frame": model.get("reference_frame", JanusConfig.__dataclass_fields__["reference_frame"].default)}
    if model.get("vggt_checkpoint"):
        from prep.vggt_stage import file_sha256
        expected["checkpoint_sha256"] = file_sha256(model["vggt_checkpoint"])
    else:
        logger.warning("%s holds VGGT features of checkpoint %s…; model.vggt_checkpoint is not set, so their "
                       "checkpoint is not checked", manifest_url, manifest.vggt.checkpoint_sha256[:12])
    check_vggt_tags(manifest, expected, where=manifest_url)


def expected_build(data: dict[str, Any], model: dict[str, Any]) -> dict[str, Any] | None:
    """`data.expect`, plus the sha256 of `model.qwen`'s tokenizer files unless `expect` names `tokenizer_hash`:
    shards tokenised by another tokenizer are refused at start (the hash is over the files' bytes, as the build's)."""
    expected = dict(data.get("expect") or {})
    qwen = model.get("qwen")
    if qwen and "tokenizer_hash" not in expected:
        if any((Path(qwen) / name).is_file() for name in TOKENIZER_FILES):
            expected["tokenizer_hash"] = files_hash(qwen, TOKENIZER_FILES)
        else:
            logger.warning("model.qwen %s has no tokenizer files (%s): the build's tokenizer is not checked", qwen,
                           ", ".join(TOKENIZER_FILES))
    return expected or None


def build_dataset(section: dict[str, Any], training: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(dataset, derived values). The shard stream splits by rank (from $RANK/$WORLD_SIZE, set by torchrun and
    deepspeed) and worker itself; every worker yields a multiple of batch × grad_accum samples, so every rank
    has the same number of batches per epoch and each epoch ends on an optimizer step."""
    batch = int(training.get("per_device_train_batch_size", TRAINING_DEFAULTS["per_device_train_batch_size"]))
    accum = int(training.get("gradient_accumulation_steps", 1))
    workers = int(training.get("dataloader_num_workers", 0))
    if section.get("online"):
        from train.online import OnlineDataset
        dataset = OnlineDataset(**section["online"])
        return dataset, {"data": "online", "num_examples": len(dataset)}
    source = section.get("manifest") or section.get("shards")
    if not source:
        raise SchemaError("config data", "manifest/shards/online", "one data source", section)
    from train.stream import ShardStream, StreamConfig
    seed = training.get("data_seed")
    seed = training.get("seed", TRAINING_DEFAULTS["seed"]) if seed is None else seed
    stream = {"seed": seed, **(section.get("stream") or {}), "batch_size": batch * accum, "num_workers": workers}
    stream_config = _construct(StreamConfig, stream, "config data.stream")
    dataset = ShardStream(source, stream_config, expected=section.get("expect"))
    batches = dataset.num_batches(batch, workers)
    info = {"data": "shards", "num_examples": dataset.num_samples, "samples_per_rank_per_epoch": len(dataset),
            "samples_per_epoch": len(dataset) * dataset.world_size, "batches_per_rank_per_epoch": batches,
            "steps_per_epoch": batches // accum,
            "dropped_per_epoch": dataset.num_samples - len(dataset) * dataset.world_size}
    return dataset, info


def training_arguments(training: dict[str, Any], deepspeed: str | None, info: dict[str, Any]) -> TrainingArguments:
    """TrainingArguments from the `training` section as given, plus what the data path requires."""
    kwargs = dict(training)
    kwargs.pop("resume_from_checkpoint", None)
    accelerator = dict(kwargs.pop("accelerator_config", None) or {})
    for key, value in REQUIRED_ACCELERATOR.items():
        if accelerator.setdefault(key, value) != value:
            raise SchemaError("config training", f"accelerator_config.{key}", str(value), accelerator[key])
    required = {"remove_unused_columns": False, "dataloader_in_order": True}
    if info["data"] == "shards":
        required["ignore_data_skip"] = True  # the loader state resumes the stream; no replay
        steps = info["steps_per_epoch"]
        if steps < 1:
            raise SchemaError("config data", "samples", "at least one optimizer step per epoch", info)
        epochs = float(kwargs.get("num_train_epochs", TRAINING_DEFAULTS["num_train_epochs"]))
        if int(kwargs.get("max_steps", -1)) <= 0:
            kwargs["max_steps"] = math.ceil(epochs * steps)
        info["num_epochs"] = kwargs["max_steps"] / steps
    for key, value in required.items():
        if kwargs.setdefault(key, value) != value:
            raise SchemaError("config training", key, str(value), kwargs[key])
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)  # else Accelerate counts 1 process on CPU (dev-machine-facts §6)
    if deepspeed:
        kwargs["deepspeed"] = deepspeed
    return _construct(TrainingArguments, {"accelerator_config": accelerator, **kwargs}, "config training")


def _construct(cls: type, values: dict[str, Any], where: str) -> Any:
    """`cls(**values)`, with a key the dataclass does not have reported as a SchemaError naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SchemaError(where, ", ".join(unknown), f"fields of {cls.__name__}", "unknown keys")
    return cls(**values)


def run(config: dict[str, Any], model: nn.Module | None = None) -> JanusTrainer:
    """Build everything and train; returns the trainer (tests and benchmarks read it). The model is built before
    TrainingArguments, so DeepSpeed partitions it at initialize (no zero.Init; dev-machine-facts §6)."""
    training = dict(config.get("training") or {})
    set_seed(int(training.get("seed", TRAINING_DEFAULTS["seed"])))
    model_section = dict(config.get("model") or {})
    model = model if model is not None else build_model(model_section)
    data = dict(config.get("data") or {})
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise SchemaError("config data", ", ".join(unknown), f"keys among {DATA_KEYS}", "unknown keys")
    if data.get("shards") and not data.get("manifest"):
        logger.warning("data.shards without a manifest: the build's tokenizer, image mode and VGGT feature tags "
                       "cannot be checked against this config (give data.manifest to check them)")
    if data.get("manifest"):
        data["manifest"] = manifest_url(str(data["manifest"]))
        check_precomputed_features(data["manifest"], model_section)
        data["expect"] = expected_build(data, model_section)
    dataset, info = build_dataset(data, training)
    args = training_arguments(training, config.get("deepspeed"), info)
    if args.n_gpu > 1:
        raise SchemaError("launch", "processes", "one process per GPU (torchrun or deepspeed)", f"{args.n_gpu} GPUs "
                          "in one process (Trainer would wrap the model in DataParallel)")
    if info["data"] == "shards" and (dataset.rank, dataset.world_size) != (args.process_index, args.world_size):
        raise SchemaError("ShardStream", "rank/world_size", f"{args.process_index}/{args.world_size} (trainer)",
                          f"{dataset.rank}/{dataset.world_size} (from $RANK/$WORLD_SIZE)")
    logger.info("derived: %s; max_steps %d", info, args.max_steps)
    if args.should_save:  # the run as resolved: config after overrides + derived values
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        resolved = {"config": config, "derived": {**info, "max_steps": args.max_steps}}
        Path(args.output_dir, "launch_config.json").write_text(json.dumps(resolved, indent=1, default=str) + "\n")
    trainer = JanusTrainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(),
                           loss_config=_construct(LossConfig, config.get("loss") or {}, "config loss"))
    if hasattr(dataset, "state_dict"):
        trainer.add_callback(LoaderStateCallback(dataset))
    trainer.add_callback(StepLogCallback(trainer, setup=info))
    resume = training.get("resume_from_checkpoint")
    trainer.train(resume_from_checkpoint=True if resume in (True, "last") else resume)
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML or TOML file with the sections " + ", ".join(SECTIONS))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (YAML syntax), e.g. --set training.max_steps=10")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # DeepSpeed 0.19 calls these deprecated torch.distributed names on every ZeRO-3 collective: thousands of lines
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a rank killed by SIGABRT/SIGSEGV prints its Python stack, not just the signal
    finished = False
    try:
        run(load_config(args.config, args.set))
        finished = True
    except SchemaError as e:
        logger.error("%s", e)
        return 2
    finally:
        shutdown_distributed(finished)
    return 0


def shutdown_distributed(finished: bool) -> None:
    """Destroy the process groups. After a finished run, every rank first meets at a barrier, so no rank tears
    its gloo/NCCL connections down while a peer still has collectives in flight (ZeRO-3 prefetches parameters
    asynchronously). A rank that failed skips the barrier: its peers may never reach it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
