"""`JanusTrainer`: transformers' Trainer for JanusVLN on the shard stream (or the online dataset). It owns the
train DataLoader (never re-sharded by Accelerate), the step-level loss normalisation (train.loss.StepNorm over
the step's micro-batches and ranks), on-device pixel decoding, per-step statistics for the logs, one ZeRO
checkpoint write per save, and loader-state restore on resume. Callbacks (train.callbacks) do the rest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from schemas.errors import SchemaError
from train.callbacks import load_loader_state
from train.collate import BOOKKEEPING_KEYS
from train.loss import NUM_STATS, LossConfig, StepNorm, compute_loss, step_denominators
from train.pixels import PixelDecoder

logger = logging.getLogger(__name__)

JANUS_CONFIG_NAME = "janus_config.json"


class StreamLoader(DataLoader):
    """A plain DataLoader over a rank-aware IterableDataset; `set_epoch` reaches the dataset (Trainer calls it)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


@dataclasses.dataclass
class StepRecord:
    """What one optimizer step saw on this rank; reduced over ranks by `JanusTrainer.finish_step`."""

    stats: Tensor
    samples: int = 0
    data_wait_s: float = 0.0
    action_weight: float = 0.0


class JanusTrainer(Trainer):
    """Trainer(model=JanusVLN, args, train_dataset=ShardStream | OnlineDataset, data_collator=Collator(), loss_config).

    Each micro-batch's loss is its exact share of the step loss (StepNorm from all micro-batches of the step on
    all ranks), times the world size because DeepSpeed/DDP average gradients over ranks; so it is not divided by
    gradient accumulation (`loss_is_scaled_for_ga`)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, loss_config: LossConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or LossConfig()
        self.pixel_decoder = PixelDecoder()
        self.step_norm: StepNorm | None = None
        self.last_grad_norm: float | None = None
        self.step_record = self._new_record()

    # ------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """A rank-aware IterableDataset gets a plain loader: Accelerate's prepare would wrap it in its
        IterableDatasetShard and cut this rank's stream a second time (hf-trainer-facts §1). Map-style
        datasets (the online path) keep Trainer's distributed sampler."""
        dataset = self.train_dataset
        if not isinstance(dataset, IterableDataset):
            return super().get_train_dataloader()
        args = self.args
        workers = args.dataloader_num_workers
        return StreamLoader(
            dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator, num_workers=workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers > 0 else None)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int,
                          device: torch.device) -> tuple[list, None]:
        """Fetch the step's micro-batches (timed: data wait), record them as consumed by the stream, and set
        the step's StepNorm: this rank's denominators summed over ranks (one small all-reduce)."""
        batches, start = [], time.perf_counter()
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self.step_record.data_wait_s += time.perf_counter() - start
        if not batches:  # every rank runs out together: equal batch counts per rank by construction
            return batches, None
        observe = getattr(self.train_dataset, "observe", None)
        for batch in batches:
            if observe is not None:
                observe(batch)
            self.step_record.samples += int(batch["input_ids"].shape[0])
        totals = step_denominators(batches, self.loss_config)
        if self._distributed():
            totals = totals.to(device)
            dist.all_reduce(totals)
        text_weight, num_actions = totals.tolist()
        self.step_norm = StepNorm(text_weight=text_weight, num_actions=num_actions)
        return batches, None

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Drop bookkeeping keys, move tensors to the device as they are (no float cast: the collated batch is
        ints/uint8/bool, and precomputed VGGT features keep their stored dtype), then decode pixels on the
        device (float32; the model casts to its own dtype)."""
        device = self.args.device

        def to_device(value: Any) -> Any:  # tensors, and lists of tensors (per-sample VGGT features in crop mode)
            if isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
                return [v.to(device, non_blocking=True) for v in value]
            return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value

        batch = {key: to_device(value) for key, value in inputs.items() if key not in BOOKKEEPING_KEYS}
        decoded = self.pixel_decoder(batch)
        if "vggt_features" in decoded:
            decoded.pop("images_vggt", None)
        return decoded

    # ------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        out = model(**inputs)
        parts = compute_loss(out, inputs, self.loss_config, self.state.global_step, self.step_norm)
        self.step_record.stats += parts.stats.to(self.step_record.stats.device)
        self.step_record.action_weight = parts.action_weight
        loss = parts.loss * (self.args.world_size if self._distributed() and self.step_norm is not None else 1)
        return (loss, out) if return_outputs else loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """Trainer's value, kept for the per-step log record."""
        value = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.last_grad_norm = float(value) if value is not None else None
        return value

    def finish_step(self) -> dict[str, Any]:
        """Collective (every rank): the step's stats, samples and data wait over all ranks, then reset."""
        record, self.step_record = self.step_record, self._new_record()
        summed = torch.cat([record.stats, torch.tensor([float(record.samples)], dtype=torch.float64,
                                                       device=record.stats.device)])
        wait = torch.tensor([record.data_wait_s], dtype=torch.float64, device=summed.device)
        if self._distributed():
            dist.all_reduce(summed)
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        return {"stats": summed[:NUM_STATS].cpu(), "samples": int(summed[NUM_STATS].item()),
                "data_wait_s": float(wait.item()), "action_weight": record.action_weight,
                "grad_norm": self.last_grad_norm}

    def _new_record(self) -> StepRecord:
        return StepRecord(stats=torch.zeros(NUM_STATS, dtype=torch.float64, device=self.args.device))

    def _distributed(self) -> bool:
        return self.args.world_size > 1 and dist.is_available() and dist.is_initialized()

    # ------------------------------------------------------------ save / resume
    def _zero3_sharded_saves(self) -> bool:
        """ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`: checkpoints hold only ZeRO shards."""
        if not self.is_deepspeed_enabled:
            return False
        ds_config = self.accelerator.state.deepspeed_plugin.hf_ds_config
        return ds_config.is_zero3() and not ds_config.get_value(
            "zero_optimization.stage3_gather_16bit_weights_on_model_save", False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Inside a checkpoint under sharded ZeRO-3, Trainer would write the ZeRO checkpoint twice (once here,
        once with the optimizer): here only the configs (train.consolidate reads them); otherwise as Trainer."""
        output_dir = output_dir or self.args.output_dir
        if not (_internal_call and self._zero3_sharded_saves() and not self.args.save_only_model):
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            model.config.to_json_file(os.path.join(output_dir, "config.json"))
            saved = {"janus": dataclasses.asdict(model.janus_config),
                     "vggt_config": dataclasses.asdict(model.vggt.config) if model.vggt is not None else None}
            Path(output_dir, JANUS_CONFIG_NAME).write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """As Trainer.train; on resume the stream continues exactly after the checkpoint's last consumed batch
        (its saved per-rank state) instead of Trainer replaying batches (`ignore_data_skip` must be on)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise SchemaError(self.args.output_dir, "resume_from_checkpoint", "a checkpoint-N folder", "none")
        if resume_from_checkpoint and not Path(resume_from_checkpoint).is_dir():
            raise SchemaError("training", "resume_from_checkpoint", "an existing checkpoint-N folder",
                              f"{resume_from_checkpoint} (no such folder)")
        if resume_from_checkpoint and hasattr(self.train_dataset, "load_state_dict"):
            if not self.args.ignore_data_skip:
                raise SchemaError("TrainingArguments", "ignore_data_skip", "True with a resumable stream (the "
                                  "loader state resumes it; Trainer's replay would skip batches twice)", False)
            load_loader_state(self.train_dataset, resume_from_checkpoint, self.args.process_index)
        return super().train(resume_from_checkpoint, *args, **kwargs)
