"""The building blocks: conv + norm + act, squeeze-excite, MBConv, Fused-MBConv, drop path.

Every normalisation site is created by `norms.make_norm_act`, so the same block code serves BatchNorm,
GroupNorm, LayerNorm and Proxy Norm. Optional parts are `nn.Identity()`, never `if` branches in forward,
so module paths are stable across variants (`conv_pw` exists, as an Identity, in a block without
expansion).

Module names inside a block (used by pipeline splits and fine-tuning, e.g. `blocks.3.0.conv_pw`):
  MBConv:       conv_pw, norm1 (expansion) -> conv_dw, norm2 (spatial) -> se -> conv_pwl, norm3 (projection)
  Fused-MBConv: conv_exp, norm1 (k x k expansion) -> se (Identity) -> conv_pwl, norm2 (projection)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from norms import NormSpec, get_act, make_norm_act

from .builder import BlockArgs


class ConvNormAct(nn.Module):
    """Convolution (no bias), then one norm + activation module (the stem and the head)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, norm: NormSpec, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, padding=kernel // 2, bias=False)
        self.norm = make_norm_act(norm, out_chs, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class SqueezeExcite(nn.Module):
    """Channel gating: global average, reduce to `se_chs` with the block's activation, expand, sigmoid.

    The width is a fraction of the block's *input* channels (EfficientNet), not of the expanded width
    it gates. Its inner activation is never normalised (Proxy Norm leaves it plain).
    """

    def __init__(self, chs: int, se_chs: int, act: str, inplace_gate: bool = False) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, se_chs, 1, bias=True)
        self.act = get_act(act)
        self.conv_expand = nn.Conv2d(se_chs, chs, 1, bias=True)
        # Gate x in place without autograd (saves one N x C x H x W tensor): only where x is always the
        # caller's own fresh activation, which nothing else reads (MBConv's norm2 output).
        self.inplace_gate = inplace_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # N, C, 1, 1
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        if self.inplace_gate and not torch.is_grad_enabled():
            return x.mul_(torch.sigmoid(s))
        return x * torch.sigmoid(s)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability `rate` during training,
    scaling the kept ones by 1 / (1 - rate)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


def _add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch. Without autograd (inference) the sum goes into `branch`, the block's own fresh
    output, saving an allocation; with autograd out of place, since some norms keep their output for
    the backward pass (Proxy Norm)."""
    if torch.is_grad_enabled():
        return x + branch
    return branch.add_(x)


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2/EfficientNet): 1x1 expansion, k x k grouped or depthwise
    convolution, squeeze-excite, 1x1 projection without activation; residual when the shape allows."""

    def __init__(self, args: BlockArgs, norm: NormSpec, act: str) -> None:
        super().__init__()
        expand = args.mid_chs != args.in_chs
        self.conv_pw = nn.Conv2d(args.in_chs, args.mid_chs, 1, bias=False) if expand else nn.Identity()
        self.norm1 = make_norm_act(norm, args.mid_chs, act=act) if expand else nn.Identity()
        self.conv_dw = nn.Conv2d(args.mid_chs, args.mid_chs, args.kernel, args.stride, padding=args.kernel // 2,
                                 groups=args.groups, bias=False)
        self.norm2 = make_norm_act(norm, args.mid_chs, act=act)
        self.se = SqueezeExcite(args.mid_chs, args.se_chs, act, inplace_gate=True) if args.se_chs else nn.Identity()
        self.conv_pwl = nn.Conv2d(args.mid_chs, args.out_chs, 1, bias=False)
        self.norm3 = make_norm_act(norm, args.out_chs, act=act, apply_act=False)
        self.has_residual = args.stride == 1 and args.in_chs == args.out_chs
        self.drop_path = _drop_path(args.drop_path_rate) if self.has_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv_pw(x))
        y = self.norm2(self.conv_dw(y))
        y = self.se(y)
        y = self.norm3(self.conv_pwl(y))
        if self.has_residual:
            y = _add_residual(x, self.drop_path(y))
        return y


class FusedMBConv(nn.Module):
    """Fused-MBConv (EfficientNetV2): one k x k convolution replaces expansion + depthwise, then a 1x1
    projection without activation. With expansion 1 it is a single k x k conv + norm + act."""

    def __init__(self, args: BlockArgs, norm: NormSpec, act: str) -> None:
        super().__init__()
        expand = args.mid_chs != args.in_chs
        exp_out = args.mid_chs if expand else args.out_chs
        self.conv_exp = nn.Conv2d(args.in_chs, exp_out, args.kernel, args.stride, padding=args.kernel // 2, bias=False)
        self.norm1 = make_norm_act(norm, exp_out, act=act)
        self.se = nn.Identity()  # Fused-MBConv has no squeeze-excite in EfficientNetV2
        self.conv_pwl = nn.Conv2d(args.mid_chs, args.out_chs, 1, bias=False) if expand else nn.Identity()
        self.norm2 = make_norm_act(norm, args.out_chs, act=act, apply_act=False) if expand else nn.Identity()
        self.has_residual = args.stride == 1 and args.in_chs == args.out_chs
        self.drop_path = _drop_path(args.drop_path_rate) if self.has_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv_exp(x))
        y = self.se(y)
        y = self.norm2(self.conv_pwl(y))
        if self.has_residual:
            y = _add_residual(x, self.drop_path(y))
        return y


BLOCKS = {"mbconv": MBConv, "fused": FusedMBConv}

# (convolution, the norm module that takes its output) inside each block type, in forward order: the
# convolution's output goes to that norm and nowhere else.
CONV_NORM_SITES = {
    ConvNormAct: (("conv", "norm"),),
    MBConv: (("conv_pw", "norm1"), ("conv_dw", "norm2"), ("conv_pwl", "norm3")),
    FusedMBConv: (("conv_exp", "norm1"), ("conv_pwl", "norm2")),
}


def mark_fresh_inputs(model: nn.Module) -> nn.Module:
    """Tell each norm that directly follows a convolution in our blocks that its input is that
    convolution's fresh output (`fresh_input`, see norms/layers.py: BatchNorm then runs in place in
    eval mode without autograd). Returns `model`."""
    for module in model.modules():
        for conv_name, norm_name in CONV_NORM_SITES.get(type(module), ()):
            conv, norm = getattr(module, conv_name), getattr(module, norm_name)
            if isinstance(conv, nn.Conv2d) and hasattr(norm, "fresh_input"):
                norm.fresh_input = True
    return model
