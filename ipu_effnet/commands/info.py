"""`info`: parameters, GMACs and the per-stage table of a model at a resolution.

    python -m ipu_effnet info --model efficientnet_b0 [--res 224] [--norm group] [--modules] [--json]

The model is built on the `meta` device, so even B7 at 600 px answers in well under a second.
By default the figures are at the variant's native test resolution (the training resolution for
B0..B7; 384 / 480 for EfficientNetV2, whose published figures are at test resolution).
"""

from __future__ import annotations

import argparse
import json

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the model names and their native resolutions")
    parser.add_argument("--family", action="store_true",
                        help="print the family table (G1 beside G16, and V2) as Markdown, as in the README")
    parser.add_argument("--res", type=int, default=None, help="input resolution (default: the model's native test resolution)")
    parser.add_argument("--norm", default="batch", help="batch | group | layer | none, +proxy for Proxy Norm (default: batch)")
    parser.add_argument("--group-size", type=int, default=None, help="channels per group of the spatial convolutions")
    parser.add_argument("--expand-ratio", type=float, default=None, help="expansion of the inverted-residual stages")
    parser.add_argument("--fit-group-size", action="store_true", default=None,
                        help="where the group size does not divide a convolution's channels, use max(C // group size, 1) groups")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--modules", action="store_true", help="also list every module path with its params, MACs and output shape")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def model_from_args(args: argparse.Namespace, device: str = "meta"):
    """Build the model `info`-style options describe; bad options raise UsageError."""
    import torch

    from ipu_effnet.models import create_model

    try:
        with torch.device(device):
            return create_model(args.model, num_classes=args.num_classes, norm=args.norm,
                                group_size=args.group_size, expand_ratio=args.expand_ratio,
                                fit_group_size=args.fit_group_size)
    except (ValueError, NotImplementedError) as exc:
        raise UsageError(str(exc)) from None


def list_models_text() -> str:
    from ipu_effnet.models import get_model_def, list_models

    lines = [f"{'model':<22}{'train res':>10}{'test res':>10}  group size / expansion"]
    for name in list_models(include_extra=True):
        mdef = get_model_def(name)
        lines.append(f"{name:<22}{mdef.train_res:>10}{mdef.eval_res:>10}  {mdef.group_size} / "
                     f"{mdef.expand_ratio or 'table'}")
    return "\n".join(lines)


def family_table(norm: str = "batch") -> str:
    """Markdown: params and GMACs at native resolution for B0..B7 beside their G16 variants, and V2."""
    import torch

    from ipu_effnet.models import create_model
    from ipu_effnet.models.profile import profile_model

    def measure(name: str):
        with torch.device("meta"):
            model = create_model(name, norm=norm)
        return model, profile_model(model, model.eval_resolution)

    lines = ["| model | resolution | params (G1) | GMACs (G1) | params (G16) | GMACs (G16) |",
             "|---|---|---|---|---|---|"]
    for i in range(8):
        model, g1 = measure(f"efficientnet_b{i}")
        _, g16 = measure(f"efficientnet_b{i}_g16")
        lines.append(f"| B{i} | {g1.resolution} | {g1.params:,} | {g1.gmacs:.3f} | {g16.params:,} | {g16.gmacs:.3f} |")
    for size in "sml":
        model, prof = measure(f"efficientnetv2_{size}")
        lines.append(f"| V2-{size.upper()} | {model.train_resolution} train / {prof.resolution} test | {prof.params:,} | "
                     f"{prof.gmacs:.3f} | | |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.models.profile import profile_model, stage_table
    from norms import NormSpec

    if args.list:
        print(list_models_text())
        return 0
    if args.family:
        print(family_table(args.norm))
        return 0
    if not args.model:
        raise UsageError("info needs --model NAME (or --list to see the names, --family for the family table)")
    model = model_from_args(args)
    res = args.res if args.res is not None else model.eval_resolution
    if res < 32:
        raise UsageError(f"--res {res}: the resolution must be at least 32 (five stride-2 stages)")
    profile = profile_model(model, res)
    rows = stage_table(model, profile)
    margs = model.model_args
    if args.json:
        out = {
            "model": args.model,
            "params": profile.params,
            "macs": profile.macs,
            "gmacs": round(profile.gmacs, 6),
            "resolution": res,
            "train_resolution": model.train_resolution,
            "eval_resolution": model.eval_resolution,
            "norm": margs["norm"],
            "group_size": margs["group_size"],
            "expand_ratio": margs["expand_ratio"],
            "stages": [
                {"name": r.name, "path": r.path, "op": r.op, "channels": r.channels, "repeats": r.repeats,
                 "resolution": list(r.resolution), "params": r.params, "macs": r.macs}
                for r in rows
            ],
        }
        if args.modules:
            out["modules"] = [
                {"path": m.path, "type": m.type, "params": m.params, "macs": m.macs, "out_shape": list(m.out_shape)}
                for m in profile.modules
            ]
        print(json.dumps(out, indent=2))
        return 0

    norm = margs["norm"]
    norm_txt = NormSpec(**norm).label
    print(f"{args.model}: norm {norm_txt}, group size {margs['group_size']}, "
          f"expansion {margs['expand_ratio'] or 'as the table'}, drop rate {margs['drop_rate']}")
    print(f"params {profile.params:,}   GMACs {profile.gmacs:.3f} at {res}x{res} "
          f"(native: train {model.train_resolution}, test {model.eval_resolution})")
    print()
    header = f"{'stage':<11}{'op':<18}{'channels':>9}{'repeats':>8}{'out res':>10}{'params':>13}{'GMACs':>9}{'share':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        share = r.macs / profile.macs if profile.macs else 0.0
        print(f"{r.name:<11}{r.op:<18}{r.channels:>9}{r.repeats:>8}{r.resolution[0]:>6}x{r.resolution[1]:<3}"
              f"{r.params:>13,}{r.macs / 1e9:>9.3f}{share:>7.1%}")
    if args.modules:
        print()
        print(f"{'module path':<28}{'type':<16}{'params':>11}{'MMACs':>10}  output (C, H, W)")
        for m in profile.modules:
            if m.params or m.macs or m.path.count(".") <= 2:
                shape = "x".join(str(d) for d in m.out_shape)
                print(f"{m.path:<28}{m.type:<16}{m.params:>11,}{m.macs / 1e6:>10.2f}  {shape}")
    return 0
