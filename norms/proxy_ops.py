"""How Proxy Norm's work runs: plain autograd, in place, or one node with GroupNorm and SiLU (norms/proxy.py says what
it computes).

Per element, Proxy Norm is GroupNorm + affine, the activation, then out = z * s + t with per-channel s, t
computed from the proxy statistics (O(channels x points)). Written with plain ops, the scale-and-shift
adds a pass and a freshly allocated tensor in the forward, and three passes, two allocations and two
reductions in the backward; the statistics add a dozen small autograd nodes per layer. On CPU an
element-wise op on a large tensor costs mostly the allocation of its result (fresh pages from the OS) and
its passes over memory, so that plain form made a training step much slower than LayerNorm alone
(docs/norms.md has the measurements). `impl` selects one of three forms with the same values and
gradients:

    "reference"  F.group_norm -> act -> torch.addcmul, statistics in plain ops (`proxy_moments`). Twice
                 differentiable; what a backend that differentiates the traced forward itself (poptorch)
                 must see, and what runs on any device other than CPU and CUDA, whatever `impl` says.
    "inplace"    F.group_norm -> act -> `_ScaleShiftInPlace`, which overwrites the activation's output
                 (only this module holds it) in one pass. For activations whose backward needs their
                 input, not their output (not ReLU, not Sigmoid).
    "gn_silu"    `_GroupNormSiLUScaleShift`, SiLU only: GroupNorm, SiLU and the in-place scale-and-shift
                 as one autograd node. Its backward calls torch's own GroupNorm and SiLU backward kernels
                 and folds s into GroupNorm's weight, so the only extra per-element work over
                 LayerNorm + SiLU is the in-place forward pass and one reduction pass (sum(g * out) and
                 sum(g) per channel, with torch's batch-norm backward kernel, which needs no temporary).

"inplace" and "gn_silu" compute the statistics with one custom node too (`_ProxyScaleShift`). The custom
nodes are once differentiable; tests compare their values and gradients with "reference" and run
torch.autograd.gradcheck on each in float64.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act import act_fresh

IMPLS = ("gn_silu", "inplace", "reference")

# Activations whose backward needs their *input* only, so their output may be overwritten in place.
# (ReLU and Sigmoid keep their output for backward: overwriting it would make backward raise.)
INPLACE_SAFE_ACTS = (nn.SiLU, nn.GELU, nn.Mish, nn.Hardswish, nn.ReLU6, nn.Identity)


def default_impl(act: nn.Module) -> str:
    """The fastest implementation valid for this activation module."""
    if type(act) is nn.SiLU:
        return "gn_silu"
    if isinstance(act, INPLACE_SAFE_ACTS):
        return "inplace"
    return "reference"


def check_impl(impl: str, act: nn.Module) -> str:
    """`impl` if it is valid for this activation module, else ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"Proxy Norm impl {impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "gn_silu" and type(act) is not nn.SiLU:
        raise ValueError(f"Proxy Norm impl 'gn_silu' (GroupNorm and SiLU in one node) supports SiLU only, got {type(act).__name__}")
    if impl == "inplace" and not isinstance(act, INPLACE_SAFE_ACTS):
        raise ValueError(f"{type(act).__name__} keeps its output for backward: use impl='reference'")
    return impl


def _channel_shape(z: torch.Tensor) -> Tuple[int, ...]:
    return (1, z.shape[1]) + (1,) * (z.dim() - 2)  # broadcast (C,) over N and the spatial dims


def plain_ops_only(x: torch.Tensor) -> bool:
    """True where the custom nodes must not run: devices other than CPU and CUDA (their aten kernels are
    what the nodes call), and poptorch tracing for the IPU, which differentiates the traced forward
    itself; and TorchScript/ONNX tracing (`export`), which can record neither the custom nodes nor the
    in-place writes into `out=`. There the "reference" formulation runs whatever `impl` says."""
    if x.device.type not in ("cpu", "cuda") or torch.jit.is_tracing():
        return True
    poptorch = sys.modules.get("poptorch")  # never imported from here: only if the program uses it
    return poptorch is not None and bool(getattr(poptorch, "isRunningOnIpu", lambda: False)())


def autocast_active(x: torch.Tensor) -> bool:
    if x.device.type not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)  # torch >= 2.4
    except TypeError:  # torch 2.0 (poptorch's pin)
        return torch.is_autocast_enabled() if x.device.type == "cuda" else torch.is_autocast_cpu_enabled()


