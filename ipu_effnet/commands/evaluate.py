"""`evaluate`: top-1, top-5 and loss of a checkpoint at any resolution, over the whole validation set.

    python -m ipu_effnet evaluate --checkpoint RUN_DIR_OR_FILE [--res R] [--averaged] [--json]

The checkpoint rebuilds its own model (its constructor arguments are stored in it) and carries the
resolved config, whose data section says which validation set to use (`--set data.path=...` changes it).
"""

from __future__ import annotations

import argparse
import json

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (its newest)")
    parser.add_argument("--res", type=int, help="test resolution (default: the run's evaluation resolution)")
    parser.add_argument("--averaged", action="store_true", help="evaluate the weight-averaged model")
    parser.add_argument("--batch", type=int, default=None, help="evaluation batch size (default: the micro-batch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the stored config, e.g. --set data.path=/data/imagenet")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from ipu_effnet.data import create_dataset, create_loader
    from ipu_effnet.resolutions import eval_resolution
    from ipu_effnet.run.run_dirs import load_run_checkpoint
    from ipu_effnet.training.checkpoint import rebuild_model
    from ipu_effnet.training.evaluation import evaluate, inference_model

    path, ckpt, cfg = load_run_checkpoint(args.checkpoint, args.overrides)
    res = args.res or eval_resolution(cfg)
    if res < 32:
        raise UsageError(f"--res {res}: the resolution must be at least 32")
    model = rebuild_model(ckpt, averager="epoch" if args.averaged else None)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    val_set = create_dataset(cfg.data, "validation", res, train=False, num_classes=model.num_classes,
                             seed=cfg.train.seed)
    loader = create_loader(val_set, args.batch or cfg.train.micro_batch, train=False, workers=cfg.data.workers,
                           seed=cfg.train.seed)
    out = evaluate(inference_model(model), loader, device, cfg.train.precision)
    out.update({"checkpoint": str(path), "resolution": res, "averaged": bool(args.averaged)})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{path} at {res} px{' (averaged)' if args.averaged else ''}: top-1 {out['top1']:.2%}, "
              f"top-5 {out['top5']:.2%}, loss {out['loss']:.4f} over {out['samples']} images")
    return 0
