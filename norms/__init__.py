"""Normalisation layers for ipu_effnet: BatchNorm, GroupNorm, LayerNorm, none, and Proxy Norm.

    from norms import NormSpec, make_norm_act
    spec = NormSpec(kind="group", groups=4)
    layer = make_norm_act(spec, num_channels=64, act="silu")   # norm -> affine -> activation

`make_norm_act` is the only way blocks create a normalisation site, so the choice of normalisation is
made once (a NormSpec) and every block follows it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Optional, Union

from .spec import BATCH_INDEPENDENT_KINDS, NORM_KINDS, NormSpec, as_norm_spec

if TYPE_CHECKING:
    import torch.nn as nn

    from .act import ACT_NAMES, get_act
    from .layers import ActOnly, BatchNormAct2d, GroupNormAct

# The names that need torch load on first use, so that `NormSpec` (and with it the config, whose `norm`
# section it is) imports without torch.
_TORCH_NAMES = {"ACT_NAMES": "act", "get_act": "act", "ActOnly": "layers", "BatchNormAct2d": "layers",
                "GroupNormAct": "layers"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        value = getattr(importlib.import_module(f".{_TORCH_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_TORCH_NAMES))


__all__ = [
    "ACT_NAMES",
    "BATCH_INDEPENDENT_KINDS",
    "NORM_KINDS",
    "ActOnly",
    "BatchNormAct2d",
    "GroupNormAct",
    "NormSpec",
    "as_norm_spec",
    "get_act",
    "make_norm_act",
]


def make_norm_act(spec: Union[NormSpec, str, None], num_channels: int, act: Optional[str] = "silu",
                  apply_act: bool = True) -> nn.Module:
    """One module that normalises `num_channels` channels, applies the affine and the activation.

    apply_act=False gives the normalisation alone (the projection conv of MBConv).
    """
    from .layers import ActOnly, BatchNormAct2d, GroupNormAct

    spec = as_norm_spec(spec)
    if spec.proxy:
        from .proxy import make_proxy_norm_act

        return make_proxy_norm_act(spec, num_channels, act=act, apply_act=apply_act)
    if spec.kind == "batch":
        return BatchNormAct2d(num_channels, eps=spec.eps, momentum=spec.momentum, act=act, apply_act=apply_act)
    if spec.kind in ("group", "layer"):
        return GroupNormAct(num_channels, spec.num_groups, eps=spec.eps, act=act, apply_act=apply_act)
    return ActOnly(num_channels, act=act, apply_act=apply_act)
