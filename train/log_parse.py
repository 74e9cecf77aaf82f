"""Parse training logs into plain records for `train.diagnose`: HF Trainer / tqdm / DeepSpeed output
of any number of interleaved ranks (records split on both \\r and \\n, rank prefixes stripped) and our
trainer's `[vln-train] {json}` lines (format documented in `train.diagnose`). Parsing never fails on
odd input: what is not recognised is skipped and counted. The warning catalogue is in `log_warnings`.
"""
from __future__ import annotations

import ast
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from train.log_warnings import classify_warning

logger = logging.getLogger(__name__)

VLN_PREFIX = "[vln-train] "

_RANK = re.compile(r"^\s*\[(?:rank|default)(\d+)\]:\s?|^\s*rank(\d+):\s")
_TIME = r"\d+(?::\d\d){1,2}"
_BAR = re.compile(
    r"(?:(?P<desc>[^|\[\]{}]*?)\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*)?(?P<n>\d+)/(?P<total>\d+)\s*"
    rf"\[(?P<elapsed>{_TIME})(?:<(?P<remaining>\?|{_TIME}))?"
    r"(?:,\s*(?P<rate>\?|[\d.]+)\s*(?P<unit>s/it|it/s))?")
_DICT = re.compile(r"\{'[A-Za-z_]\w*': .*\}")
_NONFINITE = re.compile(r"(?<=: )-?(?:nan|inf)\b")
_TRAIN_DESC = re.compile(r"train|epoch|step", re.IGNORECASE)
_TRUNCATED = re.compile(r"\.\.\.\[line truncated")
_SETUP = {
    "num_examples": r"Num examples = ([\d,]+)",
    "num_epochs": r"Num Epochs = ([\d,]+)",
    "per_device_batch": r"Instantaneous batch size per device = ([\d,]+)",
    "total_batch": r"Total train batch size \(w\. parallel, distributed & accumulation\) = ([\d,]+)",
    "grad_accum": r"Gradient Accumulation steps = ([\d,]+)",
    "total_steps": r"Total optimization steps = ([\d,]+)",
    "num_trainable_params": r"Number of trainable parameters = ([\d,]+)",
}
# DeepSpeed prints its resolved config as "name ....... value"; used only where HF lines are missing.
_SETUP_FALLBACK = {
    "per_device_batch": r"train_micro_batch_size_per_gpu\W+?(\d+)\b",
    "total_batch": r"\btrain_batch_size\W+?(\d+)\b",
    "grad_accum": r"DeepSpeed config has (\d+)|\bgradient_accumulation_steps\W+?(\d+)\b",
    "world_size": r"\b(?:dist_)?world[_ ]size\W+?(\d+)\b",
}
_WORLD_DICT = re.compile(r"WORLD INFO DICT: \{(.*)\}")
_SAVE = re.compile(r"Saving model checkpoint to \S*?checkpoint-(\d+)|"
                   r"[Ss]aving (?:model )?checkpoint\S* \S*?global_step(\d+)|Checkpoint global_step(\d+) is ready")


@dataclass(frozen=True)
class ProgressUpdate:
    """One tqdm refresh: `n/total [elapsed<remaining, rate]`."""
    record: int
    step: int
    total: int
    elapsed_s: int
    remaining_s: int | None
    desc: str
    rank: int | None


@dataclass
class ParsedLog:
    """Everything `diagnose` needs, in log order; `record` fields index the \\r/\\n-split records."""
    path: str
    num_records: int = 0
    num_truncated: int = 0
    setup: dict[str, int] = field(default_factory=dict)
    setup_source: dict[str, str] = field(default_factory=dict)
    ranks: set[int] = field(default_factory=set)
    world_info_ranks: int | None = None
    progress: list[ProgressUpdate] = field(default_factory=list)
    hf_dicts: list[tuple[int, dict]] = field(default_factory=list)
    vln_records: list[dict] = field(default_factory=list)
    saves: list[tuple[int, int]] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)
    warning_examples: dict[str, str] = field(default_factory=dict)
    num_unparsed: int = 0


def split_records(text: str) -> list[str]:
    """Split on both \\r and \\n: tqdm refreshes with \\r, so one \\n line may hold hundreds of updates."""
    return re.split(r"\r\n|\r|\n", text)


def parse_elapsed(text: str) -> int:
    """tqdm interval `MM:SS` or `H:MM:SS` (hours may exceed 24) to seconds."""
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def format_vln_record(fields: dict) -> str:
    """The one line our trainer writes per record (see `train.diagnose` for the keys)."""
    return VLN_PREFIX + json.dumps(fields, separators=(", ", ": "), allow_nan=True)


def parse_log_file(path: str | Path) -> ParsedLog:
    """Read `path` (any encoding errors replaced) and parse it."""
    raw = Path(path).read_bytes()
    return parse_log_text(raw.decode("utf-8", errors="replace"), str(path))


