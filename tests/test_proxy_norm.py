"""Proxy Norm (norms/proxy.py, norms/proxy_ops.py) against the paper's definition (section 4) and the values
it implies, and batch independence of every batch-independent normalisation kind."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from ipu_effnet.models import create_model
from norms import NormSpec, make_norm_act
from norms.proxy import GroupNormScale, ProxyNormAct, batched_proxy_scale_shift, standard_normal_quantiles
from norms.proxy_ops import IMPLS, proxy_moments, proxy_scale_shift

# SiLU at initialisation (docs/norms.md).
EXACT_MEAN, EXACT_VAR = 0.206621, 0.313083  # over N(0, 1)
POINTS_MEAN, POINTS_VAR = 0.206048, 0.310004  # over the 200 quantile points
PROXY_EPS = 0.03


def _tiny(norm, **kw):
    torch.manual_seed(0)
    return create_model("efficientnet_tiny", num_classes=10, norm=norm, drop_rate=0.0, drop_path_rate=0.0, **kw)


def _perturb(module: nn.Module, scale: float = 0.3, seed: int = 1) -> nn.Module:
    """Move every parameter away from its initial value, so tests see generic gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


# --- the quantile points and the statistics at initialisation ---------------------------------------------

def test_points_are_the_fixed_standard_normal_quantiles():
    r = standard_normal_quantiles(200, dtype=torch.float64)
    i = torch.arange(200, dtype=torch.float64)
    want = math.sqrt(2) * torch.erfinv(2 * (i + 0.5) / 200 - 1)
    assert torch.equal(r, want)
    torch.testing.assert_close(r, -r.flip(0), atol=1e-14, rtol=0)  # symmetric, so their mean is 0
    assert float(r[100]) == pytest.approx(0.00626657, abs=1e-7)  # Phi^-1(100.5 / 200)
    # fixed, not sampled: two layers built under different seeds hold the same points
    torch.manual_seed(1)
    a = ProxyNormAct(8)
    torch.manual_seed(2)
    b = ProxyNormAct(8)
    assert torch.equal(a.proxy_points, b.proxy_points) and a.proxy_points.dtype == torch.float32


def test_initial_parameters():
    m = make_norm_act(NormSpec(kind="layer", proxy=True), 12)
    assert isinstance(m, ProxyNormAct)
    assert torch.equal(m.weight, torch.ones(12)) and torch.equal(m.bias, torch.zeros(12))
    assert torch.equal(m.proxy_weight, torch.zeros(12)) and torch.equal(m.proxy_bias, torch.zeros(12))
    assert m.proxy_eps == PROXY_EPS and m.num_points == 200 and m.num_groups == 1
    g = make_norm_act(NormSpec(kind="group", groups=4, proxy=True, proxy_eps=0.1, proxy_points=64), 12)
    assert (g.num_groups, g.proxy_eps, g.num_points, g.proxy_points.numel()) == (4, 0.1, 64, 64)


