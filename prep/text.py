"""Text side of a sample (SPEC §2, facts §2/§4): prompt and chat rendering, tokenisation, labels,
`segment_ids`, `loss_weights` from segments, and Qwen2.5-VL mRoPE `position_ids` for images.

One batched tokenizer call per sample on the three messages with one `<|image_pad|>` per image, then the
pads are expanded with numpy: same ids as tokenising the 4.8k-pad strings, 0.9 ms instead of 21 ms.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from schemas import EncodedText, SampleRecord, SchemaError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_PAD_ID = 151655  # Qwen2.5-VL; checked against the tokenizer in TextEncoder
SYSTEM_MESSAGE = "You are a helpful assistant."
NUM_ASSISTANT_HEADER_TOKENS = 3  # <|im_start|> assistant \n: not labelled
NUM_TAIL_TOKENS = 2  # <|im_end|> \n: labelled, segment 4, but weight 1.0 in the original
MARKERS = ("SUBINSTRUCTION:", "2D_DESCRIPTION:", "3D_DESCRIPTION:", "ACTION:")
MARKER_PREFIXES = ("", "\n", " ", "\n\n")  # tried for each marker; the earliest match wins
PREFIX_TOKEN_IDS = (198, 220, 271)  # "\n", " ", "\n\n" in the Qwen2 vocabulary; checked in TextEncoder
_FORBIDDEN = (IMAGE_TAG, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>")
_INTRO = (
    "You are a visual language navigation model, and your should go to the locations to complete the given "
    "task. Compare the observation and instruction to infer your current progress, and then select the "
    "correct direction from the candidates to go to the target location and finish the task."
)
_TASK = (
    "First, predict the subinstruction for the current view. Then describe the view in 2D and 3D. "
    "Finally, choose one of the following actions:"
)


def _raw_fields(record: SampleRecord) -> dict[str, str]:
    return {"instruction": record.instruction, "subinstruction": record.subinstruction,
            "description_2d": record.description_2d, "description_3d": record.description_3d, "action": record.action}


def special_token_problem(record: SampleRecord) -> str | None:
    """Why the record's text cannot be rendered (a field holding `<image>` or a chat/vision special token, which
    would shift the image slots or the turn structure), or None. The build rejects such samples."""
    for name, value in _raw_fields(record).items():
        found = [token for token in _FORBIDDEN if isinstance(value, str) and token in value]
        if found:
            return f"{name} contains {found[0]!r}"
    return None


def _fields(record: SampleRecord) -> dict[str, str]:
    """The record's text fields, stripped as the original does, refusing text that would alter the token layout."""
    fields = _raw_fields(record)
    for name, value in fields.items():
        if not isinstance(value, str):
            raise SchemaError(record.sample_id, name, "a string", value)
    problem = special_token_problem(record)
    if problem:
        raise SchemaError(record.sample_id, "text", "text without <image> or chat/vision special tokens", problem)
    return {name: value.strip() for name, value in fields.items()}


def render_user_text(record: SampleRecord, num_images: int) -> str:
    """The 14-line user prompt with `num_images` `<image>` tags (history tags, then the current one)."""
    if num_images < 1:
        raise SchemaError(record.sample_id, "frame_ids", "at least one image", num_images)
    f = _fields(record)
    lines = [
        _INTRO,
        "This is your historical observation:" + IMAGE_TAG * (num_images - 1),
        "This is your current observation:" + IMAGE_TAG,
        f"Your task is to {f['instruction']}",
        _TASK, "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT", "STOP.",
        "Respond in the following format:",
        "SUBINSTRUCTION: ...", "2D_DESCRIPTION: ...", "3D_DESCRIPTION: ...", "ACTION: ...",
    ]
    return "\n".join(lines)


def target_segments(record: SampleRecord) -> tuple[str, str, str, str]:
    """The four assistant target lines (SUBINSTRUCTION / 2D / 3D / ACTION), without newlines."""
    f = _fields(record)
    return (
        f"SUBINSTRUCTION: {f['subinstruction']}", f"2D_DESCRIPTION: {f['description_2d']}",
        f"3D_DESCRIPTION: {f['description_3d']}", f"ACTION: {f['action']}",
    )


def render_target_text(record: SampleRecord) -> str:
    return "\n".join(target_segments(record))


