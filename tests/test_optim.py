"""Optimisers: TensorFlow's RMSprop against a hand-written reference; weight decay on exactly the
parameters the param-groups rule names (docs/reference.md section 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ipu_effnet.config import TrainConfig
from ipu_effnet.models import create_model
from ipu_effnet.training.optim import RMSpropTF, create_optimizer, optimizer_from_config, set_lr
from ipu_effnet.training.param_groups import split_params


def _reference_rmsprop_tf(p0, grads, lrs, alpha, eps, momentum, wd):
    """TensorFlow's update in NumPy float64: ms starts at 1, eps inside the sqrt, lr inside momentum."""
    p = p0.astype(np.float64).copy()
    ms = np.ones_like(p)
    mom = np.zeros_like(p)
    out = []
    for g, lr in zip(grads, lrs):
        g = g + wd * p
        ms = alpha * ms + (1 - alpha) * g * g
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        p = p - mom
        out.append(p.copy())
    return out


@pytest.mark.parametrize("momentum,wd", [(0.9, 0.0), (0.9, 1e-2), (0.0, 1e-2)])
def test_rmsprop_tf_matches_reference_over_steps_with_changing_lr(momentum, wd):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(5)]
    lrs = [0.1, 0.05, 0.05, 0.2, 0.01]  # the lr changes: TF keeps earlier lrs inside the momentum buffer
    alpha, eps = 0.953125, 1e-3
    expected = _reference_rmsprop_tf(p0, grads, lrs, alpha, eps, momentum, wd)

    p = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = RMSpropTF([p], lr=lrs[0], alpha=alpha, eps=eps, momentum=momentum, weight_decay=wd)
    for g, lr, want in zip(grads, lrs, expected):
        set_lr(opt, lr)
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-14)


def test_rmsprop_tf_first_step_by_hand_and_differs_from_torch_rmsprop():
    # one scalar, one step: ms = alpha + (1 - alpha) g^2 (accumulator starts at 1), eps inside the sqrt
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    RMSpropTF([p], lr=0.1, alpha=0.953125, eps=1e-3, momentum=0.9).step()
    ms = 0.953125 + (1 - 0.953125) * 0.25
    assert p.item() == pytest.approx(1.0 - 0.1 * 0.5 / math.sqrt(ms + 1e-3), rel=1e-14)

    q = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    q.grad = torch.tensor([0.5], dtype=torch.float64)
    torch.optim.RMSprop([q], lr=0.1, alpha=0.953125, eps=1e-3, momentum=0.9).step()
    assert abs(q.item() - p.item()) > 0.1  # torch's accumulator starts at 0: a ~4.6x larger first step


def test_rmsprop_tf_keeps_fp32_state_for_half_parameters_and_round_trips_state():
    p = nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = RMSpropTF([p], lr=0.01)
    p.grad = torch.full((4,), 0.3, dtype=torch.float16)
    opt.step()
    state = opt.state[p]
    assert state["square_avg"].dtype == torch.float32 and state["momentum_buffer"].dtype == torch.float32
    assert p.dtype == torch.float16 and bool((p < 1).all())

    q = nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt2 = RMSpropTF([q], lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    for key in ("square_avg", "momentum_buffer"):  # no round trip through fp16 on load
        assert opt2.state[q][key].dtype == torch.float32
        assert torch.equal(opt2.state[q][key], state[key])
    assert not torch.equal(state["square_avg"].half().float(), state["square_avg"])


def _tiny(norm="group"):
    torch.manual_seed(0)
    return create_model("efficientnet_tiny", num_classes=10, norm=norm)


@pytest.mark.parametrize("name", ["rmsprop_tf", "sgd", "adamw"])
@pytest.mark.parametrize("norm", ["group", "layer+proxy"])
def test_weight_decay_hits_exactly_the_decayed_parameters(name, norm):
    model = _tiny(norm)
    split = split_params(model)
    decayed = {id(p) for _, p in split.decay}
    assert decayed, "the model has weights to decay"
    if norm == "layer+proxy":  # Proxy Norm's gamma_t and beta_t are 1-D and decayed (docs/reference.md section 4)
        assert any(n.endswith("proxy_weight") for n, _ in split.decay)
    with torch.no_grad():  # nonzero everywhere (Proxy Norm's gamma_t, beta_t start at 0)
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    lr, wd = 0.1, 0.01
    opt = create_optimizer(model, name, lr=lr, weight_decay=wd, momentum=0.9)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # with zero gradients only weight decay can move a parameter
    opt.step()
    for n, p in model.named_parameters():
        old = before[id(p)]
        if id(p) in decayed:
            assert not torch.equal(p, old), f"{n} should decay"
            if name in ("sgd", "adamw"):
                # sgd, L2 on the gradient: p - lr * wd * p; adamw, decoupled: p * (1 - lr * wd), and the
                # Adam step of a zero gradient is 0. The same number, reached two ways.
                torch.testing.assert_close(p.detach(), old * (1 - lr * wd))
        else:
            assert torch.equal(p, old), f"{n} should not decay"


def test_rmsprop_tf_decay_is_l2_on_the_gradient():
    model = nn.Linear(3, 2)
    opt = create_optimizer(model, "rmsprop_tf", lr=0.1, weight_decay=0.01, momentum=0.9)
    w0 = model.weight.detach().double().numpy().copy()
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    want = _reference_rmsprop_tf(w0, [np.zeros_like(w0)], [0.1], 0.953125, 1e-3, 0.9, 0.01)[0]
    np.testing.assert_allclose(model.weight.detach().numpy(), want, rtol=1e-6)


def test_frozen_parameters_are_left_out_and_groups_are_plain():
    model = _tiny()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    opt = create_optimizer(model, "sgd", lr=0.1, weight_decay=1e-5, momentum=0.0)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.stem.parameters())
    assert len(in_opt) == sum(1 for p in model.parameters() if p.requires_grad)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 0.0]


def test_optimizer_types_options_and_errors():
    model = nn.Linear(3, 2)
    assert isinstance(create_optimizer(model, "rmsprop_tf", 0.1), RMSpropTF)
    rms = create_optimizer(model, "rmsprop_tf", 0.1)
    assert (rms.defaults["eps"], rms.defaults["alpha"], rms.defaults["momentum"]) == (1e-3, 0.953125, 0.9)
    sgd = create_optimizer(model, "sgd", 0.1, momentum=0.9, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    adamw = create_optimizer(model, "adamw", 0.1, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        create_optimizer(model, "adam", 0.1)
    with pytest.raises(ValueError, match="nesterov"):
        create_optimizer(model, "sgd", 0.1, momentum=0.0, nesterov=True)
    cfg = TrainConfig(optimizer="sgd", lr=0.3, weight_decay=1e-4, momentum=0.8)
    opt = optimizer_from_config(model, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.8
    assert opt.param_groups[0]["weight_decay"] == 1e-4
