"""The online path's samples/s per core on the embedded sample data: the baseline the shard loader is
compared with (`bench/loader_throughput.py` runs both side by side). Prints a markdown table.

    python bench/online_path.py [--samples 32] [--batch 4]
"""
from __future__ import annotations

import argparse

import torch
from loader_throughput import Tally, batches_forever, take
from tables import print_metrics  # bench/ (scripts run as `python bench/...`)

from prep.sample_data import ensure_sample_episodes, ensure_tokenizer
from train.collate import Collator
from train.online import OnlineDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = OnlineDataset(ensure_sample_episodes(), ensure_tokenizer())
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, collate_fn=Collator(), shuffle=True,
                                         generator=torch.Generator().manual_seed(0), num_workers=0)
    batches, tally = batches_forever(loader), Tally()
    take(batches, args.batch, Tally(), [])  # warm-up, untimed (as in loader_throughput.py)
    take(batches, args.samples, tally, [])
    print_metrics([("samples timed", tally.samples), ("online path: samples/s per core", f"{tally.rate:.2f}"),
                   ("payload per sample (MB)", f"{tally.payload / tally.samples / 1e6:.2f}")])


if __name__ == "__main__":
    main()
