"""Proxy Norm: batch-independent normalisation that behaves like BatchNorm.

Labatie, Masters, Eaton-Rosen, Luschi, "Proxy-Normalizing Activations to Match Batch Normalization while
Removing Batch Dependence", NeurIPS 2021 (arXiv 2106.03743), section 4 ("Proxy Normalization", Figure 3
"Plugging PN"); docs/norms.md describes the design and its measurements.

GroupNorm and LayerNorm normalise each sample on its own, so they never look at the batch; the price is
that, after the activation, a channel's output is no longer centred and scaled across the data set the way
it is under BatchNorm (the paper's "channel-wise collapse"). Proxy Norm repairs that after the activation,
without looking at the batch either: it asks what the activation would do to a standard-normal *proxy*
variable passed through the same per-channel affine, and renormalises the real activation with the proxy's
mean and variance:

    x_hat = Norm(x)                                      GroupNorm / LayerNorm, no affine of its own
    z     = act(gamma * x_hat + beta)
    y     = (1 + gamma_t) * r + beta_t                   r: P fixed standard-normal quantiles
    m, v  = mean_r act(gamma * y + beta), var_r act(gamma * y + beta)      (per channel)
    out   = (z - m) / sqrt(v + eps)

Choices, and why:

- r is the P (default 200) quantiles sqrt(2) * erfinv(2 (i + 0.5) / P - 1), i = 0..P-1, not random
  samples: the statistics are then deterministic functions of the parameters. v is the biased variance
  over the P points (dividing by P): that is what reproduces the reference values at initialisation with
  SiLU, mean 0.206048 and variance 0.310004 (the unbiased variance would give 0.311561).
- gamma = 1, beta = 0, gamma_t = beta_t = 0 at initialisation, so the proxy starts as N(0, 1).
- The statistics cost O(channels x points) per step and depend on the four per-channel parameters only,
  never on the input: the layer is batch-independent. Gradients reach gamma, beta, gamma_t and beta_t
  through m and v by ordinary autograd (the reference derives them by hand).
- The statistics are computed in fp32 (fp64 if the module is fp64) even when the module was converted with
  `.half()`: the quantile buffer is rebuilt in fp32 whenever the module is moved or cast (`_apply`), the
  per-channel parameters are cast up for the O(C x P) work, and only the final per-channel scale and shift
  are cast back to the input dtype.
- Per element: GroupNorm with the affine inside `F.group_norm`, the activation, and one scale-and-shift,
  (z - m) / sqrt(v + eps) = z * s + t with s = 1 / sqrt(v + eps), t = -m * s per channel, instead of a
  subtraction and a division over the whole tensor. `impl` chooses how that runs (norms/proxy_ops.py):
  "gn_silu" (SiLU: one autograd node, in place, the default), "inplace" (other activations that allow it)
  or "reference" (plain differentiable ops: twice differentiable, and what a backend that differentiates
  the traced forward itself, such as poptorch, should get). All three give the same values and gradients.

Placement in the blocks (the paper's section 4 and Figure 3; the blocks call `make_norm_act` at every site, so the
placement follows from `make_proxy_norm_act`):

- Every normalisation followed by an activation (stem, MBConv expansion and depthwise, Fused-MBConv
  expansion, head) becomes `ProxyNormAct`: norm, affine, activation, proxy renormalisation.
- The projection conv of MBConv / Fused-MBConv has no activation (`apply_act=False`), so there is nothing
  for a proxy to renormalise: its norm becomes `GroupNormScale`, a per-channel scale without a shift and
  without a proxy step, as in the reference.
- The squeeze-excitation layer's inner activation acts on pooled vectors, never goes through
  `make_norm_act`, and stays plain.

Weight decay: the reference decays gamma_t and beta_t but not gamma and beta; both classes declare this in
`decay_params`, which `ipu_effnet.training.param_groups` reads.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act import get_act
from .proxy_ops import (
    check_impl,
    default_impl,
    group_norm_act_scale_shift,
    plain_ops_only,
    proxy_moments,
    proxy_scale_shift,
)
from .spec import NormSpec, check_group_count

__all__ = ["FrozenProxyNormAct", "GroupNormScale", "ProxyNormAct", "batched_proxy_scale_shift", "make_proxy_norm_act",
           "shared_proxy_stats", "standard_normal_quantiles"]


def standard_normal_quantiles(num_points: int, dtype: torch.dtype = torch.float32,
                              device: Optional[torch.device] = None) -> torch.Tensor:
    """The `num_points` evenly spaced quantiles of N(0, 1): sqrt(2) * erfinv(2 (i + 0.5) / P - 1).

    Computed in float64 on the CPU and then cast, so every device and dtype gets the same points.
    """
    if num_points < 2:
        raise ValueError(f"Proxy Norm needs at least 2 points, got {num_points}")
    i = torch.arange(num_points, dtype=torch.float64, device="cpu")  # explicit: ignore a torch.device context
    points = math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / num_points - 1.0)
    return points.to(device=device, dtype=dtype)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and bfloat16 (and fp32), fp64 for fp64: never below single precision."""
    return torch.promote_types(dtype, torch.float32)


