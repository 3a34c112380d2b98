"""`compare`: run several recipes on one data set, sweep each over test resolutions, and write one table
(compare.md, compare.csv) and two plots (accuracy_vs_resolution.png, pareto.png) into --out.

    python -m ipu_effnet compare --recipes a.yaml b.yaml ... [--set key=value ...] --out DIR
    python -m ipu_effnet compare --matrix --base configs/quickstart-digits.yaml --norms bn,gn,lnpn \
        --kinds native,halfres --out DIR

Each recipe trains in DIR/runs/<recipe name>/. Rerunning the same command skips complete runs
(summary.json present) and resumes interrupted ones (checkpoints, no summary). `--set` applies to every
recipe, after the recipe's own settings (e.g. --set data.path=/data/imagenet). How to read the outputs:
docs/recipes.md.
"""

from __future__ import annotations

import argparse

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipes", nargs="+", default=[], metavar="YAML", help="recipe files, one row each")
    parser.add_argument("--matrix", action="store_true",
                        help="generate the recipes as --norms x --kinds on top of --base instead")
    parser.add_argument("--base", default="configs/quickstart-digits.yaml", help="--matrix: the recipe to vary")
    parser.add_argument("--norms", default="bn,gn,lnpn", help="--matrix: some of bn, gn, ln, gnpn, lnpn")
    parser.add_argument("--kinds", "--recipes-kind", dest="kinds", default="native,halfres",
                        help="--matrix: some of native, halfres, progressive")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override every recipe, e.g. --set data.path=/data/imagenet (repeatable)")
    parser.add_argument("--out", required=True, help="output directory (runs/, compare.md, plots)")
    parser.add_argument("--res", default=None, metavar="R1,R2,...",
                        help="sweep resolutions for every recipe (default: 0.5x-1.5x each test resolution)")
    add_bench_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The --bench-* options of compare, quickstart and study; their defaults are BenchSettings'."""
    from ipu_effnet.analysis.compare import BenchSettings

    d = BenchSettings()
    parser.add_argument("--bench-batch", type=int, default=d.batch, help="inference measurement batch size")
    parser.add_argument("--bench-steps", type=int, default=d.steps,
                        help="inference measurement: the least timed steps per recipe and round (default %(default)s)")
    parser.add_argument("--bench-infer-seconds", type=float, default=d.infer_seconds,
                        help="inference measurement: the least timed seconds per recipe and round "
                             "(default %(default)s; 0: exactly --bench-steps steps)")
    parser.add_argument("--bench-seconds", type=float, default=d.train_seconds,
                        help="training-speed measurement: the least timed seconds per recipe and round "
                             f"(default %(default)s; 0: exactly {d.train_steps} steps)")
    parser.add_argument("--bench-rounds", type=int, default=None,
                        help="both speed measurements: the least rounds of the recipes taking turns "
                             f"(default {d.rounds}, or --bench-max-rounds where that is lower)")
    parser.add_argument("--bench-max-rounds", type=int, default=d.max_rounds,
                        help="both speed measurements: the most rounds, run while a recipe's standard error "
                             "is above --bench-target-error (default %(default)s; 5 gives a quick look)")
    parser.add_argument("--bench-target-error", type=float, default=d.target_error,
                        help="both speed measurements: the relative standard error to reach for every recipe "
                             "(default %(default)s; 0: exactly --bench-rounds rounds)")
    parser.add_argument("--bench-threads", type=int, default=d.threads,
                        help="threads for the measurements (default: torch's; 1 gives steadier ratios "
                             "between rows on a small shared machine, docs/PERFORMANCE.md)")


def bench_settings(args: argparse.Namespace):
    """BenchSettings from the --bench-* options, or UsageError naming the bad one."""
    import math

    from ipu_effnet.analysis.compare import BenchSettings

    rounds = args.bench_rounds
    for name in ("bench_batch", "bench_steps", "bench_rounds", "bench_max_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if rounds is None:  # the default least rounds never exceeds an explicit most
        rounds = min(BenchSettings.rounds, args.bench_max_rounds)
    for name in ("bench_seconds", "bench_infer_seconds"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
    if args.bench_max_rounds < rounds:
        raise UsageError(f"--bench-max-rounds {args.bench_max_rounds}: must be at least --bench-rounds ({rounds})")
    if not (math.isfinite(args.bench_target_error) and 0 <= args.bench_target_error < 1):
        raise UsageError(f"--bench-target-error {args.bench_target_error}: must be 0 or more and below 1 "
                         "(a fraction: 0.025 is 2.5 %)")
    if args.bench_threads is not None and args.bench_threads < 1:
        raise UsageError(f"--bench-threads {args.bench_threads}: must be at least 1")
    return BenchSettings(batch=args.bench_batch, steps=args.bench_steps, infer_seconds=args.bench_infer_seconds,
                         threads=args.bench_threads, rounds=rounds, train_seconds=args.bench_seconds,
                         max_rounds=args.bench_max_rounds, target_error=args.bench_target_error)


def select_recipes(args: argparse.Namespace):
    from ipu_effnet.analysis.compare import matrix_recipes, recipes_from_files

    if args.matrix:
        if args.recipes:
            raise UsageError("give either --recipes FILES or --matrix (with --base, --norms, --kinds), not both")
        split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
        return matrix_recipes(args.base, split(args.norms), split(args.kinds))
    if not args.recipes:
        raise UsageError("compare needs --recipes FILE [FILE ...] (or --matrix)")
    return recipes_from_files(args.recipes)


def run(args: argparse.Namespace) -> int:
    import time

    from ipu_effnet.analysis.compare import compare, elapsed
    from ipu_effnet.analysis.report import format_summary
    from ipu_effnet.analysis.sweep import parse_resolutions

    bench = bench_settings(args)
    recipes = select_recipes(args)
    resolutions = parse_resolutions(args.res) if args.res else None
    start = time.perf_counter()
    result = compare(recipes, args.out, overrides=args.overrides, sweep_resolutions=resolutions,
                     bench=bench, progress=not args.no_progress)
    print(format_summary(result))
    print(f"compare: {len(recipes)} recipes in {elapsed(start)}")
    return 0