def render_message(role: str, content: str) -> str:
    """The original's minimal chat template for one message."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def expand_image_placeholders(text: str, image_token_counts: Sequence[int]) -> str:
    """Replace the k-th `<image>` by `<|vision_start|>` + `<|image_pad|>`×T_k + `<|vision_end|>`."""
    pieces = text.split(IMAGE_TAG)
    if len(pieces) - 1 != len(image_token_counts):
        raise SchemaError("prompt", IMAGE_TAG, f"{len(image_token_counts)} tags", len(pieces) - 1)
    out = [pieces[0]]
    for count, piece in zip(image_token_counts, pieces[1:]):
        out += [VISION_START, IMAGE_PAD * int(count), VISION_END, piece]
    return "".join(out)


def render_conversation(record: SampleRecord, image_token_counts: Sequence[int]) -> list[str]:
    """The three rendered messages (system, user with expanded images, assistant), as the original tokenises them."""
    user = expand_image_placeholders(render_user_text(record, len(image_token_counts)), image_token_counts)
    return [
        render_message("system", SYSTEM_MESSAGE), render_message("user", user),
        render_message("assistant", render_target_text(record)),
    ]


def num_image_tokens(image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge_size: int = 2) -> list[int]:
    """LLM tokens per image: prod(grid_thw) // merge_size² (529 for a 644×644 frame)."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return [int(n) for n in grid.prod(axis=1) // (merge_size * merge_size)]


def _find_sublist(tokens: list[int], pattern: list[int], start: int) -> int:
    n = len(pattern)
    for i in range(start, len(tokens) - n + 1):
        if tokens[i : i + n] == pattern:
            return i
    return -1


def segment_ids_from_labels(
    input_ids: np.ndarray, labels: np.ndarray, marker_variants: Sequence[Sequence[list[int]]]
) -> np.ndarray:
    """Original marker search: markers in order inside the labelled tokens, earliest prefix variant wins.

    Segment k+1 runs from marker k's match to marker k+1's match (the last found one to the end of the
    labels); the search stops at the first marker not found, so later segments stay 0.
    """
    positions = np.flatnonzero(labels != IGNORE_INDEX)
    tokens = input_ids[positions].tolist()
    starts: list[int] = []
    search_from = 0
    for variants in marker_variants:
        hits = [(i, len(v)) for v in variants if (i := _find_sublist(tokens, v, search_from)) >= 0]
        if not hits:
            break
        index, length = min(hits, key=lambda hit: hit[0])  # min keeps the first variant on ties
        starts.append(index)
        search_from = index + length
    segment_ids = np.zeros(len(input_ids), dtype=np.int64)
    bounds = starts + [len(tokens)]
    for k in range(len(starts)):
        segment_ids[positions[bounds[k] : bounds[k + 1]]] = k + 1
    return segment_ids


class TextEncoder:
    """Tokenises samples with one tokenizer built once (no per-sample deepcopy, no template mutation)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if pad_id != IMAGE_PAD_ID:
            raise SchemaError("tokenizer", IMAGE_PAD, f"id {IMAGE_PAD_ID} (Qwen2.5-VL)", pad_id)
        header = self._tokenize([f"{IM_START}assistant\n"])[0]
        if len(header) != NUM_ASSISTANT_HEADER_TOKENS:
            raise SchemaError("tokenizer", "assistant header", f"{NUM_ASSISTANT_HEADER_TOKENS} tokens", header)
        prefixes = self._tokenize([p for p in MARKER_PREFIXES if p])
        if sorted(prefixes) != sorted([i] for i in PREFIX_TOKEN_IDS):
            raise SchemaError("tokenizer", "marker prefixes", f"single tokens {PREFIX_TOKEN_IDS}", prefixes)
        encoded = self._tokenize([p + m for m in MARKERS for p in MARKER_PREFIXES])
        n = len(MARKER_PREFIXES)
        self.marker_variants = [encoded[i * n : (i + 1) * n] for i in range(len(MARKERS))]

    @classmethod
    def from_model_path(cls, path: str) -> "TextEncoder":
        from transformers import AutoTokenizer

        logger.info("loading tokenizer from %s", path)
        return cls(AutoTokenizer.from_pretrained(path, use_fast=True))

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(
        self, record: SampleRecord, image_token_counts: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, segment_ids), int64 (L,), bit-identical to the original for the same tokenizer."""
        counts = np.asarray(image_token_counts, dtype=np.int64)
        if len(counts) != len(record.frame_ids) or (counts < 1).any():
            raise SchemaError(record.sample_id, "image_token_counts",
                              f"{len(record.frame_ids)} positive counts (one per frame)", list(image_token_counts))
        system, user, assistant = (np.asarray(ids, dtype=np.int64) for ids in self._tokenize(
            render_conversation(record, np.ones_like(counts))))
        repeats = np.ones(len(user), dtype=np.int64)
        pad_positions = np.flatnonzero(user == IMAGE_PAD_ID)
        assert len(pad_positions) == len(counts), (pad_positions, counts)
        repeats[pad_positions] = counts
        input_ids = np.concatenate([system, np.repeat(user, repeats), assistant])
        labels = np.full_like(input_ids, IGNORE_INDEX)
        first_label = len(input_ids) - len(assistant) + NUM_ASSISTANT_HEADER_TOKENS
        labels[first_label:] = input_ids[first_label:]
        return input_ids, labels, segment_ids_from_labels(input_ids, labels, self.marker_variants)

    def encode_text(
        self, record: SampleRecord, image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge_size: int = 2
    ) -> EncodedText:
        """`encode` plus mRoPE position ids, for images of the given (N, 3) grids."""
        input_ids, labels, segment_ids = self.encode(record, num_image_tokens(image_grid_thw, merge_size))
        position_ids = rope_position_ids(input_ids, image_grid_thw, merge_size)
        return EncodedText(input_ids=input_ids, labels=labels, segment_ids=segment_ids, position_ids=position_ids)


