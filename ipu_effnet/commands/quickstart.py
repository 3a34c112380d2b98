"""`quickstart`: the project's comparison on an embedded default, on CPU in a few minutes.

    python -m ipu_effnet quickstart [--out runs/quickstart] [--native-only]

Trains the recipes in configs/quickstart/ (a small G16 EfficientNet on scikit-learn's bundled digits,
32 px: BatchNorm, GroupNorm and LayerNorm + Proxy Norm, each natively and at half resolution with a
fine-tune at 32 px), sweeps each over test resolutions, and prints the comparison table; the table and
the plots go into --out (compare.md, compare.csv, accuracy_vs_resolution.png, pareto.png). Rerunning it
reuses finished runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from ipu_effnet.commands.compare import add_bench_arguments, bench_settings
from ipu_effnet.errors import UsageError

QUICKSTART_DIR = Path(__file__).resolve().parents[2] / "configs" / "quickstart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    parser.add_argument("--native-only", action="store_true", help="skip the half-resolution recipes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override every recipe (e.g. --set train.epochs=2 for a smoke run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_bench_arguments(parser)


def quickstart_recipes(native_only: bool = False) -> List[str]:
    """The recipe files, native ones first, then (unless `native_only`) the half-resolution ones."""
    from ipu_effnet.config import load

    if not QUICKSTART_DIR.is_dir():
        raise UsageError(f"{QUICKSTART_DIR}: the quickstart recipes are missing (is this a full checkout?)")
    paths = sorted(QUICKSTART_DIR.glob("*.yaml"))
    native = [str(p) for p in paths if load(p).recipe == "native"]
    other = [str(p) for p in paths if str(p) not in native]
    if native_only:
        return native
    return native + other


def run(args: argparse.Namespace) -> int:
    import time

    from ipu_effnet.analysis.compare import compare, elapsed, recipes_from_files
    from ipu_effnet.analysis.report import format_summary

    bench = bench_settings(args)
    files = quickstart_recipes(args.native_only)
    start = time.perf_counter()
    result = compare(recipes_from_files(files), args.out, overrides=args.overrides, bench=bench,
                     progress=not args.no_progress)
    print(format_summary(result))
    print(f"quickstart: {len(files)} recipes in {elapsed(start)}; table and plots in {args.out}")
    return 0
