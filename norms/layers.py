"""Normalisation + activation modules for the plain (non-proxy) kinds.

Each module normalises, applies the per-channel affine and then the activation, so a block holds one
module per normalisation site (the shape timm's `norm_act.py` uses, and the shape Proxy Norm needs,
since its renormalisation comes after the activation).

The classes subclass the torch layers they wrap, so their state_dict keys are the familiar ones
(`weight`, `bias`, `running_mean`, ...) and BatchNorm folding can treat them as BatchNorm2d.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act import get_act


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation (nn.Identity when apply_act is False)."""

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 act: Optional[str] = "silu", apply_act: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.act = get_act(act if apply_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (LayerNorm over C, H, W when num_groups == 1) followed by an activation."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-3,
                 act: Optional[str] = "silu", apply_act: bool = True) -> None:
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm with {num_groups} groups needs a channel count divisible by {num_groups}; "
                f"got {num_channels} channels")
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = get_act(act if apply_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ActOnly(nn.Module):
    """Norm kind "none": no normalisation and no parameters, only the activation."""

    def __init__(self, num_channels: int, act: Optional[str] = "silu", apply_act: bool = True) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.act = get_act(act if apply_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)
