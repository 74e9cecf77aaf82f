"""`python -m shards_manifest {verify,show,dump,diff}`: check and look inside a build before spending GPU-days on it.

PATH is a build folder, an fsspec URL of one (s3://…, memory://…) or its manifest.json. Exit status: 0 good /
identical, 1 problems found / builds differ / sample not found, 2 usage errors (diff: 2 when a manifest is unreadable).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from tqdm import tqdm

from schemas.errors import SchemaError
from schemas.manifest import read_manifest
from shards_manifest.deep_verify import EXECUTORS
from shards_manifest.verify import default_workers, locate, verify_build

log = logging.getLogger("shards_manifest")

VERIFY_HELP = """Quick (default): every shard in the manifest exists with its recorded size and sha256, no unknown
*.tar sits beside them, the manifest totals add up. --deep: also decodes every member of every shard (one read
per shard) and checks schema, shapes and dtypes, frame references and geometry, <|image_pad|> runs against the
frames' Qwen grids, mRoPE position_ids, labels after the images, VGGT features against the manifest tags,
per-shard counts against the manifest, empty shards and sample keys duplicated across shards.
Each problem is printed as one line naming the shard, the member and what was expected and found."""


def _progress_bar(args: argparse.Namespace, total: int | None, unit: str) -> tqdm:
    disable = None if args.progress is None else not args.progress  # None: only on a terminal
    return tqdm(total=total, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr)


def _manifest_shards(path: str) -> int | None:
    try:
        return len(read_manifest(locate(path)[1]).shards)
    except (SchemaError, OSError):
        return None  # verify reports it


def run_verify(args: argparse.Namespace) -> int:
    start, samples = time.perf_counter(), 0
    with _progress_bar(args, _manifest_shards(args.path), "shard") as bar:
        def on_shard(check) -> None:
            nonlocal samples
            samples += getattr(check, "samples", 0) if args.deep else 0
            bar.set_postfix(samples_s=f"{samples / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)
            bar.update(1)
        report = verify_build(args.path, args.deep, args.workers, args.executor, on_shard)
    for problem in report.problems:
        print(problem)
    mode = "deep" if report.deep else "quick"
    if not report.ok:
        print(f"FAILED ({mode}): {len(report.problems)} problems; {report.manifest_url}")
        return 1
    rate = f", {report.num_samples / max(report.seconds, 1e-9):,.0f} samples/s" if report.deep else ""
    print(f"OK ({mode}): {report.num_shards} shards, {report.num_samples:,} samples, {report.num_bytes / 1e6:,.1f} MB "
          f"in {report.seconds:.1f} s{rate}; {report.manifest_url}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from shards_manifest.inspect import build_summary, format_summary

    root_url, manifest_url = locate(args.path)
    manifest = read_manifest(manifest_url)
    scanned = len(manifest.shards) if args.scan_shards is None else min(args.scan_shards, len(manifest.shards))
    with _progress_bar(args, scanned, "shard") as bar:
        summary = build_summary(root_url, manifest, args.scan_shards, args.workers, lambda _: bar.update(1))
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else format_summary(summary))
    return 0


def run_dump(args: argparse.Namespace) -> int:
    from shards_manifest.dump import dump_sample, parse_weights

    root_url, manifest_url = locate(args.path)
    tensors = dump_sample(root_url, read_manifest(manifest_url), args.sample_id, args.out, parse_weights(args.weights),
                          args.device, args.shard or ())
    shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in tensors.items() if v.ndim and v.dtype.kind != "U")
    print(f"{tensors['sample_id']} (key {tensors['key']}, {tensors['shard']}) → {args.out}: {shapes}")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from shards_manifest.inspect import diff_builds

    try:
        a, b = (read_manifest(locate(path)[1]) for path in (args.a, args.b))
    except (SchemaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    differences, summary = diff_builds(a, b, args.max_shard_lines)
    print(f"A {locate(args.a)[1]}\nB {locate(args.b)[1]}")
    print("\n".join(differences + summary))
    print("identical" if not differences else f"{len(differences)} differences")
    return 1 if differences else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards_manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{verify,show,dump,diff}")
    verify = sub.add_parser("verify", help="check a build against its manifest (quick or --deep)",
                            description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("path", metavar="PATH|URL")
    verify.add_argument("--deep", action="store_true", help="decode and check every member of every shard")
    verify.add_argument("--executor", choices=EXECUTORS, default="process",
                        help="run shards on processes or threads (default process: scales better, docs/benchmarks.md)")
    show = sub.add_parser("show", help="build parameters, counts, rejects, token and storage distributions")
    show.add_argument("path", metavar="PATH|URL")
    show.add_argument("--scan-shards", type=int, default=None, metavar="N",
                      help="read only the first N shards for the distributions (0: manifest only; default all)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    dump = sub.add_parser("dump", help="one sample's training tensors, as the model receives them, to an .npz")
    dump.add_argument("path", metavar="PATH|URL")
    dump.add_argument("sample_id", metavar="SAMPLE_ID", help="original id (ep_a/step_8_MOVE_FORWARD.png) or shard key")
    dump.add_argument("--out", required=True, metavar="FILE.npz")
    dump.add_argument("--weights", default="0.5,1,2,3", help="loss weights of sub-instruction, 2D, 3D, action "
                      "segments (default 0.5,1,2,3, the original scripts' values)")
    dump.add_argument("--shard", action="append", metavar="NAME", help="search only this shard (repeatable)")
    dump.add_argument("--device", default="cpu", help="where PixelDecoder runs (cpu, cuda, …)")
    diff = sub.add_parser("diff", help="configs, counts and per-shard sha256 of two builds (exit 1 if they differ)")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")
    diff.add_argument("--max-shard-lines", type=int, default=50, metavar="N", help="shard lines shown (default 50)")
    for command in (verify, show):
        command.add_argument("--workers", type=_positive, default=default_workers(),
                             help="shards checked in parallel (default: the CPUs this process may use)")
        command.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                             help="progress bar on stderr (default: when stderr is a terminal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"verify": run_verify, "show": run_show, "dump": run_dump, "diff": run_diff}
    try:
        return commands[args.command](args)
    except (SchemaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