@pytest.mark.parametrize("impl", IMPLS)
def test_initial_proxy_moments_match_the_reference_values(impl):
    m = ProxyNormAct(16, impl=impl)
    mean, var = m.proxy_stats()
    assert mean.dtype == torch.float32 and mean.shape == (16,)
    torch.testing.assert_close(mean, torch.full((16,), POINTS_MEAN), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.full((16,), POINTS_VAR), atol=1e-5, rtol=0)
    # The reference numbers are the *biased* variance over the points (divide by P): the unbiased one
    # is 0.311561, which the tolerance above rejects.
    assert abs(var[0].item() * 200 / 199 - POINTS_VAR) > 1e-3
    # s, t fold (z - m) / sqrt(v + eps) into z * s + t
    s, t = m.proxy_scale_shift()
    torch.testing.assert_close(s, torch.full((16,), 1 / math.sqrt(POINTS_VAR + PROXY_EPS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(t, -POINTS_MEAN * s, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", [NormSpec(kind="layer", proxy=True), NormSpec(kind="group", groups=4, proxy=True)])
def test_standard_normal_input_comes_out_centred_with_variance_v_over_v_plus_eps(norm):
    m = make_norm_act(norm, 32)
    x = torch.randn(16, 32, 64, 64, generator=torch.Generator().manual_seed(0))  # N(0, 1) per channel
    with torch.no_grad():
        y = m(x).double()
    # Every channel on its own: mean ~ 0 (the points' mean differs from the exact one by 6e-4) ...
    per_channel_mean = y.mean(dim=(0, 2, 3))
    per_channel_var = y.var(dim=(0, 2, 3))
    assert per_channel_mean.abs().max() < 0.02
    assert (per_channel_var - EXACT_VAR / (EXACT_VAR + PROXY_EPS)).abs().max() < 0.03
    # ... and over all 2M values, sharper: the variance is v_exact / (v_points + eps), within 1 % of
    # v / (v + eps) (0.9126).
    assert abs(y.mean().item() - (EXACT_MEAN - POINTS_MEAN) / math.sqrt(POINTS_VAR + PROXY_EPS)) < 2e-3
    assert y.var().item() == pytest.approx(EXACT_VAR / (POINTS_VAR + PROXY_EPS), abs=2e-3)
    assert y.var().item() == pytest.approx(EXACT_VAR / (EXACT_VAR + PROXY_EPS), rel=0.01)


# --- gradients ---------------------------------------------------------------------------------------------

def _gradcheck_module(module: nn.Module, x: torch.Tensor) -> bool:
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def f(inp, *ps):
        return functional_call(module, dict(zip(names, ps)), (inp,))

    return torch.autograd.gradcheck(f, (x.detach().clone().requires_grad_(),) + params)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_float64_all_four_parameters(impl, groups, channels_last):
    m = _perturb(ProxyNormAct(4, groups, impl=impl).double())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "weight", "bias", "proxy_weight", "proxy_bias"}
    assert m.proxy_points.dtype == torch.float64
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert _gradcheck_module(m, x)


@pytest.mark.slow
def test_gradcheck_scale_only_norm_and_reference_is_twice_differentiable():
    assert _gradcheck_module(_perturb(GroupNormScale(6, 3).double()), torch.randn(2, 6, 3, 3, dtype=torch.float64))
    m = _perturb(ProxyNormAct(4, impl="reference").double())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda inp: m(inp), (x,))


@pytest.mark.parametrize("act", ["silu", "gelu", "relu", "sigmoid"])
def test_implementations_agree_in_values_and_gradients(act):
    base = _perturb(ProxyNormAct(8, 2, act=act).double())
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    results = {}
    for impl in IMPLS:
        m = copy.deepcopy(base)
        try:
            m.impl = impl if impl == "reference" else ProxyNormAct(8, act=act, impl=impl).impl
        except ValueError:  # fused is SiLU only; in place needs an activation that keeps its input
            continue
        inp = x.clone().requires_grad_()
        y = m(inp)
        results[impl] = (y.detach(), torch.autograd.grad(y, (inp,) + tuple(m.parameters()), grad_out))
    assert "reference" in results and len(results) >= (3 if act == "silu" else 1)
    ref_y, ref_grads = results["reference"]
    for y, grads in results.values():
        torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=0)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=1e-10, rtol=1e-10)


def test_default_implementation_follows_the_activation():
    assert ProxyNormAct(4, act="silu").impl == "gn_silu"
    assert ProxyNormAct(4, act="gelu").impl == "inplace"
    assert ProxyNormAct(4, act="relu").impl == "reference"  # ReLU keeps its output for backward
    with pytest.raises(ValueError, match="SiLU only"):
        ProxyNormAct(4, act="gelu", impl="gn_silu")
    with pytest.raises(ValueError, match="keeps its output"):
        ProxyNormAct(4, act="sigmoid", impl="inplace")
    with pytest.raises(ValueError, match="expected one of"):
        ProxyNormAct(4, impl="fast")


