"""`finetune`: the half-resolution recipe's fine-tune phase (docs/reference.md section 5) from any checkpoint.

    python -m ipu_effnet finetune --checkpoint RUN_DIR_OR_FILE --res R [--epochs E] [--lr LR]
                                  [--first-trainable PATH] [--averaged] [--out DIR] [--set key=value ...]
    python -m ipu_effnet finetune --init-from FILE [--init-format FORMAT] --config RECIPE --res R [...]

The checkpoint rebuilds its own network (with its weights, or its per-epoch weight average with
--averaged) and carries the resolved config, which gives the data set and the finetune section's
defaults. Evaluation preprocessing at R, the modules before PATH frozen (norms in eval mode), SGD
without momentum, cosine decay per step; see `run/recipes.py`. The output directory (default:
<run dir>/finetune-<R>) holds config.yaml, metrics.jsonl, summary.json and checkpoints/; rerunning the
command on an interrupted one resumes it; SIGTERM or SIGINT checkpoints at the next step and exits 0
(`run/faults.py`).

With --init-from instead of --checkpoint the network is the recipe's (--config), with a state dict from
another code base loaded into it (`models/importer.py`; e.g. geffnet's efficientnet_b0 fine-tuned at
the test resolution, FixRes's use); its classifier is re-initialised when the class count differs.
The output directory then defaults to logging.out_dir/<recipe name>-finetune-<R>.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ipu_effnet.commands.check import add_config_arguments
    from ipu_effnet.commands.train import add_init_arguments

    parser.add_argument("--checkpoint", help="a checkpoint file, or a run directory (its newest)")
    parser.add_argument("--res", type=int, required=True, help="fine-tune and test resolution")
    parser.add_argument("--epochs", type=float, help="fine-tune epochs (default: the config's finetune.epochs)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: finetune.lr)")
    parser.add_argument("--first-trainable", metavar="PATH",
                        help="first module that trains, e.g. blocks.5.3 (default: finetune.first_trainable, "
                             "else the second-to-last block; 'stem' trains everything)")
    parser.add_argument("--averaged", action="store_true", help="start from the weight-averaged model")
    parser.add_argument("--out", help="output directory (default: <run dir>/finetune-<res>)")
    add_config_arguments(parser, required=False)  # --config (with --init-from) and --set
    add_init_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.run.recipes import finetune_phase
    from ipu_effnet.run.run_dirs import load_run_checkpoint

    if args.res < 32:
        raise UsageError(f"--res {args.res}: the resolution must be at least 32")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs {args.epochs}: expected a number > 0")
    if args.lr is not None and args.lr < 0:
        raise UsageError(f"--lr {args.lr}: expected a number >= 0")
    if args.init_from:
        ckpt, cfg, out = _from_init(args)
    else:
        if not args.checkpoint:
            raise UsageError("finetune needs --checkpoint RUN_DIR_OR_FILE (or --init-from FILE --config RECIPE)")
        if args.config:
            raise UsageError("--checkpoint carries its own config; --config goes with --init-from")
        path, ckpt, cfg = load_run_checkpoint(args.checkpoint, args.overrides)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        out = Path(args.out) if args.out else run_dir / f"finetune-{args.res}"
    if (out / "summary.json").is_file():
        raise UsageError(f"{out} already holds a finished fine-tune (summary.json); choose another --out")
    from ipu_effnet.backends.host_collectives import shutdown_process_group
    from ipu_effnet.run import faults

    try:
        with faults.StopOnSignals():  # SIGTERM/SIGINT: a checkpoint at the next step, then exit 0
            summary = finetune_phase(cfg, ckpt, out, averaged=args.averaged and not args.init_from, resolution=args.res,
                                     epochs=args.epochs, lr=args.lr, first_trainable=args.first_trainable)
        shutdown_process_group()
    except faults.Preempted as stop:
        shutdown_process_group()
        print(f"stopped by {stop.signal_name} at step {stop.step}; checkpoint {stop.checkpoint}; resume by running "
              f"the same finetune command again (it continues in {out})", flush=True)
        return 0
    before = summary.get("val_top1_before_finetune")
    print(f"fine-tuned at {args.res} px: top-1 {summary['val_top1']:.2%} (weight-averaged "
          f"{summary['val_top1_averaged']:.2%}; before {'-' if before is None else format(before, '.2%')}); "
          f"{out / 'summary.json'}")
    return 0


def _from_init(args: argparse.Namespace):
    """(checkpoint dict, config, output directory) for --init-from: the recipe's network with the file's
    weights, as a checkpoint that finetune_phase starts from."""
    from ipu_effnet.commands.check import resolve
    from ipu_effnet.commands.train import init_overrides
    from ipu_effnet.config import model_kwargs
    from ipu_effnet.models import create_model
    from ipu_effnet.models.importer import load_pretrained
    from ipu_effnet.run.recipes import init_numerics
    from ipu_effnet.training.checkpoint import make_checkpoint

    if args.checkpoint:
        raise UsageError("give --checkpoint or --init-from, not both")
    if not args.config:
        raise UsageError("finetune --init-from FILE needs --config RECIPE (the model and the data set)")
    if args.averaged:
        raise UsageError("--averaged needs a --checkpoint with a weight average; --init-from has none")
    overrides = list(args.overrides) + init_overrides(args)
    cfg, _, _ = resolve(args.config, overrides)
    cfg = init_numerics(cfg)
    name, kwargs = model_kwargs(cfg)
    model = create_model(name, **kwargs)
    load_pretrained(model, cfg.model.init_from, cfg.model.init_format)
    ckpt = make_checkpoint(model, epoch=0, step=0, config=cfg.to_dict(), include_rng=False)
    out = Path(args.out) if args.out else Path(cfg.logging.out_dir) / f"{cfg.name or Path(args.config).stem}-finetune-{args.res}"
    return ckpt, cfg, out
