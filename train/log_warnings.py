"""Warning catalogue for `train.diagnose`: known training-log warnings (HF, torch, DeepSpeed, NCCL) with
what each means for speed or correctness and a priority, and a normaliser that groups unknown
warnings by signature (paths, numbers and rank prefixes removed) so 8 ranks' copies count as one.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """One catalogue entry; `priority` is P1 (act now) … P3 (low), or "info" (no effect)."""
    key: str
    pattern: re.Pattern
    title: str
    impact: str
    priority: str


def _known(key: str, pattern: str, title: str, impact: str, priority: str) -> KnownWarning:
    return KnownWarning(key, re.compile(pattern), title, impact, priority)


CATALOGUE: tuple[KnownWarning, ...] = (
    _known("oom", r"CUDA out of memory|OutOfMemoryError", "CUDA out of memory",
           "the step (or the run) failed; lower per-device batch / sequence length or free memory", "P1"),
    _known("nccl_timeout", r"Watchdog caught collective operation timeout|ProcessGroupNCCL.*[Tt]ime(d )?out"
           r"|NCCL (?:error|WARN)", "NCCL collective timeout or error",
           "ranks hung or desynchronised (one rank slow, crashed or stuck in data loading); run stops", "P1"),
    _known("traceback", r"^Traceback \(most recent call last\)", "Python traceback",
           "an exception was raised; if it is the main process the run stopped", "P1"),
    _known("checkpoint_no_grad", r"None of the inputs have requires_grad=True",
           "torch.utils.checkpoint: none of the inputs require grad",
           "the checkpointed block's parameters get no gradient: expected for frozen blocks (frozen "
           "vision tower under gradient checkpointing, recompute wasted), a silent correctness bug if "
           "the block is trainable; check that every trainable parameter has a .grad after one "
           "backward and that frozen towers run outside checkpointing", "P2"),
    _known("dataset_retry", r"\[Try #\d+\]", "dataset __getitem__ retried a sample",
           "bad samples are silently skipped or replaced and data loading stalls; reject at build time",
           "P2"),
    _known("fp16_overflow", r"OVERFLOW!|[Gg]radient overflow", "fp16 loss-scale overflow",
           "skipped optimizer steps; use bf16 or check the loss scale", "P2"),
    _known("slow_image_processor", r"Using a slow image processor",
           "slow (PIL/numpy) Qwen image processor",
           "CPU preprocessing per image in the data loader is several times slower than the fast "
           "(torch) processor; matters only when the loader cannot keep up (data_wait_s); switching "
           "changes pixels slightly", "P3"),
    _known("flash_attn_not_on_gpu", r"Flash Attention 2\.0 with a model not initialized on GPU",
           "Flash Attention 2 requested on a CPU-initialised model",
           "harmless when the model is moved to GPU before the first forward (DeepSpeed does); check "
           "the attention implementation after wrapping, a fallback to eager/sdpa costs speed and memory",
           "P3"),
    _known("ga_mismatch", r"Gradient accumulation steps mismatch",
           "gradient accumulation differs between accelerate plugin and DeepSpeed config",
           "DeepSpeed's value is used; benign if it is the intended one, but keep both equal so that "
           "steps, epochs and loss scaling agree", "P3"),
    _known("newly_initialized", r"Some weights of .* were not initialized from the model checkpoint",
           "weights newly initialised when loading the base checkpoint",
           "expected for modules the base model lacks (VGGT merger, action head, VGGT when loaded "
           "afterwards); check that no base-model weight is in the list and that VGGT is loaded later",
           "P3"),
    _known("train_this_model", r"You should probably TRAIN this model", "'You should probably TRAIN this model'",
           "second line of the newly-initialised-weights message; no separate effect", "info"),
    _known("eval_strategy_deprecated", r"`evaluation_strategy` is deprecated",
           "`evaluation_strategy` deprecated (use `eval_strategy`)",
           "no effect on speed or results; the launch script breaks on a transformers upgrade", "info"),
    _known("tokenizer_deprecated", r"`tokenizer` is deprecated .*processing_class",
           "Trainer(tokenizer=...) deprecated (use processing_class)",
           "no effect on speed or results; breaks in transformers 5", "info"),
    _known("autocast_deprecated", r"torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated",
           "torch.cuda.amp.autocast deprecated (use torch.amp.autocast('cuda'))",
           "no effect on speed or results", "info"),
    _known("use_cache_gc", r"`use_cache=True` is incompatible with gradient checkpointing",
           "use_cache disabled under gradient checkpointing", "no effect on training", "info"),
    _known("tokenizers_fork", r"huggingface/tokenizers: The current process just got forked",
           "tokenizers parallelism disabled after fork",
           "tokenisation in workers runs single-threaded; set TOKENIZERS_PARALLELISM=false to silence",
           "info"),
)
_BY_KEY = {entry.key: entry for entry in CATALOGUE}

_GENERIC = re.compile(r"\w*(?:Warning|Error):|\[(?:WARNING|ERROR)\]|\bWARNING\b|\[W\d{3,4} |"
                      r"\bdeprecated\b|\btimed out\b")
_PATH = re.compile(r"(?:/[^\s/:]+)+/([^\s/:]+\.py)")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_TIMESTAMP = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\]?\s*")


def classify_warning(body: str) -> str | None:
    """Catalogue key, `other: <normalised signature>` for an unknown warning line, or None."""
    for entry in CATALOGUE:
        if entry.pattern.search(body):
            return entry.key
    if not _GENERIC.search(body):
        return None
    return "other: " + normalise_signature(body)


def normalise_signature(body: str) -> str:
    """Drop timestamps and directories, replace numbers by N, collapse spaces, cut to 160 characters."""
    text = _TIMESTAMP.sub("", body.strip())
    text = _PATH.sub(r"\1", text)
    text = _NUMBER.sub("N", text)
    return re.sub(r"\s+", " ", text)[:160]


def describe_warning(key: str) -> KnownWarning | None:
    """The catalogue entry for a key from `classify_warning`, None for unknown ones."""
    return _BY_KEY.get(key)


def summarise_warnings(counts: Counter, examples: dict[str, str]) -> list[dict]:
    """Warning groups, most frequent first, with the catalogue's title, impact and priority."""
    groups = []
    for key, count in counts.most_common():
        known = describe_warning(key)
        groups.append({"key": key, "count": count, "example": examples[key],
                       "title": known.title if known else key.removeprefix("other: "),
                       "impact": known.impact if known else "unknown warning: read the example",
                       "priority": known.priority if known else "P3"})
    return groups
