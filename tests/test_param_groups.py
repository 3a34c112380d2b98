"""Weight-decay parameter groups (ipu_effnet/training/param_groups.py): exactly the expected parameters
on each side, for BatchNorm, GroupNorm and Proxy Norm models, and the per-module declarations."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ipu_effnet.models import create_model
from ipu_effnet.training.param_groups import counts, describe, param_groups, split_params
from norms.proxy import GroupNormScale, ProxyNormAct


def _tiny(norm):
    torch.manual_seed(0)
    return create_model("efficientnet_tiny", num_classes=10, norm=norm)


def _expected(model: nn.Module):
    """The rule written out by module type, independently of the implementation's declarations."""
    decay, no_decay = set(), set()
    for mod_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}"
            conv_or_linear_weight = isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight"
            proxy_param = isinstance(module, ProxyNormAct) and name in ("proxy_weight", "proxy_bias")
            (decay if conv_or_linear_weight or proxy_param else no_decay).add(full)
    return decay, no_decay


@pytest.mark.parametrize("norm", ["batch", "group", "layer+proxy", "group+proxy", "none"])
def test_groups_hold_exactly_the_expected_parameters(norm):
    model = _tiny(norm)
    split = split_params(model)
    decay = {n for n, _ in split.decay}
    no_decay = {n for n, _ in split.no_decay}
    assert (decay, no_decay) == _expected(model)
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    # a few by name
    assert {"stem.conv.weight", "classifier.weight", "blocks.1.0.se.conv_reduce.weight"} <= decay
    assert {"classifier.bias", "blocks.1.0.se.conv_reduce.bias"} <= no_decay
    if norm != "none":
        assert {"stem.norm.weight", "stem.norm.bias", "blocks.1.0.norm3.weight"} <= no_decay
    if norm.endswith("+proxy"):
        # docs/reference.md section 4: gamma_t and beta_t decayed, gamma and beta not; the projection norm's scale not
        assert {"stem.norm.proxy_weight", "stem.norm.proxy_bias", "head.norm.proxy_weight"} <= decay
        assert {"stem.norm.weight", "stem.norm.bias", "blocks.1.0.norm3.weight"} <= no_decay
        assert isinstance(model.blocks[1][0].norm3, GroupNormScale)
    else:
        assert not any("proxy" in n for n in decay | no_decay)


def test_param_groups_for_a_torch_optimiser_and_the_decay_they_give():
    model = _tiny("layer+proxy")
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(set(g) == {"params", "weight_decay"} for g in groups)  # no keys a backend could trip on
    split = split_params(model)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for _, p in split.decay]
    opt = torch.optim.SGD(groups, lr=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves a parameter, p -> p - lr * wd * p
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        want = 0.9 if id(p) in decayed else 1.0
        assert torch.allclose(p, torch.full_like(p, want)), name


class _Custom(nn.Module):
    """A module stating its own rule: a 1-D parameter to decay and a 2-D one not to."""

    decay_params = ("gain",)
    no_decay_params = ("table",)

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))
        self.table = nn.Parameter(torch.zeros(4, 3))
        self.proj = nn.Linear(3, 3)


def test_modules_declare_exceptions_shared_and_frozen_parameters():
    model = nn.Sequential(_Custom(), nn.LayerNorm(3))
    model.add_module("tied", model[0].proj)  # a shared module: its parameters count once
    split = split_params(model)
    assert [n for n, _ in split.decay] == ["0.gain", "0.proj.weight"]
    assert [n for n, _ in split.no_decay] == ["0.table", "0.proj.bias", "1.weight", "1.bias"]
    # declarations name a module's own parameters only: the child Linear's "weight" is unaffected
    model[0].proj.weight.requires_grad_(False)
    assert [n for n, _ in split_params(model).decay] == ["0.gain"]
    assert [n for n, _ in split_params(model, trainable_only=False).decay] == ["0.gain", "0.proj.weight"]


def test_counts_and_describe():
    model = _tiny("layer+proxy")
    c = counts(model)
    n_proxy = sum(isinstance(m, ProxyNormAct) for m in model.modules())
    n_weights = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert c["decay"]["by_name"] == {"proxy_bias": n_proxy, "proxy_weight": n_proxy, "weight": n_weights}
    assert c["decay"]["tensors"] == 2 * n_proxy + n_weights
    assert c["decay"]["values"] + c["no_decay"]["values"] == sum(p.numel() for p in model.parameters())
    text = describe(model)
    assert text.splitlines()[0].startswith("weight decay:")
    assert f"{c['decay']['tensors']} tensors, {c['decay']['values']:,} values" in text
    assert f"proxy_weight {n_proxy}" in text