def test_statistics_do_not_depend_on_the_input_and_gradients_reach_all_parameters():
    m = _perturb(ProxyNormAct(8))
    before = [t.detach().clone() for t in m.proxy_scale_shift()]
    m(torch.randn(5, 8, 4, 4) * 10 + 3).square().mean().backward()
    after = m.proxy_scale_shift()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the fast statistics node against the plain definition, with gradients
    params = [p.detach().double().requires_grad_() for p in (m.weight, m.bias, m.proxy_weight, m.proxy_bias)]
    points = standard_normal_quantiles(200, dtype=torch.float64)
    fast = proxy_scale_shift(*params, points, nn.SiLU(), 0.03, impl="gn_silu")
    mean, var = proxy_moments(*params, points, nn.SiLU())
    slow = (torch.rsqrt(var + 0.03), -mean * torch.rsqrt(var + 0.03))
    w = torch.randn(2, 8, dtype=torch.float64)
    g_fast = torch.autograd.grad((fast[0] * w[0] + fast[1] * w[1]).sum(), params)
    g_slow = torch.autograd.grad((slow[0] * w[0] + slow[1] * w[1]).sum(), params)
    for a, b in zip(fast + g_fast, slow + g_slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_other_input_ranks_empty_batches_and_autocast(impl):
    m = _perturb(ProxyNormAct(8, 2, impl=impl))
    ref = copy.deepcopy(m)
    ref.impl = "reference"
    for shape in [(3, 8), (3, 8, 5), (0, 8, 4, 4)]:
        x = torch.randn(*shape)
        y = m(x.clone().requires_grad_())
        assert y.shape == x.shape
        torch.testing.assert_close(y, ref(x), atol=1e-6, rtol=1e-6)
        y.sum().backward()
    # CPU autocast (bfloat16): the statistics stay fp32, the output follows autocast's rules
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, _ = m.proxy_scale_shift()
        y = m(x)
        y_ref = ref(x)
    assert s.dtype == torch.float32 and y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float())
    y.float().sum().backward()


def test_under_poptorch_tracing_only_plain_ops_run(monkeypatch):
    import sys
    import types

    m = _perturb(ProxyNormAct(8, 2))
    assert m.impl == "gn_silu"
    x = torch.randn(2, 8, 3, 3)
    fast = m(x)
    assert type(fast.grad_fn).__name__.startswith("_GroupNormSiLUScaleShift")
    monkeypatch.setitem(sys.modules, "poptorch", types.SimpleNamespace(isRunningOnIpu=lambda: True))
    traced = m(x)
    assert type(traced.grad_fn).__name__ == "AddcmulBackward0"  # the plain formulation, whatever impl says
    s, _ = m.proxy_scale_shift()
    assert not type(s.grad_fn).__name__.startswith("_ProxyScaleShift")
    torch.testing.assert_close(traced, fast)
    monkeypatch.setitem(sys.modules, "poptorch", types.SimpleNamespace(isRunningOnIpu=lambda: False))
    assert type(m(x).grad_fn).__name__.startswith("_GroupNormSiLUScaleShift")


# --- placement in the blocks -------------------------------------------------------------------------------

def test_placement_in_the_model():
    model = _tiny(NormSpec(kind="layer", proxy=True))
    assert isinstance(model.stem.norm, ProxyNormAct) and isinstance(model.head.norm, ProxyNormAct)
    blocks = [b for stage in model.blocks for b in stage]
    for block in blocks:
        # expansion (where there is one) and depthwise: proxy-normalised activations
        assert isinstance(block.norm1, (ProxyNormAct, nn.Identity)) and isinstance(block.norm2, ProxyNormAct)
        # projection: a scale, no shift, no proxy step
        assert isinstance(block.norm3, GroupNormScale)
        assert [n for n, _ in block.norm3.named_parameters()] == ["weight"]
        # squeeze-excite: a plain activation
        assert type(block.se.act) is nn.SiLU
    assert any(isinstance(b.norm1, ProxyNormAct) for b in blocks)
    n_proxy = sum(isinstance(m, ProxyNormAct) for m in model.modules())
    assert n_proxy == 2 + sum(1 + isinstance(b.norm1, ProxyNormAct) for b in blocks)


def test_fused_mbconv_placement():
    from ipu_effnet.models.blocks import FusedMBConv
    from ipu_effnet.models.builder import BlockArgs

    args = BlockArgs(block="gn_silu", in_chs=8, out_chs=8, mid_chs=32, kernel=3, stride=1, groups=1, se_chs=0,
                     drop_path_rate=0.0, path="blocks.0.0")
    block = FusedMBConv(args, NormSpec(kind="group", groups=4, proxy=True), "silu")
    assert isinstance(block.norm1, ProxyNormAct) and block.norm1.num_groups == 4
    assert isinstance(block.norm2, GroupNormScale) and block.norm2.num_groups == 4


