"""TrainingModel: uint8 normalisation, label smoothing, mixup and cutmix against hand computations
(docs/reference.md section 6), fp32 loss under reduced precision, the return shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipu_effnet.config import TrainConfig
from ipu_effnet.models import create_model
from ipu_effnet.training.model import IMAGENET_MEAN, IMAGENET_STD, TrainingModel, cutmix_mask

N, C, H, W, K = 5, 3, 8, 10, 4


class FixedLogits(nn.Module):
    """A network that records its input and returns fixed logits (so the loss can be computed by hand)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.logits * 1.0


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 3, 1, 2, 3])
    logits = torch.randn(N, K, generator=g, dtype=torch.float32)
    return images, labels, logits


def _hand_normalise(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _ce(logits_row, label, s):
    """Label-smoothed cross entropy of one sample, in plain Python floats."""
    row = [float(v) for v in logits_row]
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    log_p = [v - log_z for v in row]
    return (1 - s) * (-log_p[int(label)]) + s * sum(-lp for lp in log_p) / len(row)


def test_uint8_images_are_normalised_with_imagenet_mean_std():
    images, labels, logits = _batch()
    net = FixedLogits(logits)
    tm = TrainingModel(net).eval()
    tm(images)
    expected = _hand_normalise(images)
    assert net.seen.dtype == torch.float32
    torch.testing.assert_close(net.seen, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tm.normalize(images), expected, rtol=0, atol=1e-6)
    # mean/std are buffers that move with the model but are not part of the checkpointed state
    assert {n for n, _ in tm.named_buffers()} == {"mean", "std"}
    assert list(tm.state_dict()) == ["model.logits"]


@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
def test_label_smoothing_loss_matches_hand_computation(s):
    images, labels, logits = _batch()
    tm = TrainingModel(FixedLogits(logits), label_smoothing=s).train()
    loss, out = tm(images, labels)
    hand = sum(_ce(logits[i], labels[i], s) for i in range(N)) / N
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=s).item(), rel=1e-6)
    torch.testing.assert_close(out, logits)


def test_mixup_with_fixed_coefficients():
    images, labels, logits = _batch()
    net = FixedLogits(logits)
    s = 0.1
    tm = TrainingModel(net, label_smoothing=s, mixup_alpha=0.2).train()
    m = torch.tensor([0.9, 0.5, 0.75, 0.6, 1.0])
    loss, _ = tm(images, labels, mixup_coeffs=m)
    x = _hand_normalise(images)
    # the partner of sample i is sample i - 1 (the batch rolled by one)
    for i in range(N):
        torch.testing.assert_close(net.seen[i], m[i] * x[i] + (1 - m[i]) * x[i - 1], rtol=0, atol=1e-5)
    hand = sum(m[i].item() * _ce(logits[i], labels[i], s) + (1 - m[i].item()) * _ce(logits[i], labels[i - 1], s)
               for i in range(N)) / N
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_cutmix_with_fixed_box_pastes_from_batch_rolled_by_two():
    images, labels, logits = _batch()
    net = FixedLogits(logits)
    s = 0.1
    tm = TrainingModel(net, label_smoothing=s, cutmix=True).train()
    box = torch.tensor([2, 3, 6, 8])  # rows 2..5, columns 3..7: 4 x 5 = 20 of 80 pixels
    loss, _ = tm(images, labels, cutmix_box=box)
    x = _hand_normalise(images)
    for i in range(N):
        expected = x[i].clone()
        expected[:, 2:6, 3:8] = x[i - 2][:, 2:6, 3:8]
        torch.testing.assert_close(net.seen[i], expected, rtol=0, atol=0)
    c = 1 - 20 / 80
    hand = sum(c * _ce(logits[i], labels[i], s) + (1 - c) * _ce(logits[i], labels[i - 2], s) for i in range(N)) / N
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_cutmix_lambda_comes_from_the_clipped_box():
    images, labels, logits = _batch()
    tm = TrainingModel(FixedLogits(logits), cutmix=True).train()
    box = torch.tensor([-3, 7, 2, 20])  # clipped to rows 0..1, columns 7..9: 2 x 3 = 6 of 80 pixels
    assert int(cutmix_mask(H, W, box).sum()) == 6
    loss, _ = tm(images, labels, cutmix_box=box)
    c = 1 - 6 / 80
    hand = sum(c * _ce(logits[i], labels[i], 0) + (1 - c) * _ce(logits[i], labels[i - 2], 0) for i in range(N)) / N
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_mixup_then_cutmix_weights_four_labels_as_graphcore():
    images, labels, logits = _batch()
    net = FixedLogits(logits)
    s = 0.1
    tm = TrainingModel(net, label_smoothing=s, mixup_alpha=0.2, cutmix=True).train()
    m = torch.tensor([0.9, 0.5, 0.75, 0.6, 0.8])
    box = torch.tensor([0, 0, 4, 5])  # 20 of 80 pixels
    loss, _ = tm(images, labels, mixup_coeffs=m, cutmix_box=box)
    x = _hand_normalise(images)
    mixed = [m[i] * x[i] + (1 - m[i]) * x[i - 1] for i in range(N)]
    for i in range(N):
        expected = mixed[i].clone()
        expected[:, 0:4, 0:5] = mixed[i - 2][:, 0:4, 0:5]
        torch.testing.assert_close(net.seen[i], expected, rtol=0, atol=1e-5)
    c = 1 - 20 / 80
    hand = 0.0
    for i in range(N):
        mi, mp = m[i].item(), m[i - 2].item()
        hand += (mi * c * _ce(logits[i], labels[i], s) + (1 - mi) * c * _ce(logits[i], labels[i - 1], s)
                 + mp * (1 - c) * _ce(logits[i], labels[i - 2], s)
                 + (1 - mp) * (1 - c) * _ce(logits[i], labels[i - 3], s))
    assert loss.item() == pytest.approx(hand / N, rel=1e-6)


