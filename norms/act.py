"""Activation functions by name, so that configs and model constructors can say `act="silu"`."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTS: Dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

ACT_NAMES = tuple(sorted(_ACTS))


def get_act(name: Optional[str]) -> nn.Module:
    """A fresh activation module; None or "identity" gives nn.Identity()."""
    if name is None:
        return nn.Identity()
    try:
        return _ACTS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACT_NAMES)}") from None


# The in-place form of each activation module that has one (exact types: a subclass may change forward).
_INPLACE: Dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.SiLU: lambda x: F.silu(x, inplace=True),
    nn.ReLU: lambda x: F.relu(x, inplace=True),
    nn.ReLU6: lambda x: F.relu6(x, inplace=True),
    nn.Hardswish: lambda x: F.hardswish(x, inplace=True),
    nn.Mish: lambda x: F.mish(x, inplace=True),
}


def act_fresh(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(x) for an x that only the caller holds (a normalisation's freshly made output).

    Without autograd (eval under no_grad or inference_mode) the activation overwrites x: the same
    values, one allocation and one pass over memory fewer, which on the CPU is most of an element-wise
    op's cost. With autograd it stays out of place: SiLU's backward needs its input, so torch would
    copy x before an in-place SiLU, which saves nothing.
    """
    if not torch.is_grad_enabled():
        inplace = _INPLACE.get(type(act))
        if inplace is not None:
            return inplace(x)
    return act(x)