# --- batch independence ------------------------------------------------------------------------------------

BATCH_INDEPENDENT = [NormSpec(kind="group"), NormSpec(kind="layer"), NormSpec(kind="group", proxy=True),
                     NormSpec(kind="layer", proxy=True), NormSpec(kind="none")]


def _alone_vs_in_batch(model: nn.Module, batch: int = 7, res: int = 32) -> float:
    # float64: float32 convolutions may round differently for batch 1 and batch 7 (other kernels), at the
    # 1e-5 level; batch dependence is a property of the arithmetic, not of rounding.
    model.double().train()
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(batch)])
    assert together.abs().max() > 1e-3  # the comparison below is not between zeros
    return (together - alone).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("norm", BATCH_INDEPENDENT, ids=lambda n: n.kind + ("+proxy" if n.proxy else ""))
def test_batch_independent_kinds_in_training_mode(norm):
    assert norm.batch_independent
    model = _perturb(_tiny(norm), scale=0.05)
    assert _alone_vs_in_batch(model) < 1e-5


def test_batchnorm_is_batch_dependent_in_training_mode():
    model = _tiny(NormSpec(kind="batch"))
    assert not NormSpec(kind="batch").batch_independent
    # a sample alone in a batch of one cannot be normalised by batch statistics at all ...
    with pytest.raises(ValueError):
        _alone_vs_in_batch(model, batch=7, res=32)
    # ... and with spatial extent left it is normalised by its own: the logits change with the batch.
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        first_four = model(x[:4])
    assert (full[:4] - first_four).abs().max() > 1e-3


# --- precision, checkpoints ---------------------------------------------------------------------------------

def test_half_model_keeps_fp32_statistics_and_runs_forward_and_backward():
    model = _perturb(_tiny(NormSpec(kind="layer", proxy=True)), scale=0.05)
    reference = copy.deepcopy(model)
    model.half()
    proxies = [m for m in model.modules() if isinstance(m, ProxyNormAct)]
    assert proxies and all(m.weight.dtype == torch.float16 for m in proxies)
    assert all(m.proxy_points.dtype == torch.float32 for m in proxies)
    assert torch.equal(proxies[0].proxy_points, standard_normal_quantiles(200))  # exact, not fp16-rounded
    # the statistics are fp32 values of the fp16 parameters: equal to an fp32 layer holding those values
    for m, ref in zip(proxies, (r for r in reference.modules() if isinstance(r, ProxyNormAct))):
        ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        got, want = m.proxy_stats(), ref.proxy_stats()
        assert got[0].dtype == torch.float32
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert m.proxy_scale_shift()[0].dtype == torch.float32
    # forward and backward in fp16 (CPU supports every op the model uses in half precision)
    x = torch.randn(2, 3, 32, 32).half()
    logits = model(x)
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    logits.float().logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float16 and torch.isfinite(p.grad).all(), name
    # back to fp32: the points are rebuilt exactly
    model.float()
    assert torch.equal(proxies[0].proxy_points, standard_normal_quantiles(200))


def test_checkpoint_round_trip_reproduces_outputs_exactly():
    model = _perturb(_tiny(NormSpec(kind="group", groups=4, proxy=True)), scale=0.05)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()))
    assert any(k.endswith("proxy_weight") for k in state) and any(k.endswith("proxy_bias") for k in state)
    assert not any("proxy_points" in k for k in state)  # rebuilt from the point count, not stored
    fresh = _tiny(NormSpec(kind="group", groups=4, proxy=True))
    assert not torch.equal(fresh.stem.norm.proxy_weight, model.stem.norm.proxy_weight)
    fresh.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(fresh, mode)()
        with torch.no_grad():
            assert torch.equal(model(x), fresh(x)), mode


