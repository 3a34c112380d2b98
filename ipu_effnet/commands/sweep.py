"""`sweep`: a checkpoint's top-1 at a list of test resolutions, as sweep.csv and sweep.png.

    python -m ipu_effnet sweep --checkpoint RUN_DIR_OR_FILE [--res 128,160,192] [--averaged] [--out DIR]

Default resolutions: 0.5x to 1.5x the training resolution in steps of 32 px (8 px below 128 px); the
output directory defaults to the run directory (the checkpoint's, for a file inside checkpoints/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (its final one)")
    parser.add_argument("--res", default=None, metavar="R1,R2,...",
                        help="test resolutions (default: 0.5x to 1.5x the training resolution in steps of 32 px)")
    parser.add_argument("--averaged", action="store_true", help="sweep the weight-averaged model")
    parser.add_argument("--out", default=None, help="where sweep.csv and sweep.png go (default: the run directory)")
    parser.add_argument("--batch", type=int, default=None, help="evaluation batch size (default: the micro-batch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the stored config, e.g. --set data.path=/data/imagenet")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true")


def default_out_dir(checkpoint: Path) -> Path:
    if checkpoint.is_dir():
        return checkpoint
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.analysis.sweep import format_sweep, parse_resolutions, sweep_checkpoint, write_sweep

    path = Path(args.checkpoint)
    if not path.exists():
        raise UsageError(f"--checkpoint {path}: no such file or directory")
    resolutions = parse_resolutions(args.res) if args.res else None
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch {args.batch}: must be at least 1")
    info: dict = {}
    rows = sweep_checkpoint(path, resolutions, averaged=args.averaged, overrides=args.overrides, batch=args.batch,
                            progress=not args.no_progress, info=info)
    out_dir = Path(args.out) if args.out else default_out_dir(path)
    title = f"{info.get('model') or 'model'}: top-1 against test resolution" + (" (averaged)" if args.averaged else "")
    csv_path, png_path = write_sweep(rows, out_dir, info["train_resolution"], info["test_resolution"], title)
    if args.json:
        print(json.dumps({**info, "rows": rows, "csv": str(csv_path), "png": str(png_path)}, indent=2))
    else:
        print(f"{info['checkpoint']} (trained at {info['train_resolution']} px)")
        print(format_sweep(rows, info["train_resolution"]))
        print(f"wrote {csv_path} and {png_path}")
    return 0
