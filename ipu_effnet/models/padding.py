"""TensorFlow's SAME padding for the strided convolutions (`model.padding: same`).

The blocks pad every k x k convolution symmetrically by k // 2. TensorFlow's SAME padding pads so that
the output has ceil(in / stride) pixels, with the odd pixel of an odd total on the right and bottom:

    total = max((ceil(in / s) - 1) * s + (k - 1) * d + 1 - in, 0),  before = total // 2,  after = total - before

For stride 1 and an odd kernel that is k // 2 on each side, the symmetric padding, so only strided
convolutions differ: a 3 x 3 stride-2 convolution over an even input pads (0, 1) instead of (1, 1), and a
5 x 5 one (1, 2) instead of (2, 2). Weights trained in TensorFlow (the EfficientNet reference code, and
the PyTorch ports that keep its numerics: `efficientnet_pytorch`, timm's `tf_efficientnet_*`) compute
what they were trained to compute only with this padding.

`use_same_padding(model)` replaces, in place, each strided `nn.Conv2d` of a built model by a
`Conv2dSame` holding the same parameters (same names, so state dicts are unchanged); the amount is
computed from each input's size, so the model runs at any resolution.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Conv2dSame", "same_pads", "use_same_padding"]


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """(before, after) padding of one spatial dimension under TensorFlow's SAME rule."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow's SAME padding computed from the input's size (no built-in padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pads(int(x.shape[-2]), self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_pads(int(x.shape[-1]), self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def as_same(conv: nn.Conv2d) -> Conv2dSame:
    """A Conv2dSame with `conv`'s parameters (the same tensors) and no built-in padding."""
    same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                      conv.groups, bias=conv.bias is not None, device="meta")
    same.weight = conv.weight
    same.bias = conv.bias
    return same


def use_same_padding(model: nn.Module) -> List[str]:
    """Give every strided convolution of `model` SAME padding, in place; returns their module paths."""
    changed = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d and max(child.stride) > 1:
                setattr(module, name, as_same(child))
                changed.append(f"{path}.{name}" if path else name)
    return changed
