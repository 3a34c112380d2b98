"""`check`: validate a recipe before spending compute.

    python -m ipu_effnet check --config configs/efficientnet-b0-g16-gn.yaml [--set key=value ...] [--out DIR]

Loads the recipe with its bases and overrides, builds the model it describes (on the `meta` device:
shapes only), checks that every module path it names (pipeline splits, recomputation points, the first
fine-tuned layer) exists, prints a summary and the resolved config, and with `--out` writes the resolved
`config.yaml` into that directory. Any problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Dict, List, Sequence

from ipu_effnet.errors import UsageError


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--config and --set, shared by every command that reads a recipe."""
    parser.add_argument("--config", required=required, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="write the resolved config.yaml into this directory")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def check_module_paths(model, paths: Dict[str, Sequence[str]], source: str = "") -> None:
    """Every path named under a config key must be a module of the built model; `source`: the file
    (or --set) the error names first."""
    valid = [name for name, _ in model.named_modules() if name]
    known = set(valid)
    for key, names in paths.items():
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, valid, n=3)
                hint = f"; closest: {', '.join(close)}" if close else "; see `python -m ipu_effnet info --model NAME --modules`"
                prefix = f"{source}: " if source else ""
                raise UsageError(f"{prefix}{key} = {name!r} names no module of the model{hint}")


def resolve(config_path: str, overrides: Sequence[str]):
    """(cfg, model on meta, resolution) for a recipe; every problem raises UsageError."""
    import torch

    from ipu_effnet.config import load, model_kwargs
    from ipu_effnet.models import create_model

    cfg = load(config_path, overrides)
    name, kwargs = model_kwargs(cfg)
    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except ValueError as exc:
        key = ""
        if "group_size" in str(exc) and cfg.model.group_size is not None:
            key = f"model.group_size = {cfg.model.group_size}: "  # the key to change, named first
        raise UsageError(f"{config_path}: {key}model {name!r}: {exc}") from None
    paths: Dict[str, List[str]] = {
        "ipu.pipeline_splits": list(cfg.ipu.pipeline_splits),
        "ipu.recompute": list(cfg.ipu.recompute),
        "finetune.first_trainable": [cfg.finetune.first_trainable] if cfg.finetune.first_trainable else [],
    }
    for key, names in paths.items():  # named by where the value came from: --set, or the recipe file
        set_here = any(str(o).partition("=")[0].strip() == key for o in overrides)
        check_module_paths(model, {key: names}, source="--set" if set_here else config_path)
    resolution = cfg.model.resolution or model.train_resolution
    return cfg, model, resolution


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.backends import DistInfo, batch_layout
    from ipu_effnet.config import dump, write_resolved
    from ipu_effnet.models.profile import profile_model

    cfg, model, resolution = resolve(args.config, args.overrides)
    profile = profile_model(model, resolution)
    # the layout of one process: IPUs add replicas (and poprun instances share them); torch and the
    # pipeline backend take micro-batch x accumulation per process (x torchrun ranks for DDP)
    ipu = cfg.backend == "ipu"
    layout = batch_layout("ipu" if ipu else "torch", cfg, model, DistInfo())
    summary = {
        "config": args.config,
        "overrides": list(args.overrides),
        "model": cfg.model.name,
        "norm": cfg.norm.label,
        "recipe": cfg.recipe,
        "backend": cfg.backend,
        "resolution": resolution,
        "params": profile.params,
        "gmacs": round(profile.gmacs, 6),
        "global_batch": layout.global_batch,
    }
    if args.out:
        summary["written"] = str(write_resolved(cfg, args.out, source=args.config, overrides=args.overrides))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"# {args.config}: OK")
    print(f"# model {summary['model']} ({summary['norm']}), {profile.params:,} params, "
          f"{profile.gmacs:.3f} GMACs at {resolution} px; recipe {cfg.recipe}, backend {cfg.backend}; "
          f"global batch {summary['global_batch']} (micro-batch x accumulation"
          f"{' x replicas' if ipu else ' per process'})")
    if args.out:
        print(f"# resolved config written to {summary['written']}")
    print(dump(cfg), end="")
    return 0
