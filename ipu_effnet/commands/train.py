"""`train`: train a recipe on the PyTorch backend (CPU/CUDA; DDP under torchrun).

    python -m ipu_effnet train --config configs/quickstart-digits.yaml [--set key=value ...] [--out DIR]
    python -m ipu_effnet train --resume DIR          # continue DIR from its newest checkpoint
    torchrun --nproc_per_node 2 -m ipu_effnet train --config ...     # data parallel

The run directory (default: logging.out_dir / the recipe's name) receives config.yaml (resolved),
metrics.jsonl, summary.json and checkpoints/; the recipe (native | halfres | progressive) runs in phases
(`training/recipes.py`): halfres puts its phases in train/ and finetune/, and --resume skips completed
phases and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipu_effnet.commands.check import add_config_arguments, resolve
from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--out", help="run directory (default: logging.out_dir/<recipe name>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")


def run_dir_for(cfg, config_path: str, out: str = None) -> Path:
    if out:
        return Path(out)
    name = cfg.name or Path(config_path).stem
    return Path(cfg.logging.out_dir) / name


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.config import load
    from ipu_effnet.training.recipes import run_recipe

    if args.resume:
        run_dir = Path(args.resume)
        resolved = run_dir / "config.yaml"
        if not resolved.is_file():
            raise UsageError(f"--resume {run_dir}: no config.yaml there (is it a run directory?)")
        if args.config:
            raise UsageError("--resume takes the config from the run directory; drop --config")
        cfg = load(resolved, args.overrides)
        run_recipe(cfg, run_dir, resume=True, source=str(resolved), overrides=args.overrides)
        return 0
    if not args.config:
        raise UsageError("train needs --config FILE (or --resume DIR)")
    cfg, _, _ = resolve(args.config, args.overrides)  # validates model, module paths before any work
    run_dir = run_dir_for(cfg, args.config, args.out)
    if any(d.is_dir() and any(d.iterdir()) for d in (run_dir / "checkpoints", *run_dir.glob("*/checkpoints"))):
        raise UsageError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
                         "or choose another --out")
    run_recipe(cfg, run_dir, source=args.config, overrides=args.overrides)
    return 0