class ProxyNormAct(nn.Module):
    """GroupNorm (LayerNorm when num_groups == 1) without affine, affine, activation, Proxy Norm.

    Parameters (all per channel, shape (C,)):
        weight, bias:             gamma and beta of the affine before the activation (init 1, 0)
        proxy_weight, proxy_bias: gamma_t and beta_t of the proxy variable (init 0, 0)
    Buffer (not saved in the state_dict: it is a function of `num_points`):
        proxy_points:             the P standard-normal quantiles, kept in fp32 or fp64

    Input (N, C, *) in any float dtype; output has the input's shape and dtype.
    """

    # 1-D parameters that the optimiser should decay (see ipu_effnet.training.param_groups).
    decay_params: Tuple[str, ...] = ("proxy_weight", "proxy_bias")

    def __init__(self, num_channels: int, num_groups: int = 1, eps: float = 1e-3, act: Optional[str] = "silu",
                 proxy_eps: float = 0.03, num_points: int = 200, impl: Optional[str] = None) -> None:
        super().__init__()
        check_group_count(num_channels, num_groups)
        if not proxy_eps > 0:
            raise ValueError(f"Proxy Norm eps must be > 0, got {proxy_eps}")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.proxy_eps = proxy_eps
        self.num_points = num_points
        self.act = get_act(act)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("proxy_points", standard_normal_quantiles(num_points, device=self.weight.device),
                             persistent=False)
        # How the per-element work runs (norms/proxy_ops.py); same values and gradients either way.
        self.impl = default_impl(self.act) if impl is None else check_impl(impl, self.act)
        # (s, t) computed for this forward together with the other layers' (`shared_proxy_stats`).
        self.shared_scale_shift: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _apply(self, fn, *args, **kwargs):
        # `.half()`, `.to(dtype)`, `.cuda()` all come through here. Let torch move/cast everything, then
        # rebuild the quantiles at full precision on the buffer's new device: a cast to fp16 and back
        # would keep only ~3 significant digits of the points.
        super()._apply(fn, *args, **kwargs)
        points = self.proxy_points
        self.proxy_points = standard_normal_quantiles(self.num_points, dtype=_stats_dtype(points.dtype),
                                                      device=points.device)
        return self

    def _stats_params(self) -> Tuple[torch.Tensor, ...]:
        """gamma, beta, gamma_t, beta_t and the points, in the statistics dtype (fp32, or fp64)."""
        dtype = _stats_dtype(self.weight.dtype)
        return (self.weight.to(dtype), self.bias.to(dtype), self.proxy_weight.to(dtype),
                self.proxy_bias.to(dtype), self.proxy_points.to(dtype))

    def proxy_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and (biased) variance of act(gamma * y + beta) over the proxy points.

        Shapes (C,), in fp32 (fp64 for an fp64 module); differentiable in all four parameters.
        """
        return proxy_moments(*self._stats_params(), self.act)

    def proxy_scale_shift(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """s, t with (z - m) / sqrt(v + eps) == z * s + t; shapes (C,), in the statistics dtype."""
        return proxy_scale_shift(*self._stats_params(), self.act, self.proxy_eps, self.impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_scale_shift
        s, t = self.proxy_scale_shift() if shared is None else shared
        return group_norm_act_scale_shift(x, self.num_groups, self.weight, self.bias, self.eps, self.act, s, t,
                                          self.impl)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, proxy_eps={self.proxy_eps}, "
                f"points={self.num_points}, impl={self.impl}")

    @torch.no_grad()
    def frozen(self) -> FrozenProxyNormAct:
        """An inference-only copy with the proxy's scale and shift computed once (see FrozenProxyNormAct)."""
        s, t = self.proxy_scale_shift()
        return FrozenProxyNormAct(self.num_groups, self.weight, self.bias, self.eps, self.act, s, t, self.impl)


def _batch_key(layer: ProxyNormAct) -> Tuple:
    """Layers whose statistics can be computed as one: the same activation, eps, points and dtype."""
    points = layer.proxy_points
    return (repr(layer.act), type(layer.act), layer.proxy_eps, layer.num_points, layer.impl == "reference",
            _stats_dtype(layer.weight.dtype), points.dtype, points.device)