def _channel_sums(grad: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel sum(grad * out) and sum(grad), in one pass and without a full-size temporary: the
    weight and bias gradients of an eval-mode batch norm with mean 0 and variance 1."""
    if grad.numel() == 0:  # an empty batch (torch's kernel divides by the element count)
        return torch.zeros_like(s), torch.zeros_like(s)
    _, sum_grad_out, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, out, s, torch.zeros_like(s), torch.ones_like(s), None, None, False, 0.0, [False, True, True])
    return sum_grad_out, sum_grad


def _scale_shift_grads(grad: torch.Tensor, out: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                       need_s: bool, need_t: bool):
    """dL/ds and dL/dt of out = z * s + t, from out instead of z: z = (out - t) / s, so
    sum(g * z) = (sum(g * out) - t * sum(g)) / s. s = 1 / sqrt(v + eps) is positive and bounded."""
    if not (need_s or need_t):
        return None, None
    sum_grad_out, sum_grad = _channel_sums(grad, out, s)
    grad_s = (sum_grad_out - t * sum_grad) / s if need_s else None
    return grad_s, (sum_grad if need_t else None)


class _ScaleShiftInPlace(torch.autograd.Function):
    """z <- z * s + t in place (z: the caller's own intermediate; s, t: (C,))."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(z)
        torch.addcmul(t.view(shape), z, s.view(shape), out=z)
        ctx.mark_dirty(z)
        ctx.save_for_backward(z, s, t)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        out, s, t = ctx.saved_tensors
        need_z, need_s, need_t = ctx.needs_input_grad
        grad_s, grad_t = _scale_shift_grads(grad, out, s, t, need_s, need_t)
        grad_z = grad * s.view(_channel_shape(grad)) if need_z else None
        return grad_z, grad_s, grad_t


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout GroupNorm's CPU kernels keep (torch's group_norm does the same)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _GroupNormSiLUScaleShift(torch.autograd.Function):
    """silu(group_norm(x) * weight + bias) * s + t, as one autograd node.

    Backward, with g the output gradient and u the SiLU input:
        dL/ds, dL/dt  from one reduction pass over g and the output (see `_scale_shift_grads`);
        dL/du = g * s * silu'(u): torch's silu_backward gives g * silu'(u), and the factor s per
        channel is folded into the weight handed to torch's GroupNorm backward, which only ever uses
        dL/du * weight for the input gradient; its weight and bias gradients are scaled by s after.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: torch.Tensor,
                t: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
        fmt = _memory_format(x)
        x = x.contiguous(memory_format=fmt)
        n, c = x.shape[0], x.shape[1]
        hw = 1
        for size in x.shape[2:]:
            hw *= size
        u, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, num_groups, eps)
        out = F.silu(u)
        torch.addcmul(t.view(_channel_shape(out)), out, s.view(_channel_shape(out)), out=out)
        ctx.save_for_backward(x, u, out, mean, rstd, weight, s, t)
        ctx.num_groups, ctx.hw, ctx.fmt = num_groups, hw, fmt
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, u, out, mean, rstd, weight, s, t = ctx.saved_tensors
        need_x, need_w, need_b, need_s, need_t = ctx.needs_input_grad[:5]
        grad = grad.contiguous(memory_format=ctx.fmt)
        grad_s, grad_t = _scale_shift_grads(grad, out, s, t, need_s, need_t)
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            grad_u_over_s = torch.ops.aten.silu_backward(grad, u)
            grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
                grad_u_over_s, x, mean, rstd, weight * s, x.shape[0], x.shape[1], ctx.hw, ctx.num_groups,
                [need_x, need_w, need_b])
            grad_w = grad_w * s if need_w else None
            grad_b = grad_b * s if need_b else None
        return grad_x, grad_w, grad_b, grad_s, grad_t, None, None


def _act_backward(act: nn.Module, grad: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """grad * act'(u): torch's own kernel for SiLU, autograd on a recomputation otherwise."""
    if type(act) is nn.SiLU:
        return torch.ops.aten.silu_backward(grad, u)
    with torch.enable_grad():
        u = u.detach().requires_grad_()
        (grad_u,) = torch.autograd.grad(act(u), u, grad)
    return grad_u


def proxy_moments(gamma: torch.Tensor, beta: torch.Tensor, gamma_t: torch.Tensor, beta_t: torch.Tensor,
                  points: torch.Tensor, act: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The definition, in plain differentiable ops: per channel, the mean and the biased variance over
    the P points r of act(gamma * ((1 + gamma_t) * r + beta_t) + beta). All arguments (C,) but points (P,)."""
    scale = gamma * (1.0 + gamma_t)  # gamma * y + beta = scale * r + shift
    shift = torch.addcmul(beta, gamma, beta_t)
    proxy = act(torch.addmm(shift[:, None], scale[:, None], points[None, :]))  # (C, P)
    # Two-pass variance: stable, and on CPU far faster than torch.var_mean's Welford on short rows.
    mean = proxy.mean(dim=1, keepdim=True)
    centred = proxy - mean
    return mean.squeeze(1), (centred * centred).mean(dim=1)


def _row_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale[:, None] + shift[:, None] for x (C, P), as an eval-mode batch norm with mean 0 and
    variance 1: on CPU faster than torch.addcmul, whose three broadcast operands defeat its
    vectorised loop."""
    ones = torch.ones_like(scale)
    return F.batch_norm(x[None], torch.zeros_like(scale), ones, scale, shift, False, 0.0, 0.0)[0]


class _ProxyScaleShift(torch.autograd.Function):
    """(gamma, beta, gamma_t, beta_t) -> (s, t) = (1 / sqrt(v + eps), -m / sqrt(v + eps)) as one node.

    The same values as `proxy_moments`, with a hand-written backward: the O(C x P) work is then five
    passes forward and four backward, with no autograd bookkeeping for a dozen small ops per layer.
    Backward, with d = a - m the centred proxy activations (which sum to 0 per channel):
        dm = -s dt,  dv = -(s^3 / 2) (ds - m dt),  da = (dm + 2 dv d) / P,  du = act'(u) da,
        d scale = sum_p du r,  d shift = sum_p du,  then the chain rule through scale and shift.
    """

    @staticmethod
    def forward(ctx, gamma, beta, gamma_t, beta_t, points, act, eps):
        scale = gamma * (1.0 + gamma_t)
        shift = torch.addcmul(beta, gamma, beta_t)
        u = torch.addmm(shift[:, None], scale[:, None], points[None, :])  # (C, P)
        centred = act(u)
        mean = centred.mean(dim=1)
        centred.sub_(mean[:, None])
        var = torch.linalg.vector_norm(centred, dim=1).square_().div_(points.numel())
        s = torch.rsqrt(var + eps)
        t = -mean * s
        ctx.save_for_backward(gamma, gamma_t, beta_t, points, u, centred, mean, s)
        ctx.act = act
        return s, t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s, grad_t):
        gamma, gamma_t, beta_t, points, u, centred, mean, s = ctx.saved_tensors
        n = points.numel()
        grad_mean = -s * grad_t
        grad_var = (grad_s - mean * grad_t) * s.pow(3) * -0.5
        grad_a = _row_affine(centred, grad_var * (2.0 / n), grad_mean / n)
        grad_u = _act_backward(ctx.act, grad_a, u)
        grad_scale = torch.mv(grad_u, points)
        grad_shift = grad_u.sum(dim=1)
        grad_gamma = grad_scale * (1.0 + gamma_t) + grad_shift * beta_t
        return grad_gamma, grad_shift, grad_scale * gamma, grad_shift * gamma, None, None, None


def proxy_scale_shift(gamma: torch.Tensor, beta: torch.Tensor, gamma_t: torch.Tensor, beta_t: torch.Tensor,
                      points: torch.Tensor, act: nn.Module, eps: float,
                      impl: str = "reference") -> Tuple[torch.Tensor, torch.Tensor]:
    """s, t per channel with (z - m) / sqrt(v + eps) == z * s + t for the proxy moments m, v, in the
    dtype of the arguments (never lowered by autocast). "reference" builds them from `proxy_moments` in
    plain ops; the other impls use one custom node."""
    with contextlib.ExitStack() as stack:
        if autocast_active(points):  # the statistics stay in the precision they were given
            stack.enter_context(torch.autocast(device_type=points.device.type, enabled=False))
        if impl == "reference" or plain_ops_only(points):
            mean, var = proxy_moments(gamma, beta, gamma_t, beta_t, points, act)
            s = torch.rsqrt(var + eps)
            return s, -mean * s
        return _ProxyScaleShift.apply(gamma, beta, gamma_t, beta_t, points, act, eps)


def group_norm_act_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float, act: nn.Module, s: torch.Tensor, t: torch.Tensor,
                               impl: str = "reference") -> torch.Tensor:
    """act(group_norm(x, num_groups, weight, bias, eps)) * s + t, s and t per channel, shape (C,), in any
    float dtype (they are cast to the activation's dtype).

    impl: "gn_silu" (act must be nn.SiLU), "inplace" (act must not keep its output for backward) or
    "reference"; see the module docstring. Validate the pair once with `check_impl`. Under autocast,
    "gn_silu" runs as "inplace", so that F.group_norm gets autocast's precision rules; off CPU and CUDA,
    and under poptorch, everything runs as "reference".
    """
    if plain_ops_only(x):
        impl = "reference"
    elif not torch.is_grad_enabled():  # no autograd: everything in place on the fresh GroupNorm output
        z = act_fresh(act, F.group_norm(x, num_groups, weight, bias, eps))
        shape = _channel_shape(z)
        return torch.addcmul(t.to(z.dtype).view(shape), z, s.to(z.dtype).view(shape), out=z)
    if impl == "gn_silu" and not autocast_active(x):
        return _GroupNormSiLUScaleShift.apply(x, weight, bias, s.to(x.dtype), t.to(x.dtype), num_groups, eps)
    z = act(F.group_norm(x, num_groups, weight, bias, eps))
    s, t = s.to(z.dtype), t.to(z.dtype)
    if impl in ("gn_silu", "inplace"):
        return _ScaleShiftInPlace.apply(z, s, t)
    shape = _channel_shape(z)
    return torch.addcmul(t.view(shape), z, s.view(shape))
