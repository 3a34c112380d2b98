"""`finetune`: the half-resolution recipe's fine-tune phase (REFERENCE.md section 5) from any checkpoint.

    python -m ipu_effnet finetune --checkpoint RUN_DIR_OR_FILE --res R [--epochs E] [--lr LR]
                                  [--first-trainable PATH] [--averaged] [--out DIR] [--set key=value ...]

The checkpoint rebuilds its own network (with its weights, or its per-epoch weight average with
--averaged) and carries the resolved config, which gives the data set and the finetune section's
defaults. Evaluation preprocessing at R, the modules before PATH frozen (norms in eval mode), SGD
without momentum, cosine decay per step; see `training/recipes.py`. The output directory (default:
<run dir>/finetune-<R>) holds config.yaml, metrics.jsonl, summary.json and checkpoints/; rerunning the
command on an interrupted one resumes it; SIGTERM or SIGINT checkpoints at the next step and exits 0
(`training/faults.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (its newest)")
    parser.add_argument("--res", type=int, required=True, help="fine-tune and test resolution")
    parser.add_argument("--epochs", type=float, help="fine-tune epochs (default: the config's finetune.epochs)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: finetune.lr)")
    parser.add_argument("--first-trainable", metavar="PATH",
                        help="first module that trains, e.g. blocks.5.3 (default: finetune.first_trainable, "
                             "else the second-to-last block; 'stem' trains everything)")
    parser.add_argument("--averaged", action="store_true", help="start from the weight-averaged model")
    parser.add_argument("--out", help="output directory (default: <run dir>/finetune-<res>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the stored config, e.g. --set data.path=/data/imagenet")


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.commands.evaluate import load_run_checkpoint
    from ipu_effnet.training.recipes import finetune_phase

    if args.res < 32:
        raise UsageError(f"--res {args.res}: the resolution must be at least 32")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs {args.epochs}: expected a number > 0")
    if args.lr is not None and args.lr < 0:
        raise UsageError(f"--lr {args.lr}: expected a number >= 0")
    path, ckpt, cfg = load_run_checkpoint(args.checkpoint, args.overrides)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(args.out) if args.out else run_dir / f"finetune-{args.res}"
    if (out / "summary.json").is_file():
        raise UsageError(f"{out} already holds a finished fine-tune (summary.json); choose another --out")
    from ipu_effnet.backends.host_collectives import shutdown_process_group
    from ipu_effnet.training import faults

    try:
        with faults.StopOnSignals():  # SIGTERM/SIGINT: a checkpoint at the next step, then exit 0
            summary = finetune_phase(cfg, ckpt, out, averaged=args.averaged, resolution=args.res,
                                     epochs=args.epochs, lr=args.lr, first_trainable=args.first_trainable)
        shutdown_process_group()
    except faults.Preempted as stop:
        shutdown_process_group()
        print(f"stopped by {stop.signal_name} at step {stop.step}; checkpoint {stop.checkpoint}; resume by running "
              f"the same finetune command again (it continues in {out})", flush=True)
        return 0
    print(f"fine-tuned at {args.res} px: top-1 {summary['val_top1']:.2%} (before {summary.get('val_top1_before_finetune')}); "
          f"{out / 'summary.json'}")
    return 0