def test_sampled_coefficients_follow_the_recipe():
    tm = TrainingModel(nn.Identity(), mixup_alpha=0.1, cutmix=True)
    m = tm.sample_mixup(10_000)
    assert m.shape == (10_000,) and bool(((m >= 0.5) & (m <= 1.0)).all())
    assert m.mean().item() > 0.85  # Beta(0.1, 0.1) is U-shaped: most mass near 0 and 1, folded onto 1

    boxes = torch.stack([tm.sample_cutmix_box(32, 48) for _ in range(2000)])
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    skipped = (areas == 0).float().mean().item()
    assert skipped == pytest.approx(0.35, abs=0.05)
    # the box lies inside the image and covers at most 1 - 0.65 of it (plus rounding)
    assert bool((boxes[:, :2] >= 0).all()) and bool((boxes[:, 2] <= 32).all()) and bool((boxes[:, 3] <= 48).all())
    assert (areas.float() / (32 * 48)).max().item() <= 0.35 + 0.05

    never = TrainingModel(nn.Identity(), cutmix=True, cutmix_skip_rate=1.0)
    assert int(cutmix_mask(32, 48, never.sample_cutmix_box(32, 48)).sum()) == 0


def test_sampling_inside_forward_is_reproducible_from_the_torch_seed():
    images, labels, logits = _batch()
    tm = TrainingModel(FixedLogits(logits), label_smoothing=0.1, mixup_alpha=0.2, cutmix=True).train()
    torch.manual_seed(7)
    a, _ = tm(images, labels)
    torch.manual_seed(7)
    b, _ = tm(images, labels)
    c, _ = tm(images, labels)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_return_shapes_by_mode():
    images, labels, logits = _batch()
    tm = TrainingModel(FixedLogits(logits), label_smoothing=0.2, mixup_alpha=0.2)
    tm.train()
    out = tm(images, labels)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].dim() == 0 and out[1].shape == (N, K)
    assert torch.is_tensor(tm(images))  # no labels: logits only
    tm.eval()
    assert torch.is_tensor(tm(images))
    loss, out_logits = tm(images, labels)
    # evaluation loss: the plain cross entropy, no smoothing and no mixing
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    with pytest.raises(ValueError, match="training mode"):
        tm(images, labels, mixup_coeffs=torch.ones(N))


def test_loss_is_fp32_under_bf16_autocast_and_equals_fp32_log_softmax():
    torch.manual_seed(0)
    net = create_model("efficientnet_tiny", num_classes=10, norm="group")
    tm = TrainingModel(net, label_smoothing=0.1).train()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = tm(images, labels)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.detach().float(), labels, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_loss_is_fp32_when_the_network_is_half():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).half()
    tm = TrainingModel(net, label_smoothing=0.1, mixup_alpha=0.2).train()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 4])
    loss, logits = tm(images, labels)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32
    loss.backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.dtype == torch.float16


def test_channels_last_reaches_the_network():
    images, _, _ = _batch()
    seen = []
    probe = nn.Conv2d(3, 2, 1)
    tm = TrainingModel(probe, channels_last=True).eval()
    probe.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    tm(images)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert probe.weight.is_contiguous(memory_format=torch.channels_last)


def test_from_config_and_argument_checks():
    cfg = TrainConfig(label_smoothing=0.1, mixup_alpha=0.2, cutmix=True)
    tm = TrainingModel.from_config(nn.Identity(), cfg)
    assert (tm.label_smoothing, tm.mixup_alpha, tm.cutmix) == (0.1, 0.2, True)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainingModel(nn.Identity(), label_smoothing=1.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrainingModel(nn.Identity(), mixup_alpha=-1)


def test_channels_last_default_is_on_for_the_torch_backend_only():
    from ipu_effnet.config import Config, apply_overrides
    from ipu_effnet.training.model import resolve_channels_last

    cfg = Config()
    assert cfg.train.channels_last is None
    assert resolve_channels_last(cfg.train) is True
    assert resolve_channels_last(cfg.train, "ipu") is False
    assert resolve_channels_last(cfg.train, "pipeline") is False
    off = apply_overrides(cfg, ["train.channels_last=false"])
    assert resolve_channels_last(off.train) is False
    on = apply_overrides(cfg, ["train.channels_last=true"])
    assert resolve_channels_last(on.train, "pipeline") is True  # an explicit choice is kept
    tm = TrainingModel.from_config(nn.Conv2d(3, 4, 3), cfg.train)
    assert tm.channels_last is True
