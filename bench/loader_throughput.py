"""Loader throughput per CPU core: shards (ShardStream + Collator) vs the online path (OnlineDataset +
Collator) in the same run, on 640×480 episodes with 9 images per sample; payload bytes per sample, RSS of a
loader worker, and mixing (most samples of one episode in any 64-sample window, vs a global shuffle). Timed
in-process (`num_workers=0`) so one core does all the work. The two paths take turns (`--rounds` of
`--shard-samples` then `--online-samples`), so load bursts on a shared machine hit both alike; rates are
totals over all turns after one untimed warm-up turn each, with the spread of the per-turn ratio. Prints a
markdown table.

    python bench/loader_throughput.py [--episodes 16] [--batch 4] [--rounds 12]
"""
from __future__ import annotations

import argparse
import itertools
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tables import print_metrics  # bench/ (scripts run as `python bench/...`)

from prep.build import build
from prep.sample_data import ensure_tokenizer, write_sample_episodes
from schemas.config import BuildConfig
from train.collate import Collator, batch_payload_bytes
from train.online import OnlineDataset
from train.stream import ShardStream, StreamConfig


@dataclass
class Tally:
    seconds: float = 0.0
    samples: int = 0
    payload: int = 0

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


def batches_forever(loader, stream: ShardStream | None = None) -> Iterator[dict]:
    """The loader's batches, epoch after epoch (a new shuffle each epoch)."""
    for epoch in itertools.count():
        if stream is not None:
            stream.set_epoch(epoch)
        yield from loader


def take(batches: Iterator[dict], samples: int, tally: Tally, order: list[str]) -> float:
    """Time fetching batches until `samples` samples; add to `tally`, ids to `order`; returns this turn's rate."""
    count, start = 0, time.perf_counter()
    while count < samples:
        batch = next(batches)
        count += batch["input_ids"].shape[0]
        tally.payload += batch_payload_bytes(batch)
        order += batch["sample_id"]
    seconds = time.perf_counter() - start
    tally.seconds, tally.samples = tally.seconds + seconds, tally.samples + count
    return count / seconds


def worst_window(sample_ids: list[str], window: int = 64) -> int:
    """Most samples of one episode inside any `window` consecutive samples (lower = better mixed)."""
    episodes = [s.split("/", 1)[0] for s in sample_ids]
    return max(Counter(episodes[i:i + window]).most_common(1)[0][1] for i in range(max(1, len(episodes) - window + 1)))


def one_worker(stream, collate, batch: int, epochs: int = 3) -> tuple[float, float]:
    """(RSS in MB of one persistent loader worker after `epochs` epochs, samples/s of the last epoch's wall time).

    The rate is what one worker delivers end to end: its core, plus the main process receiving the batches.
    """
    import psutil
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, collate_fn=collate, num_workers=1,
                                         persistent_workers=True, prefetch_factor=4)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        count, start = 0, time.perf_counter()
        for b in loader:
            count += b["input_ids"].shape[0]
        rate = count / (time.perf_counter() - start)
    rss = max(child.memory_info().rss for child in psutil.Process().children(recursive=True))
    del loader
    return rss / 1e6, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shard-samples", type=int, default=48, help="shard-path samples per turn")
    parser.add_argument("--online-samples", type=int, default=4, help="online-path samples per turn (it is slow)")
    parser.add_argument("--rounds", type=int, default=12, help="turns of each path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="vln-bench-loader-"))
    try:
        episodes = write_sample_episodes(work / "episodes", num_episodes=args.episodes, seed=2)
        model_path = str(ensure_tokenizer())
        config = BuildConfig(input=str(episodes), model_path=model_path, output=str(work / "shards"),
                             episodes_per_shard=4, progress=False)
        build(config)
        collate = Collator()
        stream = ShardStream(f"{config.output}/manifest.json", StreamConfig(seed=0), rank=0, world_size=1)
        shard_loader = torch.utils.data.DataLoader(stream, batch_size=args.batch, collate_fn=collate, num_workers=0)
        online = OnlineDataset(episodes, model_path)
        online_loader = torch.utils.data.DataLoader(online, batch_size=args.batch, collate_fn=collate, shuffle=True,
                                                    generator=torch.Generator().manual_seed(0), num_workers=0)
        shards, online_tally, order, online_ids = Tally(), Tally(), [], []
        shard_batches, online_batches = batches_forever(shard_loader, stream), batches_forever(online_loader)
        take(shard_batches, len(stream), Tally(), order)  # warm-up, untimed: one epoch (first-call costs, page cache)
        take(online_batches, args.online_samples, Tally(), online_ids)
        ratios = sorted(take(shard_batches, args.shard_samples, shards, order)
                        / take(online_batches, args.online_samples, online_tally, online_ids)
                        for _ in range(args.rounds))
        epoch = order[:len(stream)]  # the warm-up epoch, for the mixing figure
        worker_rss, worker_rate = one_worker(stream, collate, args.batch)
        shuffled = random.Random(0).sample(epoch, len(epoch))
        rows = [("samples timed (shards / online), in turns", f"{shards.samples} / {online_tally.samples} in "
                 f"{args.rounds} turns"),
                ("shards: samples/s per core", f"{shards.rate:.1f}"),
                ("online path: samples/s per core", f"{online_tally.rate:.2f}"),
                ("shards ÷ online (same run)", f"{shards.rate / online_tally.rate:.1f}×"),
                ("shards ÷ online per turn (min / median / max)",
                 f"{ratios[0]:.1f}× / {statistics.median(ratios):.1f}× / {ratios[-1]:.1f}×"),
                ("payload per sample, collated (MB)", f"{shards.payload / shards.samples / 1e6:.2f}"),
                ("original payload per sample (MB, facts §3)", "≈134"),
                ("peak RSS of this process (MB)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f}"),
                ("RSS of one loader worker after 3 epochs (MB)", f"{worker_rss:.0f}"),
                ("one loader worker (persistent): samples/s, wall", f"{worker_rate:.0f}"),
                ("most samples of one episode in a 64-sample window: stream", worst_window(epoch)),
                ("the same for a global random shuffle", worst_window(shuffled)),
                ("episodes / samples per episode", f"{args.episodes} / {len(epoch) / args.episodes:.1f}")]
        print_metrics(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
