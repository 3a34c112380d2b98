"""`train`: train a recipe on the PyTorch backend (CPU/CUDA; DDP under torchrun).

    python -m ipu_effnet train --config configs/quickstart-digits.yaml [--set key=value ...] [--out DIR]
    python -m ipu_effnet train --resume DIR          # continue DIR from its newest checkpoint
    python -m ipu_effnet train --config ... --init-from efficientnet_b0.pth [--init-format geffnet]
    torchrun --nproc_per_node 2 -m ipu_effnet train --config ...     # data parallel

The run directory (default: logging.out_dir / the recipe's name) receives config.yaml (resolved),
metrics.jsonl, summary.json and checkpoints/; the recipe (native | halfres | progressive) runs in phases
(`run/recipes.py`): halfres puts its phases in train/ and finetune/, and --resume skips completed
phases and resumes an interrupted one.

Faults: a config or data error exits with status 2 and removes the run directory it created; a SIGTERM
or SIGINT writes a checkpoint at the next step boundary and exits 0 with the command that resumes it (a
second signal stops at once); a run stopped by a non-finite loss or a full disk exits 1 naming its last
good checkpoint (`run/faults.py`).

--init-from FILE starts from a G1 EfficientNet's state dict saved by timm, geffnet, torchvision,
efficientnet_pytorch or this project (`models/importer.py`: names mapped, shapes checked, norm.eps and
model.padding set to the weights' own); it is `--set model.init_from=FILE model.init_format=FORMAT`.
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
    add_init_arguments(parser)


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """--init-from and --init-format (train and finetune)."""
    from ipu_effnet.config import INIT_FORMATS

    parser.add_argument("--init-from", metavar="FILE",
                        help="start from this state dict (timm, geffnet, torchvision, efficientnet_pytorch or "
                             "ipu_effnet names; a local file)")
    parser.add_argument("--init-format", choices=INIT_FORMATS, default=None,
                        help="the file's names and numerics (default: auto, from its names)")


def init_overrides(args: argparse.Namespace) -> list:
    """--init-from/--init-format as config overrides (JSON strings are YAML: any path survives)."""
    import json

    if args.init_format and not args.init_from:
        raise UsageError("--init-format needs --init-from FILE")
    if not args.init_from:
        return []
    if not Path(args.init_from).is_file():
        raise UsageError(f"--init-from {args.init_from}: no such file")
    return [f"model.init_from={json.dumps(str(args.init_from))}",
            f"model.init_format={args.init_format or 'auto'}"]


def run_dir_for(cfg, config_path: str, out: str = None) -> Path:
    if out:
        return Path(out)
    name = cfg.name or Path(config_path).stem
    return Path(cfg.logging.out_dir) / name


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.config import load

    if args.resume:
        run_dir = Path(args.resume)
        resolved = run_dir / "config.yaml"
        if not resolved.is_file():
            raise UsageError(f"--resume {run_dir}: no config.yaml there (is it a run directory?)")
        if args.config:
            raise UsageError("--resume takes the config from the run directory; drop --config")
        if args.init_from:
            raise UsageError("--resume continues from the run's checkpoint; drop --init-from")
        cfg = load(resolved, args.overrides)
        return _run(cfg, run_dir, resume=True, source=str(resolved), overrides=args.overrides)
    if not args.config:
        raise UsageError("train needs --config FILE (or --resume DIR)")
    args.overrides = list(args.overrides) + init_overrides(args)
    cfg, _, _ = resolve(args.config, args.overrides)  # validates model, module paths before any work
    run_dir = run_dir_for(cfg, args.config, args.out)
    if any(d.is_dir() and any(d.iterdir()) for d in (run_dir / "checkpoints", *run_dir.glob("*/checkpoints"))):
        raise UsageError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
                         "or choose another --out")
    return _run(cfg, run_dir, resume=False, source=args.config, overrides=args.overrides)


def _run(cfg, run_dir: Path, resume: bool, source: str, overrides) -> int:
    from ipu_effnet.backends.host_collectives import shutdown_process_group
    from ipu_effnet.console import process_rank
    from ipu_effnet.run import faults, train

    existed = run_dir.exists()
    try:
        faults.preflight(run_dir, 0)  # writable at all: before any data is read or model built
        with faults.StopOnSignals():
            train(cfg, run_dir, resume=resume, source=source, overrides=overrides)
        shutdown_process_group()
    except faults.Preempted as stop:
        shutdown_process_group()  # every process stopped at the same step
        if process_rank() == 0:  # rank 0 (torchrun) or instance 0 (poprun) wrote the checkpoint
            where = f"checkpoint {stop.checkpoint}" if stop.checkpoint is not None else "no checkpoint"
            print(f"stopped by {stop.signal_name} at step {stop.step}; {where}; resume with: "
                  f"python -m ipu_effnet train --resume {run_dir}", flush=True)
        return 0
    except UsageError:
        faults.remove_failed_run_dir(run_dir, existed)  # a bad config or data set leaves nothing behind
        raise
    return 0
