"""Trainer callbacks: per-rank loader state next to each checkpoint (exact resume), and our `[vln-train]` log
records (setup once, one per optimizer step, one per save; format in train.diagnose) with step time,
samples/s, data wait, per-segment losses averaged over the whole step across ranks, grad norm, lr, GPU memory.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from schemas.errors import SchemaError
from train.log_parse import format_vln_record
from train.loss import SEGMENT_NAMES, summarize

if TYPE_CHECKING:
    from train.trainer import JanusTrainer

logger = logging.getLogger(__name__)


def loader_state_path(checkpoint_dir: str | Path, rank: int) -> Path:
    return Path(checkpoint_dir) / f"loader_state_rank{rank}.json"


def save_loader_state(dataset: Any, checkpoint_dir: str | Path, rank: int) -> Path:
    """Write this rank's stream position (atomic rename) and return the path."""
    path = loader_state_path(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataset.state_dict(), sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_loader_state(dataset: Any, checkpoint_dir: str | Path, rank: int) -> None:
    """Restore this rank's stream position saved with the checkpoint; a missing file is an error, never a restart."""
    path = loader_state_path(checkpoint_dir, rank)
    if not path.is_file():
        raise SchemaError(str(checkpoint_dir), path.name, "the loader state saved with this checkpoint (same world "
                          "size)", "no such file")
    dataset.load_state_dict(json.loads(path.read_text()))
    logger.info("resumed loader state of rank %d from %s", rank, path)


class LoaderStateCallback(TrainerCallback):
    """on_save: `checkpoint-N/loader_state_rank{r}.json` on every rank (restored by JanusTrainer.train)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_loader_state(self.dataset, folder, args.process_index)


class StepLogCallback(TrainerCallback):
    """One `[vln-train]` record per optimizer step (rank 0 writes; every rank joins the reductions)."""

    def __init__(self, trainer: JanusTrainer, setup: dict[str, Any] | None = None):
        self.trainer = trainer
        self.setup = dict(setup or {})
        self.last_time = time.perf_counter()
        self.step_end_time = self.last_time
        self.lr: float | None = None
        self.records: list[dict[str, Any]] = []  # every record of this run, on every rank (values are reduced)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.trainer.model.parameters() if p.requires_grad)
        record = {"event": "setup", "world_size": args.world_size,
                  "per_device_batch": args.per_device_train_batch_size,
                  "grad_accum": args.gradient_accumulation_steps,
                  "total_batch": args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
                  "total_steps": state.max_steps, "max_grad_norm": args.max_grad_norm,
                  "num_trainable_params": trainable,
                  "resumed_at_step": state.global_step, **self.setup}
        self._emit(record, state)
        self.last_time = time.perf_counter()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        scheduler = self.trainer.lr_scheduler
        self.lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        reduced = self.trainer.finish_step()
        now = time.perf_counter()
        step_time, self.last_time = now - self.last_time, now
        logs = summarize(reduced["stats"], reduced["action_weight"])
        record = {"event": "step", "step": state.global_step, "step_time_s": step_time,
                  "samples_per_s": reduced["samples"] / step_time if step_time > 0 else None,
                  "samples": reduced["samples"], "data_wait_s": reduced["data_wait_s"], "loss": logs["loss"],
                  **{f"loss_seg_{name}": logs[f"loss_{name}"] for name in SEGMENT_NAMES},
                  "loss_text": logs["loss_text_total"], "loss_action_head": logs["loss_action_head"],
                  "action_weight": logs["action_weight"], "grad_norm": reduced["grad_norm"], "lr": self.lr}
        if torch.cuda.is_available():
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self._emit(record, state)
        self.step_end_time = time.perf_counter()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._emit({"event": "save", "step": state.global_step, "save_s": time.perf_counter() - self.step_end_time},
                   state)

    def _emit(self, record: dict[str, Any], state: TrainerState) -> None:
        self.records.append(record)
        if state.is_world_process_zero:
            logger.info(format_vln_record(record))
