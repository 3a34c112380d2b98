"""`plan`: choose pipeline splits for a recipe and check that every stage fits an IPU.

    python -m ipu_effnet plan --config configs/efficientnet-b4-g1-bn.yaml [--set key=value ...]
                              [--ipus N] [--budget-mb 900] [--overhead-mb 150] [--recompute auto] [--json]

Builds the recipe's model on the `meta` device, profiles it at the training resolution, and with the
cost model of `ipu_effnet.pipeline.cost` (micro-batch, precision and optimiser from the recipe) picks the
split points for N stages (default: ipu.ipus_per_replica) that minimise the slowest stage's compute while
every stage fits the per-IPU memory budget. Prints the per-stage table, the config lines to paste, the
same table for the splits already in the recipe ("as configured"), and every assumption. docs/pipeline.md
explains the model.
"""

from __future__ import annotations

import argparse
import json
from typing import List

from ipu_effnet.commands.check import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--ipus", type=int, default=None, help="pipeline stages (default: ipu.ipus_per_replica)")
    parser.add_argument("--budget-mb", type=float, default=900.0,
                        help="In-Processor Memory per IPU in MB (default: 900, a Mk2 GC200)")
    parser.add_argument("--overhead-mb", type=float, default=150.0,
                        help="assumed fixed per-IPU cost: code, exchange buffers, streams (default: 150)")
    parser.add_argument("--recompute", default="auto", choices=["auto", "off", "stage", "blocks"],
                        help="auto: recompute from each stage's input when pipelined, none on one IPU (default)")
    parser.add_argument("--master-weights", action="store_true",
                        help="count an fp32 master copy of 16-bit weights (Graphcore's 16.16 keeps none)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _cost_model(cfg, model, resolution: int, stages: int, args: argparse.Namespace):
    from ipu_effnet.models.profile import profile_model
    from ipu_effnet.pipeline.cost import build_cost_model

    profile = profile_model(model, resolution)
    return build_cost_model(
        model, profile, model_name=cfg.model.name, micro_batch=cfg.train.micro_batch,
        precision=cfg.train.precision, optimiser=cfg.train.optimizer, momentum=cfg.train.momentum,
        grad_accum=cfg.train.grad_accum, stages=stages, recompute=args.recompute,
        recompute_points=list(cfg.ipu.recompute),
        available_memory_proportion=list(cfg.ipu.available_memory_proportion),
        ipu_memory_mb=args.budget_mb, overhead_mb=args.overhead_mb, master_weights=args.master_weights)


def table(plan) -> List[str]:
    lines = [f"{'stage':>5}  {'from':<20}{'to':<22}{'MACs':>7}{'params':>12}{'weights+opt':>12}"
             f"{'stash':>8}{'working':>9}{'temp':>7}{'total MB':>10}  fits"]
    for s in plan.stages:
        m = s.memory_mb
        lines.append(f"{s.index:>5}  {s.first:<20}{s.last:<22}{s.macs_share:>7.1%}{s.params:>12,}"
                     f"{m['weights_and_optimiser']:>12.1f}{m['stashed_activations']:>8.1f}"
                     f"{m['working_activations']:>9.1f}{m['temporaries']:>7.1f}{m['total']:>10.1f}  "
                     f"{'yes' if s.fits else 'NO'}")
    lines.append(f"slowest stage {plan.balance:.2f}x the mean stage compute; "
                 f"{'fits' if plan.fits else 'does NOT fit'} {plan.budget_mb:.0f} MB per IPU")
    if plan.reason:
        lines.append(f"why: {plan.reason}")
    lines.extend(f"note: {n}" for n in plan.notes if n != plan.reason)
    return lines


def assumption_lines(plan) -> List[str]:
    a = plan.assumptions
    amp = ", ".join(f"{p:g}" for p in a["available_memory_proportion"])
    return [
        "assumptions:",
        f"  memory per IPU {a['budget_mb']:g} MB (Mk2 GC200 In-Processor Memory); fixed overhead "
        f"{a['overhead_mb']:g} MB per IPU (ASSUMED: code, exchange buffers, streams)",
        f"  convolution temporaries reserved: available_memory_proportion [{amp}] x {a['ipu_memory_mb']:g} MB",
        f"  bytes per element: weights {a['weight_bytes']}, activations {a['activation_bytes']}; optimiser "
        f"{a['optimiser']}: {a['optimiser_slots']} fp32 slot(s) per parameter; gradients at weight precision; "
        f"fp32 accumulators {'yes' if a['accumulate'] else 'no'}; fp32 master weights "
        f"{'yes' if a['master_weights'] else 'no'}",
        f"  activations kept for backward: every module output except pass-throughs; recompute "
        f"{a['recompute']!r} (stage: stash each stage's input and checkpoints, recompute the rest)",
        f"  micro-batches in flight: {a['in_flight']}",
        "  compute: forward MACs of Conv2d/Linear; backward ~2x forward everywhere, so it cancels",
    ]


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.commands.check import resolve
    from ipu_effnet.errors import UsageError
    from ipu_effnet.pipeline.planner import evaluate, plan

    cfg, model, resolution = resolve(args.config, args.overrides)
    n = args.ipus if args.ipus is not None else cfg.ipu.ipus_per_replica
    if n < 1:
        raise UsageError(f"--ipus {n}: at least 1")
    if args.budget_mb <= args.overhead_mb:
        raise UsageError(f"--budget-mb {args.budget_mb:g}: must exceed --overhead-mb {args.overhead_mb:g}")
    chosen = plan(_cost_model(cfg, model, resolution, n, args), n)
    configured = None
    splits = list(cfg.ipu.pipeline_splits)
    if cfg.ipu.ipus_per_replica == len(splits) + 1:
        configured = evaluate(_cost_model(cfg, model, resolution, len(splits) + 1, args), splits)
    if args.json:
        out = {"config": args.config, "overrides": list(args.overrides), "model": cfg.model.name,
               "resolution": resolution, "micro_batch": cfg.train.micro_batch,
               "precision": cfg.train.precision, "plan": chosen.to_dict(),
               "configured": configured.to_dict() if configured else None,
               "assumptions": chosen.assumptions}
        print(json.dumps(out, indent=2))
        return 0
    print(f"# {args.config}: {cfg.model.name} at {resolution} px, micro-batch {cfg.train.micro_batch}, "
          f"precision {cfg.train.precision}, optimiser {cfg.train.optimizer}")
    print()
    print(f"planned, {n} stage{'s' if n > 1 else ''}:")
    print("\n".join(table(chosen)))
    print()
    print("config lines to paste:")
    print(chosen.config_lines())
    print()
    if configured is not None:
        print(f"as configured ({cfg.ipu.ipus_per_replica} stages, splits {splits}):")
        print("\n".join(table(configured)))
    else:
        print(f"as configured: ipus_per_replica {cfg.ipu.ipus_per_replica} with {len(splits)} split(s): "
              "not a pipeline the planner can evaluate (needs ipus_per_replica = splits + 1)")
    print()
    print("\n".join(assumption_lines(chosen)))
    return 0
