"""`bench`: images per second of a training step (or inference), optionally against a second configuration.

    python -m ipu_effnet bench --model efficientnet_b0_g16 --norm layer --res 160 --batch 16 \\
        --vs "norm=layer+proxy" --repeats 5 --threads 2 --channels-last

With `--vs "KEY=VALUE ..."` the second configuration (B) is the first (A) with those options changed;
A and B run alternately in one process and the command prints the median images/s of each, their
spread and the ratio B/A. Compare configurations as ratios from one run: absolute figures drift with
the machine. The measuring lives in `ipu_effnet.analysis.bench`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="efficientnet_b0_g16", help="model name (default: efficientnet_b0_g16)")
    parser.add_argument("--norm", default="batch",
                        help="batch | group | layer | none, KIND+proxy for Proxy Norm (default: batch)")
    parser.add_argument("--group-size", type=int, default=None, help="channels per group of the spatial convolutions")
    parser.add_argument("--expand-ratio", type=float, default=None, help="expansion of the inverted-residual stages")
    parser.add_argument("--res", type=int, default=None, help="input resolution (default: the model's native one)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; with --vs, A and B alternate (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and input")
    parser.add_argument("--mode", choices=("train", "infer"), default="train",
                        help="train: forward + cross-entropy + backward + SGD step; infer: forward in eval mode")
    parser.add_argument("--proxy-impl", choices=("fused", "inplace", "reference"), default=None,
                        help="how Proxy Norm's per-element step runs (norms/proxy_ops.py; default: the fastest valid)")
    parser.add_argument("--vs", metavar='"KEY=VALUE ..."', default=None,
                        help='also measure a configuration differing in these options, e.g. --vs "norm=layer+proxy"')
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")


def config_from_args(args: argparse.Namespace):
    from ipu_effnet.analysis.bench import BenchConfig

    return BenchConfig(model=args.model, norm=args.norm, group_size=args.group_size,
                       expand_ratio=args.expand_ratio, res=args.res, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, threads=args.threads, channels_last=args.channels_last,
                       mode=args.mode, proxy_impl=args.proxy_impl).validate()


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.analysis.bench import format_report, run_bench

    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    configs = [config_from_args(args)]
    if args.vs is not None:
        configs.append(configs[0].with_overrides(args.vs))
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_bench(configs, repeats=args.repeats, progress=progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
