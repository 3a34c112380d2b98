"""The fast paths of docs/PERFORMANCE.md keep results: in-place inference ops, the NumPy HWC -> CHW
copy of to_uint8_tensor, and the loader's pinned-memory default."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ipu_effnet.data.datasets import GeneratedDataset
from ipu_effnet.data.loader import create_loader
from ipu_effnet.data.transforms import to_uint8_tensor
from ipu_effnet.models import create_model
from ipu_effnet.models.blocks import SqueezeExcite
from ipu_effnet.models.fuse import fold_batchnorm


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
    # Without autograd the residual sum goes in place into the block's own output; the result and the
    # caller's input must not change.
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
    assert not any(m.inplace_gate for m in model.modules() if isinstance(m, SqueezeExcite))
    with torch.no_grad():
        assert torch.allclose(folded(x), fast, atol=1e-5) and torch.equal(x, x_before)


def test_loader_pins_memory_by_default_only_with_cuda():
    data = GeneratedDataset(8, num_classes=2, resolution=32)
    assert create_loader(data, 4, train=True, workers=0, seed=0).pin_memory == torch.cuda.is_available()
    assert create_loader(data, 4, train=True, workers=0, seed=0, pin_memory=False).pin_memory is False
