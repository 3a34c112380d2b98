"""`study`: the matrix norm x recipe kind x seed over `compare`, summarised over seeds, with verdicts.

    python -m ipu_effnet study --data DIR [--preset imagenette-cpu] [--seeds N] [--norms bn,gn,ln,lnpn] \
        [--kinds native,halfres] [--set KEY=VALUE ...] --out DIR

A preset (configs/study/<name>.yaml) names the recipe every run starts from, the norms, the kinds, the
per-kind settings (e.g. the half-res training size) and the sweep's resolutions; --norms, --kinds and
--seeds replace its lists, --set applies to every run. data.dataset is imagenet, data.path is --data and
model.num_classes the number of class folders under DIR/train. Rerunning the same command keeps finished
runs and resumes interrupted ones. Outputs and the verdict rule: docs/study.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ipu_effnet.commands.compare import add_bench_arguments

    parser.add_argument("--data", required=True, help="an ImageFolder copy: train/<class>/* and val/<class>/*")
    parser.add_argument("--preset", default="imagenette-cpu",
                        help="configs/study/<NAME>.yaml or a preset file (default: imagenette-cpu)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per recipe, 0 .. N-1 (default: the preset's)")
    parser.add_argument("--norms", default=None, help="some of bn, gn, ln, gnpn, lnpn (default: the preset's)")
    parser.add_argument("--kinds", default=None, help="some of native, halfres, progressive (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override every run, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--res", default=None, metavar="R1,R2,...",
                        help="sweep resolutions for every run (default: the preset's)")
    parser.add_argument("--out", required=True, help="output directory (runs/, study.md, findings.md, plots)")
    add_bench_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import time

    from ipu_effnet.analysis.compare import elapsed
    from ipu_effnet.analysis.study import load_preset, plan_study, study
    from ipu_effnet.analysis.study_report import format_result
    from ipu_effnet.analysis.sweep import parse_resolutions
    from ipu_effnet.commands.compare import bench_settings

    bench = bench_settings(args)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
    preset = load_preset(args.preset)
    plan = plan_study(preset, args.data, seeds=args.seeds, norms=split(args.norms), kinds=split(args.kinds),
                      overrides=args.overrides, resolutions=parse_resolutions(args.res) if args.res else None)
    start = time.perf_counter()
    result = study(plan, args.out, bench=bench, progress=not args.no_progress)
    print(format_result(result))
    print(f"study: {len(plan.runs)} runs ({len(result.trained)} trained or resumed now) in {elapsed(start)}")
    return 0
