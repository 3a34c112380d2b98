"""The fast paths of docs/PERFORMANCE.md keep results: in-place inference ops, the NumPy HWC -> CHW
copy of to_uint8_tensor, and the loader's pinned-memory default."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from ipu_effnet.data.datasets import GeneratedDataset
from ipu_effnet.data.loader import create_loader
from ipu_effnet.data.transforms import to_uint8_tensor
from ipu_effnet.models import create_model
from ipu_effnet.models.blocks import SqueezeExcite
from ipu_effnet.models.fold import fold_batchnorm
from norms import BatchNormAct2d
from norms.act import act_fresh


def test_to_uint8_tensor_is_a_writable_chw_copy():
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on a read-only array
        out = to_uint8_tensor(arr)
    assert out.shape == (3, 4, 5) and out.is_contiguous() and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(arr.copy()).permute(2, 0, 1))
    out[0, 0, 0] = 255
    assert arr[0, 0, 0] == 0  # a copy, not a view of the caller's array
    assert to_uint8_tensor(arr[:, :, 0]).shape == (1, 4, 5)


def test_no_grad_forward_equals_the_autograd_forward_and_leaves_the_input():
    # Without autograd the residual sum, the gates, the activations and BatchNorm go in place into the
    # block's own tensors; the result and the caller's input must not change.
    torch.manual_seed(0)
    model = create_model("efficientnet_tiny", norm="batch", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    x_before = x.clone()
    with torch.no_grad():
        fast = model(x)
    assert torch.equal(model(x).detach(), fast) and torch.equal(x, x_before)
    folded = fold_batchnorm(model)
    gates = [m.inplace_gate for m in folded.modules() if isinstance(m, SqueezeExcite)]
    assert gates and all(gates)
    with torch.no_grad():
        assert torch.allclose(folded(x), fast, atol=1e-5) and torch.equal(x, x_before)


def test_loader_pins_memory_by_default_only_with_cuda():
    data = GeneratedDataset(8, num_classes=2, resolution=32)
    assert create_loader(data, 4, train=True, workers=0, seed=0).pin_memory == torch.cuda.is_available()
    assert create_loader(data, 4, train=True, workers=0, seed=0, pin_memory=False).pin_memory is False


def _model_pair(norm: str, channels_last: bool):
    torch.manual_seed(0)
    model = create_model("efficientnet_tiny", norm=norm, num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    for m in model.modules():  # non-trivial running statistics, so that eval-mode BatchNorm does work
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 40, 40).contiguous(memory_format=fmt)
    return model, x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["batch", "group", "layer", "layer+proxy", "none"])
def test_in_place_eval_is_bitwise_the_autograd_eval(norm, channels_last):
    # Without autograd the activations, BatchNorm at the convolutions' outputs, the squeeze-excite gate
    # and Proxy Norm's scale-and-shift run in place; with autograd everything is out of place. The two
    # must agree bit for bit, and the caller's input must survive.
    model, x = _model_pair(norm, channels_last)
    model.eval()
    x_before = x.clone()
    expected = model(x).detach()
    with torch.no_grad():
        fast = model(x)
    with torch.inference_mode():
        fastest = model(x)
    assert torch.equal(fast, expected) and torch.equal(fastest, expected)
    assert torch.equal(x, x_before)


def test_training_step_is_unchanged_by_the_in_place_paths():
    # Training (autograd on) runs everything out of place: the gradients equal those of a model whose
    # norms never take the in-place paths.
    model, x = _model_pair("batch", True)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, BatchNormAct2d):
            m.fresh_input = False
        if isinstance(m, SqueezeExcite):
            m.inplace_gate = False
    for net in (model, plain):
        net.train()
        torch.manual_seed(1)
        net(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(model.buffers(), plain.buffers()):
        assert torch.equal(a, b)  # running statistics updated the same way


def test_batchnorm_runs_in_place_only_where_allowed():
    torch.manual_seed(0)
    bn = BatchNormAct2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        expected = torch.nn.functional.silu(torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        y = x.clone()
        out = bn(y)  # fresh_input is off by default: the input stays
        assert out.data_ptr() != y.data_ptr() and torch.equal(y, x) and torch.equal(out, expected)
        bn.fresh_input = True
        out = bn(y)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, expected)
        bn.train()  # training mode (as when BatchNorm statistics are recomputed): out of place
        y = x.clone()
        before = bn.running_mean.clone()
        bn(y)
        assert torch.equal(y, x) and not torch.equal(bn.running_mean, before)
    bn.eval()
    y = x.clone().requires_grad_()
    bn(y).sum().backward()  # with autograd: out of place, differentiable
    assert torch.equal(y.detach(), x) and y.grad is not None


def test_model_marks_the_norms_after_its_convolutions():
    model = create_model("efficientnet_tiny", norm="batch", num_classes=10)
    marked = [m.fresh_input for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert marked and all(marked)


def test_act_fresh_is_in_place_only_without_autograd():
    x = torch.randn(4, 8)
    y = x.clone()
    out = act_fresh(nn.SiLU(), y)
    assert out.data_ptr() != y.data_ptr() and torch.equal(y, x)
    with torch.no_grad():
        out = act_fresh(nn.SiLU(), y)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, torch.nn.functional.silu(x))
        g = x.clone()
        out = act_fresh(nn.GELU(), g)  # no in-place form: out of place
        assert out.data_ptr() != g.data_ptr() and torch.equal(g, x)
