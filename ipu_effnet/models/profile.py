"""Parameters, multiply-accumulates and activation sizes, per model and per module.

MACs are counted with forward hooks on Conv2d and Linear (one multiply-add = one MAC, the convention
of torchvision's "GFLOPS" figures): a convolution costs out_elements x (in_channels / groups) x kh x kw,
a linear layer out_elements x in_features. Normalisation, activations, pooling and the SE gating
multiply are not counted. By default the forward runs on the `meta` device, so profiling B7 at 600 px
costs shapes only, no arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn


@dataclass
class ModuleCost:
    path: str
    type: str
    params: int          # parameters owned by this module itself (not its children)
    macs: int            # per sample, Conv2d/Linear only
    out_shape: Tuple[int, ...]  # per sample (batch dimension removed)
    out_bytes: int       # per sample, at the dtype the forward ran in


@dataclass
class Profile:
    resolution: int
    params: int
    macs: int
    modules: List[ModuleCost] = field(default_factory=list)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def __post_init__(self) -> None:
        self._index = {m.path: m for m in self.modules}

    def module(self, path: str) -> ModuleCost:
        """The cost entry of one module path (KeyError if the model has no such module)."""
        return self._index[path]

    def totals(self, prefix: str) -> Tuple[int, int]:
        """(params, MACs) of the module at `prefix` and everything below it."""
        params = macs = 0
        for m in self.modules:
            if m.path == prefix or m.path.startswith(prefix + "."):
                params += m.params
                macs += m.macs
        return params, macs


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    per_sample = out[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


def profile_model(model: nn.Module, resolution: int, in_chans: Optional[int] = None) -> Profile:
    """Profile `model` at `resolution` x `resolution` with one sample, on the device its parameters
    are on (build the model under `torch.device("meta")` for a free profile). Eval mode, no grad; the
    model's training flag is restored afterwards."""
    param = next(model.parameters())
    if in_chans is None:
        in_chans = getattr(getattr(model, "stem", None), "conv", nn.Conv2d(3, 1, 1)).in_channels
    costs: Dict[str, ModuleCost] = {}
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, inputs: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        path = names[id(module)]
        costs[path] = ModuleCost(
            path=path,
            type=type(module).__name__,
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            macs=_macs(module, out),
            out_shape=tuple(out.shape[1:]),
            out_bytes=out[0].numel() * out.element_size(),
        )

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, resolution, resolution, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # Modules that never ran (Identity placeholders) still own no parameters; modules that own
    # parameters but did not run would be missing from the totals, so add them with zero MACs.
    for path, module in model.named_modules():
        if path not in costs:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            costs[path] = ModuleCost(path, type(module).__name__, own, 0, (), 0)
    ordered = [costs[path] for path, _ in model.named_modules()]
    ordered = [c for c in ordered if c.path]  # drop the root, whose own params are none
    return Profile(
        resolution=resolution,
        params=sum(p.numel() for p in model.parameters()),
        macs=sum(c.macs for c in ordered),
        modules=ordered,
    )


@dataclass
class StageRow:
    name: str        # "stem", "stage 0", ..., "head", "classifier"
    path: str        # module path prefix
    op: str
    channels: int
    repeats: int
    resolution: Tuple[int, int]  # output H, W
    params: int
    macs: int


def stage_table(model: nn.Module, profile: Profile) -> List[StageRow]:
    """One row per stem / stage / head / classifier, as in the papers' tables."""
    rows = []

    def row(name: str, path: str, op: str, repeats: int, out_path: str) -> StageRow:
        params, macs = profile.totals(path)
        shape = profile.module(out_path).out_shape
        chans = shape[0] if shape else 0
        res = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        return StageRow(name, path, op, chans, repeats, res, params, macs)

    rows.append(row("stem", "stem", "conv3x3", 1, "stem"))
    for i, stage in enumerate(model.block_args):
        first = stage[0]
        op = f"{'MBConv' if first.block == 'mbconv' else 'FusedMBConv'}{_fmt_ratio(stage)} k{first.kernel}"
        rows.append(row(f"stage {i}", f"blocks.{i}", op, len(stage), f"blocks.{i}.{len(stage) - 1}"))
    rows.append(row("head", "head", "conv1x1", 1, "head"))
    params, macs = profile.totals("classifier")
    num_classes = profile.module("classifier").out_shape[0]
    rows.append(StageRow("classifier", "classifier", "pool+fc", num_classes, 1, (1, 1), params, macs))
    return rows


def _fmt_ratio(stage: List[Any]) -> str:
    args = stage[-1]  # later blocks show the stage's own expansion (the first may differ in width only)
    ratio = args.mid_chs / args.in_chs
    return f"{ratio:g}" if ratio == int(ratio) else f"{ratio:.2f}"
