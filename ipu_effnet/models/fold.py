"""Inference-only rewrites of a trained model: BatchNorm folded into the preceding convolution, and
Proxy Norm's statistics computed once (`inference_copy` does both).

In eval mode BatchNorm is a fixed per-channel affine, y = (x - mean) / sqrt(var + eps) * gamma + beta,
so a convolution followed by it equals one convolution with weight W * s and bias beta - mean * s
(s = gamma / sqrt(var + eps), per output channel). Our norm modules combine normalisation and
activation (norms/layers.py), so a folded site becomes conv-with-bias followed by the module's own
activation; the BatchNorm pass over the activations disappears.

    from ipu_effnet.models.fold import inference_copy
    fast = inference_copy(model)   # an eval-only copy; `model` is left as it was

Proxy Norm's scale and shift (norms/proxy.py) depend on its parameters only, so once a model no longer
trains they are constants: `freeze_proxy_norm` replaces each ProxyNormAct with a FrozenProxyNormAct
that stores them (bitwise the same outputs) instead of recomputing them in every forward.

Only BatchNormAct2d sites directly after a convolution in our blocks are folded (the stem and head
ConvNormAct, MBConv's three and Fused-MBConv's two); GroupNorm, LayerNorm and Proxy Norm depend on the
batch's own statistics and stay. The copy must not be trained: its BatchNorm is gone, so it has no
running statistics to update, and its activations and squeeze-excite gates run in place (both
overwrite a tensor the block has just made and nothing else reads).
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple, Type

import torch
import torch.nn as nn

from norms import BatchNormAct2d
from norms.proxy import ProxyNormAct

from .blocks import CONV_NORM_SITES, MBConv, SqueezeExcite
from .padding import Conv2dSame, as_same

# (convolution, the norm module that follows it) inside each block type, in forward order.
FOLD_SITES: Dict[Type[nn.Module], Tuple[Tuple[str, str], ...]] = CONV_NORM_SITES


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to bn(conv(x)) with bn in eval mode. Arithmetic in float64, the
    result in the convolution's dtype and memory format."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_conv_bn: the BatchNorm has no running statistics to fold")
    weight = conv.weight
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    if isinstance(conv, Conv2dSame):  # TensorFlow's SAME padding stays (models/padding.py)
        fused = as_same(fused)
    new_weight = (weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        new_weight = new_weight.contiguous(memory_format=torch.channels_last)
    fused.weight = nn.Parameter(new_weight.to(weight.device), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
    return fused


def _inplace(act: nn.Module) -> nn.Module:
    """The activation in place where torch offers it: after a folded convolution its input is a fresh
    tensor nobody else reads, so overwriting it saves one allocation and one write per element."""
    if type(act) in (nn.SiLU, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Mish):
        return type(act)(inplace=True)
    return act


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every foldable BatchNorm merged into its convolution (see the
    module docstring); a model without BatchNorm comes back as an unchanged eval-mode copy."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        for conv_name, norm_name in FOLD_SITES.get(type(module), ()):
            conv, norm = getattr(module, conv_name), getattr(module, norm_name)
            if type(norm) is not BatchNormAct2d or not isinstance(conv, nn.Conv2d) or \
                    not norm.track_running_stats:
                continue
            setattr(module, conv_name, fold_conv_bn(conv, norm))
            setattr(module, norm_name, _inplace(norm.act))
    for module in folded.modules():
        if isinstance(module, MBConv) and isinstance(module.se, SqueezeExcite):
            module.se.inplace_gate = True  # its input is the block's fresh activation
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def freeze_proxy_norm(model: nn.Module) -> nn.Module:
    """Replace, in place, every ProxyNormAct of `model` by its frozen inference form; returns `model`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ProxyNormAct):
                setattr(module, name, child.frozen())
    return model


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy for inference only: BatchNorm folded (`fold_batchnorm`) and Proxy Norm's
    statistics frozen (`freeze_proxy_norm`). GroupNorm and LayerNorm stay as they are."""
    return freeze_proxy_norm(fold_batchnorm(model))


def count_batchnorm(model: nn.Module) -> int:
    """How many BatchNorm layers remain (0 after folding a BatchNorm EfficientNet)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