def _weight_table(weights: Mapping[int, float] | Sequence[float]) -> list[float]:
    if isinstance(weights, Mapping):
        if sorted(weights) != [1, 2, 3, 4]:
            raise SchemaError("loss weights", "keys", "segment ids 1, 2, 3, 4", sorted(weights))
        return [0.0] + [float(weights[k]) for k in (1, 2, 3, 4)]
    if len(weights) != 4:
        raise SchemaError("loss weights", "length", "4 weights (sub, 2D, 3D, action)", list(weights))
    return [0.0] + [float(w) for w in weights]


def loss_weights_from_segments(
    segment_ids: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    weights: Mapping[int, float] | Sequence[float],
    input_ids: np.ndarray | torch.Tensor,
) -> np.ndarray | torch.Tensor:
    """float32 weights equal to the original's `loss_weights`, for (L,) or right-padded (B, L), numpy or torch.

    The original weights by prefix lengths of the target text, not by marker search, so: a lone "\n"
    (or " ", "\n\n") that opens segment k+1 (a marker matched with a prefix, after a segment ending in
    a letter or digit) weighs as segment k; the last two labelled tokens (`<|im_end|>`, `\n`) weigh 1.0;
    every labelled token still at 0 weighs 1.0 (so a weight of 0 acts as 1); unlabelled tokens 0.
    """
    is_numpy = not isinstance(segment_ids, torch.Tensor)
    segments = torch.as_tensor(segment_ids).long()
    device = segments.device
    labelled = torch.as_tensor(labels, device=device) != IGNORE_INDEX
    ids = torch.as_tensor(input_ids, device=device)
    if not segments.shape == labelled.shape == ids.shape:
        raise SchemaError("loss weights", "segment_ids/labels/input_ids", "equal shapes",
                          (tuple(segments.shape), tuple(labelled.shape), tuple(ids.shape)))
    previous = torch.cat([torch.zeros_like(segments[..., :1]), segments[..., :-1]], dim=-1)
    is_prefix = torch.isin(ids, torch.tensor(PREFIX_TOKEN_IDS, device=device))
    moved = is_prefix & (previous >= 1) & (segments == previous + 1)
    table = torch.tensor(_weight_table(weights), dtype=torch.float32, device=device)
    w = table[torch.where(moved, previous, segments)]
    labelled_from_end = labelled.flip(-1).cumsum(-1).flip(-1)
    tail = labelled & (labelled_from_end <= NUM_TAIL_TOKENS)
    w = torch.where(labelled & (tail | (w == 0)), torch.ones_like(w), w)
    w = torch.where(labelled, w, torch.zeros_like(w))
    return w.numpy() if is_numpy else w


def rope_position_ids(
    input_ids: np.ndarray | Sequence[int], image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge_size: int = 2
) -> np.ndarray:
    """Qwen2.5-VL mRoPE ids (3, L) int64 for text + images (the original `get_rope_index_25`, no video).

    Text: consecutive in all rows, continuing from the previous maximum + 1. Image k (merged grid
    t×h×w, its `<|image_pad|>` run starting where text position s would be): t = s, h = s + row,
    w = s + col; the next text starts at s + max(h, w).
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    rows, cols = grid[:, 1] // merge_size, grid[:, 2] // merge_size
    counts = grid[:, 0] * rows * cols
    edges = np.diff(np.concatenate(([0], (ids == IMAGE_PAD_ID).astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) != len(grid) or not np.array_equal(ends - starts, counts):
        raise SchemaError("rope_position_ids", "image_grid_thw",
                          f"one grid per <|image_pad|> run, runs of lengths {(ends - starts).tolist()}", grid.tolist())
    # each image shifts what follows by (its position span) − (its token count)
    shift = np.concatenate(([0], np.cumsum(np.maximum(rows, cols) - counts)))
    index = np.arange(len(ids), dtype=np.int64)
    position = index + shift[np.searchsorted(ends, index, side="right")]
    out = np.repeat(position[None, :], 3, axis=0)
    image_index = np.repeat(np.arange(len(grid)), counts)
    image_tokens = np.flatnonzero(ids == IMAGE_PAD_ID)
    base = (starts + shift[:-1])[image_index]
    offset = image_tokens - starts[image_index]
    within = offset % (rows * cols)[image_index]
    out[0, image_tokens] = base
    out[1, image_tokens] = base + within // cols[image_index]
    out[2, image_tokens] = base + within % cols[image_index]
    return out