# --- recipes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["b0", "b4"])
@pytest.mark.parametrize("short", ["ln", "gn"])
def test_proxy_recipes_are_their_base_recipe_plus_proxy_norm(model, short):
    import dataclasses
    from pathlib import Path

    from ipu_effnet.config import load

    configs = Path(__file__).resolve().parent.parent / "configs"
    with_pn = load(configs / f"efficientnet-{model}-g16-{short}pn.yaml")
    base = load(configs / f"efficientnet-{model}-g16-{short}.yaml")
    assert with_pn.norm == base.norm.with_(proxy=True, proxy_eps=PROXY_EPS, proxy_points=200)
    assert with_pn.norm.kind == {"ln": "layer", "gn": "group"}[short]
    assert dataclasses.replace(with_pn, norm=base.norm) == base  # nothing else differs


# --- statistics of many layers as one computation -----------------------------------------------------------

def _per_layer(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Proxy Norm layers each compute their own statistics (no batching)."""
    plain = copy.deepcopy(model)

    def forward(x):
        return plain.forward_head(plain.forward_features(x))  # EfficientNet.forward without the context

    plain.forward = forward
    return plain


@pytest.mark.parametrize("impl", [None, "reference"], ids=["default", "reference"])
def test_batched_statistics_equal_each_layers_own_values_and_gradients(impl):
    # Layers of different widths, groups, activations and eps: each group of compatible layers is one
    # computation, and every layer gets the values and gradients of its own (reference) computation.
    torch.manual_seed(0)
    acts = ["silu", "silu", "gelu", "silu", "relu"]
    layers = [_perturb(ProxyNormAct(c, g, act=a, proxy_eps=e, impl=impl), seed=i)
              for i, (c, g, a, e) in enumerate(zip([8, 4, 6, 12, 4], [2, 1, 1, 4, 2], acts,
                                                  [0.03, 0.03, 0.03, 0.03, 0.1]))]
    refs = copy.deepcopy(layers)
    batched = batched_proxy_scale_shift(layers)
    weights = [torch.randn(2, m.num_channels, generator=torch.Generator().manual_seed(7 + i))
               for i, m in enumerate(layers)]
    loss = sum((w[0] * s).sum() + (w[1] * t).sum() for w, (s, t) in zip(weights, batched))
    loss.backward()
    for m, ref, w, (s, t) in zip(layers, refs, weights, batched):
        ref.impl = "reference"
        want_s, want_t = ref.proxy_scale_shift()
        assert s.shape == (m.num_channels,)
        assert torch.allclose(s, want_s, rtol=1e-5, atol=1e-6) and torch.allclose(t, want_t, rtol=1e-5, atol=1e-6)
        ((w[0] * want_s).sum() + (w[1] * want_t).sum()).backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("norm", [NormSpec(kind="layer", proxy=True), NormSpec(kind="group", groups=4, proxy=True)])
def test_model_forward_shares_the_statistics_and_keeps_outputs_and_gradients(norm, monkeypatch):
    model = _perturb(_tiny(norm), scale=0.05).double()
    plain = _per_layer(model)
    calls = []
    original = ProxyNormAct.proxy_scale_shift
    monkeypatch.setattr(ProxyNormAct, "proxy_scale_shift", lambda self: calls.append(self) or original(self))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model(x).logsumexp(1).sum().backward()
    assert calls == []  # no layer computed its statistics on its own
    proxies = [m for m in model.modules() if isinstance(m, ProxyNormAct)]
    assert len(proxies) > 2 and all(m.shared_scale_shift is None for m in proxies)  # cleared after forward
    out = plain(x)
    assert len(calls) == len(proxies)
    out.logsumexp(1).sum().backward()
    with torch.no_grad():
        assert torch.allclose(model(x), out, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12), name


def test_shared_statistics_are_cleared_when_the_forward_raises():
    model = _tiny(NormSpec(kind="layer", proxy=True))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 32, 32))  # wrong channel count: the stem's convolution refuses it
    assert all(m.shared_scale_shift is None for m in model.modules() if isinstance(m, ProxyNormAct))


def test_shared_statistics_stay_per_layer_where_only_plain_ops_may_run(monkeypatch):
    # Under poptorch (and off CPU and CUDA) the layers keep their own statistics: the path the IPU traces.
    import norms.proxy as proxy

    monkeypatch.setattr(proxy, "plain_ops_only", lambda x: True)
    model = _tiny(NormSpec(kind="layer", proxy=True))
    with proxy.shared_proxy_stats(model):
        assert all(m.shared_scale_shift is None for m in model.modules() if isinstance(m, ProxyNormAct))