def batched_proxy_scale_shift(layers: Sequence[ProxyNormAct]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """`layer.proxy_scale_shift()` for every layer, computed as one (C_total, P) problem per group of
    layers that share activation, eps, points and dtype instead of one small problem per layer.

    The statistics are per channel, so concatenating the layers' parameters along the channel axis and
    splitting the results gives each layer its own values; autograd carries the gradients back through
    the split and the concatenation. A whole network's layers are then a dozen ops forward and backward
    instead of a dozen per layer.
    """
    groups: Dict[Tuple, List[int]] = {}
    for index, layer in enumerate(layers):
        groups.setdefault(_batch_key(layer), []).append(index)
    results: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(layers)
    for indices in groups.values():
        members = [layers[i] for i in indices]
        if len(members) == 1:
            results[indices[0]] = members[0].proxy_scale_shift()
            continue
        params = [m._stats_params() for m in members]
        gamma, beta, gamma_t, beta_t = (torch.cat([p[k] for p in params]) for k in range(4))
        first = members[0]
        s, t = proxy_scale_shift(gamma, beta, gamma_t, beta_t, params[0][4], first.act, first.proxy_eps,
                                 "reference" if first.impl == "reference" else "gn_silu")
        sizes = [m.num_channels for m in members]
        for i, s_i, t_i in zip(indices, s.split(sizes), t.split(sizes)):
            results[i] = (s_i, t_i)
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def shared_proxy_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, every ProxyNormAct of `model` uses (s, t) computed once for all of them
    (`batched_proxy_scale_shift`) when the context was entered. For one forward pass: enter it again for
    the next one, since the parameters (and the autograd graph) change between steps. Where only plain
    ops may run (poptorch, devices other than CPU and CUDA) each layer keeps computing its own.
    """
    layers = [m for m in model.modules() if isinstance(m, ProxyNormAct) and m.shared_scale_shift is None]
    if len(layers) < 2 or plain_ops_only(layers[0].proxy_points):
        yield
        return
    try:
        for layer, st in zip(layers, batched_proxy_scale_shift(layers)):
            layer.shared_scale_shift = st
        yield
    finally:
        for layer in layers:
            layer.shared_scale_shift = None


class FrozenProxyNormAct(nn.Module):
    """ProxyNormAct for inference: the same GroupNorm, affine, activation and scale-and-shift, with the
    proxy's per-channel s and t stored instead of recomputed. They depend on the parameters only, so in a
    model that no longer trains they are constants, and recomputing them costs every forward their own
    small ops (docs/PERFORMANCE.md has the measurement). Outputs equal the live module's bit for bit. Holds only buffers: nothing here trains."""

    def __init__(self, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, act: nn.Module,
                 s: torch.Tensor, t: torch.Tensor, impl: str) -> None:
        super().__init__()
        self.num_groups, self.eps, self.act, self.impl = num_groups, eps, act, impl
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("scale", s.detach().clone())
        self.register_buffer("shift", t.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act_scale_shift(x, self.num_groups, self.weight, self.bias, self.eps, self.act,
                                          self.scale, self.shift, self.impl)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, impl={self.impl}, frozen"


class GroupNormScale(nn.Module):
    """GroupNorm (LayerNorm when num_groups == 1) with a per-channel scale and no shift, no activation.

    The Proxy Norm placement for a norm that no activation follows (the MBConv projection): see the module
    docstring. Parameter: weight (C,), init 1.
    """

    decay_params: Tuple[str, ...] = ()

    def __init__(self, num_channels: int, num_groups: int = 1, eps: float = 1e-3) -> None:
        super().__init__()
        check_group_count(num_channels, num_groups)
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}"


def make_proxy_norm_act(spec: NormSpec, num_channels: int, act: Optional[str] = "silu",
                        apply_act: bool = True) -> nn.Module:
    """The Proxy Norm module for one normalisation site (`make_norm_act` calls this for spec.proxy).

    apply_act=True: `ProxyNormAct` (norm, affine, activation, proxy renormalisation).
    apply_act=False: `GroupNormScale` (norm with a scale, no shift, no proxy step).
    """
    if spec.kind not in ("group", "layer"):
        raise ValueError(f"Proxy Norm needs kind 'group' or 'layer', got kind {spec.kind!r}")
    groups = spec.num_groups
    if not apply_act:
        return GroupNormScale(num_channels, groups, eps=spec.eps)
    return ProxyNormAct(num_channels, groups, eps=spec.eps, act=act, proxy_eps=spec.proxy_eps,
                        num_points=spec.proxy_points)
