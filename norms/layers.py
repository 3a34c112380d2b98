"""Normalisation + activation modules for the plain (non-proxy) kinds.

Each module normalises, applies the per-channel affine and then the activation, so a block holds one
module per normalisation site (the shape timm's `norm_act.py` uses, and the shape Proxy Norm needs,
since its renormalisation comes after the activation).

The classes subclass the torch layers they wrap, so their state_dict keys are the familiar ones
(`weight`, `bias`, `running_mean`, ...) and BatchNorm folding can treat them as BatchNorm2d.

Without autograd (eval under no_grad or inference_mode) the activation runs in place on the norm's fresh
output (`act.act_fresh`). A BatchNormAct2d whose `fresh_input` is set (the model does this where its input
is a convolution's output that nothing else reads) also normalises in place in eval mode: the same
kernel with its output aliased to its input, bit for bit the out-of-place result, without the allocation
of a new tensor, which on the CPU costs more than the normalisation itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act import act_fresh, get_act
from .proxy_ops import autocast_active, plain_ops_only
from .spec import check_group_count

# The out= form of torch's batch norm (its output may alias its input: the eval-mode transform is
# element-wise); None where this torch lacks it, and then the layer stays out of place.
_BATCH_NORM_OUT = getattr(torch.ops.aten.native_batch_norm, "out", None)


def _compiling() -> bool:
    """True while torch.compile traces (torch >= 2.1 says so; 2.0 has no torch.compiler)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation (nn.Identity when apply_act is False).

    fresh_input: the caller promises that the input is its own fresh tensor that nothing reads after
    this layer, so that without autograd, in eval mode, it may be overwritten (module docstring).
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 act: Optional[str] = "silu", apply_act: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.act = get_act(act if apply_act else None)
        self.fresh_input = False

    def _normalise_in_place(self, x: torch.Tensor) -> bool:
        return (self.fresh_input and not self.training and not torch.is_grad_enabled()
                and _BATCH_NORM_OUT is not None and self.running_mean is not None
                and self.running_var is not None and x.dtype == self.running_mean.dtype
                and not plain_ops_only(x) and not autocast_active(x) and not _compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._normalise_in_place(x):
            self._check_input_dim(x)
            _BATCH_NORM_OUT(x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0,
                            self.eps, out=x, save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
            return act_fresh(self.act, x)
        return act_fresh(self.act, super().forward(x))


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (LayerNorm over C, H, W when num_groups == 1) followed by an activation."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-3,
                 act: Optional[str] = "silu", apply_act: bool = True) -> None:
        check_group_count(num_channels, num_groups)
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = get_act(act if apply_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return act_fresh(self.act, F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ActOnly(nn.Module):
    """Norm kind "none": no normalisation and no parameters, only the activation."""

    def __init__(self, num_channels: int, act: Optional[str] = "silu", apply_act: bool = True) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.act = get_act(act if apply_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)
