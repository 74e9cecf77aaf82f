"""Loader throughput per CPU core: shards (ShardStream + Collator) vs the online path (OnlineDataset +
Collator) in the same run, on 640×480 episodes with 9 images per sample; payload bytes per sample, RSS of a
loader worker, and mixing (most samples of one episode in any 64-sample window, vs a global shuffle). Timed
in-process (`num_workers=0`) so one core does all the work, in `--rounds` alternating rounds (one shard epoch,
then `--online-samples` of the online path): medians per path, so a burst of load on a shared machine hits
both paths alike. Prints a markdown table.

    python bench/loader_throughput.py [--episodes 16] [--batch 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from prep.build import build
from prep.sample_data import ensure_tokenizer, write_sample_episodes
from schemas.config import BuildConfig
from train.collate import Collator
from train.online import OnlineDataset
from train.stream import ShardStream, StreamConfig


def payload_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def time_loader(loader, max_samples: int, order: list[str] | None = None) -> tuple[float, int, int]:
    """(seconds, samples, payload bytes) for iterating up to max_samples samples; sample ids appended to `order`."""
    samples = payload = 0
    start = time.perf_counter()
    for batch in loader:
        samples += batch["input_ids"].shape[0]
        payload += payload_bytes(batch)
        if order is not None:
            order += batch["sample_id"]
        if samples >= max_samples:
            break
    return time.perf_counter() - start, samples, payload


def worst_window(sample_ids: list[str], window: int = 64) -> int:
    """Most samples of one episode inside any `window` consecutive samples (lower = better mixed)."""
    episodes = [s.split("/", 1)[0] for s in sample_ids]
    return max(Counter(episodes[i:i + window]).most_common(1)[0][1] for i in range(max(1, len(episodes) - window + 1)))


def worker_rss_mb(stream, collate, batch: int) -> float:
    """Peak-ish RSS of one persistent loader worker after a full epoch."""
    import psutil
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, collate_fn=collate, num_workers=1,
                                         persistent_workers=True)
    for _ in loader:
        pass
    rss = max(child.memory_info().rss for child in psutil.Process().children(recursive=True))
    del loader
    return rss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--online-samples", type=int, default=24, help="the online path is slow: time this many")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (medians reported)")
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
        shard_rates, online_rates = [], []
        for epoch in range(args.rounds):
            stream.set_epoch(epoch)
            order: list[str] = []
            shard_s, shard_n, shard_bytes = time_loader(shard_loader, len(stream), order)
            online_s, online_n, _ = time_loader(online_loader, args.online_samples)
            shard_rates.append(shard_n / shard_s)
            online_rates.append(online_n / online_s)
        shuffled = random.Random(0).sample(order, len(order))
        shard_rate, online_rate = statistics.median(shard_rates), statistics.median(online_rates)
        ratios = sorted(a / b for a, b in zip(shard_rates, online_rates))
        rows = [("samples timed per round (shards / online) × rounds", f"{shard_n} / {online_n} × {args.rounds}"),
                ("shards: samples/s per core (median)", f"{shard_rate:.1f}"),
                ("online path: samples/s per core (median)", f"{online_rate:.2f}"),
                ("shards ÷ online (medians, same run)", f"{shard_rate / online_rate:.1f}×"),
                ("shards ÷ online per round (min – max)", f"{ratios[0]:.1f}× – {ratios[-1]:.1f}×"),
                ("payload per sample, collated (MB)", f"{shard_bytes / shard_n / 1e6:.2f}"),
                ("original payload per sample (MB, facts §3)", "≈134"),
                ("peak RSS of this process (MB)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f}"),
                ("RSS of one loader worker after an epoch (MB)", f"{worker_rss_mb(stream, collate, args.batch):.0f}"),
                ("most samples of one episode in a 64-sample window: stream", worst_window(order)),
                ("the same for a global random shuffle", worst_window(shuffled)),
                ("episodes / samples per episode", f"{args.episodes} / {len(order) / args.episodes:.1f}")]
        print("| metric | value |\n|---|---|")
        print("\n".join(f"| {k} | {v} |" for k, v in rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
