"""Activation functions by name, so that configs and model constructors can say `act="silu"`."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch.nn as nn

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
