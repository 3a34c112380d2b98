"""ipu_effnet/models/fold.py: BatchNorm folded into the preceding convolution equals the eval model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ipu_effnet.models import create_model
from ipu_effnet.models.blocks import FusedMBConv
from ipu_effnet.models.builder import BlockArgs
from ipu_effnet.models.fold import count_batchnorm, fold_batchnorm
from norms import NormSpec


def _randomise_bn(model: nn.Module) -> None:
    # Trained-looking statistics and affine: with the initial ones (mean 0, var 1, gamma 1, beta 0)
    # folding would be nearly the identity and a wrong formula could pass.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_model_equals_the_eval_model(channels_last):
    torch.manual_seed(0)
    model = create_model("efficientnet_tiny", norm="batch", num_classes=10)
    _randomise_bn(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).eval()
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=fmt)
    folded = fold_batchnorm(model)
    assert count_batchnorm(model) > 0 and count_batchnorm(folded) == 0
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not model.training and count_batchnorm(model) > 0  # the original keeps its BatchNorm
    if channels_last:
        assert folded.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_mbconv_block_folds_too():
    args = BlockArgs(block="fused", in_chs=8, out_chs=8, mid_chs=32, kernel=3, stride=1, groups=1, se_chs=0,
                     drop_path_rate=0.0, path="blocks.0.0")
    block = FusedMBConv(args, NormSpec(kind="batch"), "silu")
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, 8, 9, 9)
    folded = fold_batchnorm(block)
    assert count_batchnorm(folded) == 0 and folded.conv_exp.bias is not None
    with torch.no_grad():
        assert torch.allclose(folded(x), block(x), atol=1e-5, rtol=1e-5)


def test_models_without_batchnorm_keep_their_norms():
    torch.manual_seed(0)
    model = create_model("efficientnet_tiny", norm="group", num_classes=10).eval()
    folded = fold_batchnorm(model)
    kinds = [type(m).__name__ for m in model.modules()]
    assert [type(m).__name__ for m in folded.modules()] == kinds
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


@pytest.mark.parametrize("kind", ["layer+proxy", "group+proxy"])
def test_frozen_proxy_norm_gives_the_live_outputs_without_recomputing_its_statistics(kind, monkeypatch):
    from ipu_effnet.models.fold import inference_copy
    from norms.proxy import FrozenProxyNormAct, ProxyNormAct

    torch.manual_seed(0)
    model = create_model("efficientnet_tiny", norm=kind, num_classes=10).eval()
    # trained-looking proxy parameters: at their initial zeros every site would have the same s and t
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, ProxyNormAct):
            for p in (m.weight, m.bias, m.proxy_weight, m.proxy_bias):
                p.data.add_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
    live_sites = sum(isinstance(m, ProxyNormAct) for m in model.modules())
    fast = inference_copy(model)
    assert live_sites > 0 and sum(isinstance(m, ProxyNormAct) for m in fast.modules()) == 0
    assert sum(isinstance(m, FrozenProxyNormAct) for m in fast.modules()) == live_sites
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        calls = []
        original = ProxyNormAct.proxy_scale_shift
        monkeypatch.setattr(ProxyNormAct, "proxy_scale_shift", lambda self: calls.append(1) or original(self))
        got = fast(x)
    assert calls == []  # nothing recomputes the statistics in the frozen copy
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sum(isinstance(m, ProxyNormAct) for m in model.modules()) == live_sites  # the original is untouched
    assert not list(fast.parameters()) or all(not p.requires_grad for p in fast.parameters())


def test_checkpoint_evaluation_on_the_inference_copy_gives_the_plain_models_metrics():
    # sweep and evaluate score a checkpoint through training.evaluation.inference_model (folded,
    # channels_last); its top-1, top-5 and loss must be those of the network as it was trained.
    from ipu_effnet.training.evaluation import evaluate, inference_model

    torch.manual_seed(0)
    model = create_model("efficientnet_tiny", norm="batch", num_classes=10)
    _randomise_bn(model)
    model.train()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 256, (4, 3, 48, 48), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    want = evaluate(model, batches, torch.device("cpu"))
    net = inference_model(model)
    got = evaluate(net, batches, torch.device("cpu"))
    assert got["samples"] == want["samples"] == 12
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert abs(got["loss"] - want["loss"]) < 1e-4
    assert count_batchnorm(net) == 0 and net.channels_last
    assert model.training and count_batchnorm(model) > 0  # the network given is left as it was
