"""Pure policies of the shard stream: epoch order, equal per-rank budgets, slot pieces, mixing, resume
position, and which manifests a training configuration accepts.

Equal-batches policy ("drop the tail"): an epoch is the concatenation of all shards in a (seed, epoch)
shuffled order; each of R ranks takes a contiguous run of floor(N / R) samples (rounded down to a
multiple of num_slots × batch_size when a batch size is given) and splits it into contiguous runs per
loader worker ("slot"), sizes differing by at most one. The last N − R·n samples of the epoch's order are
not seen that epoch (< R, or < R·W·B with a batch size); a shard order reshuffled per epoch drops different ones.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np



class Piece(NamedTuple):
    """Samples [start, stop) of shard `shard` (an index into the stream's shard list), in stored order."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:  # type: ignore[override]
        return self.stop - self.start


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle of range(num_shards) from (seed, epoch); identical on every rank and worker."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return [int(i) for i in rng.permutation(num_shards)]


def rank_samples(total: int, world_size: int, num_slots: int = 1, batch_size: int = 1) -> int:
    """Samples each rank yields per epoch: floor(total / world_size), a multiple of num_slots·batch_size if batch_size > 1."""
    per_rank = total // world_size
    if batch_size > 1:
        per_rank -= per_rank % (num_slots * batch_size)
    return per_rank


def slot_sizes(per_rank: int, num_slots: int) -> list[int]:
    """How a rank's samples split over its slots (loader workers): sizes differ by at most one, larger first."""
    base, extra = divmod(per_rank, num_slots)
    return [base + (slot < extra) for slot in range(num_slots)]


def slot_range(total: int, rank: int, world_size: int, slot: int, num_slots: int, batch_size: int = 1) -> tuple[int, int]:
    """[begin, end) of this (rank, slot) in the epoch's global sample sequence (positions ≥ world_size·per_rank are dropped)."""
    per_rank = rank_samples(total, world_size, num_slots, batch_size)
    sizes = slot_sizes(per_rank, num_slots)
    begin = rank * per_rank + sum(sizes[:slot])
    return begin, begin + sizes[slot]


def pieces_in_range(order: Sequence[int], counts: Sequence[int], begin: int, end: int) -> list[Piece]:
    """The shard pieces covering global positions [begin, end) of the sequence `order` (shards with `counts` samples)."""
    pieces, offset = [], 0
    for shard in order:
        count = counts[shard]
        lo, hi = max(begin, offset), min(end, offset + count)
        if lo < hi:
            pieces.append(Piece(shard, lo - offset, hi - offset))
        offset += count
        if offset >= end:
            break
    return pieces


def assign_pieces(counts: Sequence[int], seed: int, epoch: int, rank: int, world_size: int, slot: int,
                  num_slots: int, batch_size: int = 1) -> list[Piece]:
    """The pieces one (rank, slot) reads in `epoch`: a contiguous run of the (seed, epoch) shard order."""
    order = epoch_shard_order(len(counts), seed, epoch)
    begin, end = slot_range(sum(counts), rank, world_size, slot, num_slots, batch_size)
    return pieces_in_range(order, counts, begin, end)


def interleave_schedule(lengths: Sequence[int], num_open: int, rng: np.random.Generator) -> np.ndarray:
    """Piece index of each output sample: `num_open` pieces open at once, each next sample from one of them
    uniformly at random; a finished piece is replaced by the next one (pieces open in order)."""
    remaining = [int(n) for n in lengths]
    upcoming = iter([i for i, n in enumerate(remaining) if n > 0])
    open_pieces = [i for _, i in zip(range(num_open), upcoming)]
    out = np.empty(sum(remaining), dtype=np.int64)
    draws = rng.random(len(out))
    for position, draw in enumerate(draws):
        slot = int(draw * len(open_pieces))
        piece = open_pieces[slot]
        out[position] = piece
        remaining[piece] -= 1
        if remaining[piece] == 0:
            following = next(upcoming, None)
            if following is None:
                open_pieces.pop(slot)
            else:
                open_pieces[slot] = following
    return out


def sequential_schedule(lengths: Sequence[int], num_open: int, rng: np.random.Generator) -> np.ndarray:
    """No mixing: piece after piece (for equivalence tests and debugging)."""
    return np.repeat(np.arange(len(lengths), dtype=np.int64), np.asarray(lengths, dtype=np.int64))


MIX_POLICIES: dict[str, Callable[[Sequence[int], int, np.random.Generator], np.ndarray]] = {
    "interleave": interleave_schedule,
    "sequential": sequential_schedule,
}


def mix_rng(seed: int, epoch: int, rank: int, slot: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank, slot, 0x313])


def skip_consumed(pieces: Sequence[Piece], schedule: np.ndarray, consumed: int) -> tuple[list[Piece], np.ndarray]:
    """Pieces and schedule left after the first `consumed` samples: no sample is read to skip it.

    A piece's start moves past the samples already taken from it; finished pieces keep zero length
    (indices in the schedule stay valid) and are never opened.
    """
    taken = np.bincount(schedule[:consumed], minlength=len(pieces))
    left = [Piece(p.shard, p.start + int(t), p.stop) for p, t in zip(pieces, taken)]
    return left, schedule[consumed:]


@dataclass
class StreamState:
    """Position of one rank's stream as the main process saw it: samples consumed per slot in `epoch`.

    `next_slot` is the slot the next batch would have come from (the DataLoader serves workers round-robin);
    on resume, loader worker j plays slot (j + next_slot) % num_slots so the batch order continues exactly.
    """

    epoch: int = 0
    num_slots: int = 0  # 0: no batch observed in this epoch
    consumed: list[int] = field(default_factory=list)
    next_slot: int = 0

    def update(self, tags: Any) -> None:
        """Record a consumed batch from its `__stream__` rows (epoch, slot, num_slots, index): tensor or lists."""
        for epoch, slot, num_slots, index in (tags.tolist() if hasattr(tags, "tolist") else tags):
            if epoch != self.epoch or num_slots != self.num_slots:
                self.epoch, self.num_slots, self.consumed, self.next_slot = epoch, num_slots, [0] * num_slots, 0
            self.consumed[slot] = max(self.consumed[slot], index + 1)
            self.next_slot = (slot + 1) % num_slots
