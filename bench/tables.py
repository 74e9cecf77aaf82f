"""The metric | value markdown table that the CPU benchmarks print (and docs/benchmarks.md quotes)."""
from __future__ import annotations

from collections.abc import Iterable


def print_metrics(rows: Iterable[tuple[str, object]]) -> None:
    print("| metric | value |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