def parse_log_text(text: str, path: str = "<text>") -> ParsedLog:
    """Parse one log's text; records are classified independently, so interleaved ranks are fine."""
    log = ParsedLog(path=path)
    records = split_records(text)
    log.num_records = len(records) if text else 0
    previous_was_warning = False
    for index, record in enumerate(records):
        rank, body = _strip_rank(record)
        if rank is not None:
            log.ranks.add(rank)
        if _TRUNCATED.search(body):
            log.num_truncated += 1
        if VLN_PREFIX in body:
            _parse_vln(log, body)
            previous_was_warning = False
            continue
        _parse_bars(log, index, body, rank)
        _parse_setup(log, body)
        _parse_dicts(log, index, body)
        _parse_save(log, index, body)
        # Python's warnings module echoes the offending source line, indented, right after the warning.
        if previous_was_warning and body.startswith("  ") and not _BAR.search(body):
            previous_was_warning = False
            continue
        previous_was_warning = _parse_warning(log, body)
    return log


def _strip_rank(record: str) -> tuple[int | None, str]:
    match = _RANK.match(record)
    if not match:
        return None, record
    return int(match.group(1) or match.group(2)), record[match.end():]


def _parse_bars(log: ParsedLog, index: int, body: str, rank: int | None) -> None:
    for match in _BAR.finditer(body):
        remaining = match.group("remaining")
        log.progress.append(ProgressUpdate(
            record=index, step=int(match.group("n")), total=int(match.group("total")),
            elapsed_s=parse_elapsed(match.group("elapsed")),
            remaining_s=parse_elapsed(remaining) if remaining and remaining != "?" else None,
            desc=(match.group("desc") or "").strip(), rank=rank))


def _parse_setup(log: ParsedLog, body: str) -> None:
    for key, pattern in _SETUP.items():
        match = re.search(pattern, body)
        if match:
            log.setup[key] = int(match.group(1).replace(",", ""))
            log.setup_source[key] = "HF Trainer start-up lines"
    for key, pattern in _SETUP_FALLBACK.items():
        match = re.search(pattern, body)
        if match and key not in log.setup:
            log.setup[key] = int(next(g for g in match.groups() if g))
            log.setup_source[key] = f"line {body.strip()[:80]!r}"
    world = _WORLD_DICT.search(body)
    if world:
        log.world_info_ranks = len(re.findall(r"\b\d+\b(?=[,\]])", world.group(1)))


def _parse_dicts(log: ParsedLog, index: int, body: str) -> None:
    match = _DICT.search(body)
    if not match:
        return
    try:
        value = ast.literal_eval(_NONFINITE.sub("None", match.group(0)))
    except (ValueError, SyntaxError):
        log.num_unparsed += 1
        logger.debug("unparsed dict in record %d: %.120s", index, match.group(0))
        return
    if isinstance(value, dict):
        log.hf_dicts.append((index, value))


def _parse_vln(log: ParsedLog, body: str) -> None:
    payload = body[body.index(VLN_PREFIX) + len(VLN_PREFIX):].strip()
    try:
        value = json.loads(payload)
    except json.JSONDecodeError:
        log.num_unparsed += 1
        logger.debug("unparsed [vln-train] record: %.120s", payload)
        return
    if isinstance(value, dict):
        log.vln_records.append(value)


def _parse_save(log: ParsedLog, index: int, body: str) -> None:
    match = _SAVE.search(body)
    if match:
        step = int(next(g for g in match.groups() if g))
        if all(step != saved for saved, _ in log.saves):
            log.saves.append((step, index))


def _parse_warning(log: ParsedLog, body: str) -> bool:
    signature = classify_warning(body)
    if signature is None:
        return False
    log.warnings[signature] += 1
    log.warning_examples.setdefault(signature, body.strip()[:240])
    return True


def training_bar(log: ParsedLog) -> list[ProgressUpdate]:
    """The training progress bar's updates: the bar with total == total optimisation steps when known,
    else the undescribed (or train/epoch/step-described) bar with most distinct steps; lowest rank wins
    when several ranks draw one. Other bars ("Loading checkpoint shards", "Map") are never chosen."""
    total_steps = log.setup.get("total_steps")
    groups: dict[tuple, list[ProgressUpdate]] = {}
    for update in log.progress:
        if update.desc == "" or update.total == total_steps or _TRAIN_DESC.search(update.desc):
            groups.setdefault((update.desc, update.total, update.rank), []).append(update)
    if not groups:
        return []

    def score(key: tuple) -> tuple:
        desc, total, rank = key
        distinct = len({u.step for u in groups[key]})
        return (total == total_steps, desc == "", -(rank or 0), distinct, total)
    return groups[max(groups, key=score)]
