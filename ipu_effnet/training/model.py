"""The training wrapper: uint8 images in, loss (and logits) out, with the loss computed inside `forward`.

poptorch compiles forward, backward and the optimiser step from one call of `forward`, so the loss has
to live here rather than in the loop; every backend calls the same thing.

What `TrainingModel.forward` does, in order (Graphcore's recipe, docs/reference.md section 6):

1. uint8 N x C x H x W images -> float32, normalised with the ImageNet mean/std: (x / 255 - mean) / std
   (the host/device boundary stays uint8: a quarter of the bytes of fp32);
2. in training mode only, mixup and then cutmix on the normalised batch (both are linear in the pixels,
   so mixing before or after the normalisation gives the same images);
3. cast to the network's dtype (its first floating parameter: fp32, or fp16 for "16.16"), optional
   channels_last, and run the network (which may run under autocast);
4. the loss in fp32 whatever the network's precision: log-softmax of `logits.float()`, cross entropy with
   label smoothing, weighted over the rolled partners that mixup/cutmix mixed in.

Mixing, exactly as Graphcore's public PyTorch code (`AugmentationModel`):

- mixup: per-sample m ~ Beta(a, a), m = max(m, 1 - m); the partner of sample i is sample i - 1 (the batch
  rolled by one, `torch.roll(x, 1, 0)`); image m * x_i + (1 - m) * x_{i-1}; loss m CE(y_i) + (1 - m) CE(y_{i-1}).
- cutmix: one coefficient and one box per batch; lambda ~ U[0.65, 1), replaced by 1 (no box) with
  probability 0.35; the box has sides H sqrt(1 - lambda) and W sqrt(1 - lambda), its centre is drawn so
  that the box lies inside the image, its corners are rounded to pixels; the box is pasted from the
  batch rolled by two, and lambda is recomputed from the pasted area: c = 1 - box area / (H W).
- both: mixup first, then cutmix of the *mixed* batch (Graphcore's order). The pasted region of sample i
  comes from mixed sample i - 2, itself a mix of samples i - 2 and i - 3, so four labels take part:
  y_i: m_i c, y_{i-1}: (1 - m_i) c, y_{i-2}: m_{i-2} (1 - c), y_{i-3}: (1 - m_{i-2}) (1 - c).

Label smoothing s: CE_s(y) = (1 - s) (-log p_y) + s mean_k(-log p_k), the same as
`F.cross_entropy(..., label_smoothing=s)`. The partner weights of a sample sum to one, so the mixed loss is
(1 - s) sum_j w_j (-log p_{y_j}) + s mean_k(-log p_k), averaged over the batch.

The random coefficients are drawn from torch's global CPU generator (which checkpoints save), unless
they are passed to `forward`: `mixup_coeffs` (N values, already max(m, 1 - m)) and `cutmix_box`
(4 integers: y1, x1, y2, x2, half-open, clipped to the image). Tests pass fixed ones; the IPU backend draws
them on the host with `sample_mixup` / `sample_cutmix_box` and passes them in, because the sampling does
not compile for the IPU. Passing coefficients applies that mixing even when the model was built without it.

Returns: in training mode `(loss, logits)` (a tuple of tensors, as poptorch accepts); in eval mode the
logits, or `(loss, logits)` when labels are given, where the eval loss is the plain cross entropy
(no smoothing, no mixing: the number people compare as "validation loss"). Without labels the training
mode returns the logits alone too.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TrainingModel",
    "cutmix_mask",
    "mix_batch",
    "mix_targets",
    "mixed_cross_entropy",
    "resolve_channels_last",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Graphcore's B4 configuration: cutmix_lambda_low 0.65, cutmix_lambda_high 1.0, cutmix_disable_prob 0.35.
CUTMIX_LAMBDA_RANGE = (0.65, 1.0)
CUTMIX_SKIP_RATE = 0.35


def cutmix_mask(height: int, width: int, box: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean H x W mask of the box `(y1, x1, y2, x2)` (half-open; parts outside the image are dropped)."""
    box = torch.as_tensor(box, device=device)
    ys = torch.arange(height, device=box.device)
    xs = torch.arange(width, device=box.device)
    in_y = (ys >= box[0]) & (ys < box[2])  # H
    in_x = (xs >= box[1]) & (xs < box[3])  # W
    return in_y.unsqueeze(1) & in_x.unsqueeze(0)  # H x W


def mix_batch(images: torch.Tensor, labels: torch.Tensor, mixup_coeffs: Optional[torch.Tensor] = None,
              cutmix_box: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Mix a float N x C x H x W batch. Returns (images, targets, weights): the loss of sample i is
    sum_j weights[j][i] * CE(targets[j][i]); the weights of a sample sum to one."""
    height, width = images.shape[-2], images.shape[-1]
    if mixup_coeffs is not None:
        m_img = mixup_coeffs.to(device=images.device, dtype=torch.float32).to(images.dtype).view(-1, 1, 1, 1)
        images = m_img * images + (1.0 - m_img) * torch.roll(images, 1, 0)
    if cutmix_box is not None:
        mask = cutmix_mask(height, width, cutmix_box, device=images.device)
        images = torch.where(mask, torch.roll(images, 2, 0), images)
    targets, weights = mix_targets(labels, height, width, mixup_coeffs, cutmix_box)
    return images, targets, weights


def mix_targets(labels: torch.Tensor, height: int, width: int, mixup_coeffs: Optional[torch.Tensor] = None,
                cutmix_box: Optional[torch.Tensor] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The (targets, weights) half of `mix_batch`, from the labels, the image size and the coefficients
    alone (the pipeline backend computes the loss on a stage that never sees the mixed images)."""
    targets = [labels]
    weights = [torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)]
    if mixup_coeffs is not None:
        m = mixup_coeffs.to(device=labels.device, dtype=torch.float32)
        targets = [labels, torch.roll(labels, 1, 0)]
        weights = [m, 1.0 - m]
    if cutmix_box is not None:
        mask = cutmix_mask(height, width, cutmix_box, device=labels.device)
        # c: the share of each image that is still its own, from the box actually pasted
        c = 1.0 - mask.to(torch.float32).mean()
        # the pasted pixels come from the (possibly mixed) sample i - 2 with its own targets and weights
        targets = targets + [torch.roll(t, 2, 0) for t in targets]
        weights = [w * c for w in weights] + [torch.roll(w, 2, 0) * (1.0 - c) for w in weights]
    return targets, weights


def mixed_cross_entropy(logits: torch.Tensor, targets: Sequence[torch.Tensor],
                        weights: Sequence[torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of sum_j w_j CE_s(targets_j), computed in fp32 (log-softmax of logits.float())."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    nll = None
    for target, weight in zip(targets, weights):
        term = -log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1) * weight.to(torch.float32)
        nll = term if nll is None else nll + term
    assert nll is not None, "at least one target"
    if label_smoothing > 0:
        per_sample = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=1)
    else:
        per_sample = nll
    return per_sample.mean()


def resolve_channels_last(train: Any, backend: str = "torch") -> bool:
    """`train.channels_last`, or where it is None (the default) whether this backend gains from it: the
    torch backend does (B0 training 1.6x on CPU, docs/PERFORMANCE.md); poptorch lays tensors out itself
    and the pipeline backend's stage boundaries were verified in the default layout only."""
    value = getattr(train, "channels_last", None)
    return bool(value) if value is not None else backend == "torch"


class TrainingModel(nn.Module):
    """A network with input normalisation, mixing and the loss inside `forward` (see the module docstring).

    model:               the network (images -> logits); kept as `self.model`
    label_smoothing:     s in CE_s, 0.1 in Graphcore's recipe
    mixup_alpha:         Beta(a, a) parameter; 0 turns mixup off
    cutmix:              cutmix on or off
    cutmix_lambda_range: [low, high) of the uniform cutmix coefficient
    cutmix_skip_rate:    probability that a batch gets no cutmix
    channels_last:       convert the network and each batch to channels_last
    input_dtype:         dtype the network receives; None: its first floating parameter's dtype
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix: bool = False, cutmix_lambda_range: Tuple[float, float] = CUTMIX_LAMBDA_RANGE,
                 cutmix_skip_rate: float = CUTMIX_SKIP_RATE, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, channels_last: bool = False,
                 input_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0: off), got {mixup_alpha}")
        low, high = cutmix_lambda_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"cutmix_lambda_range must satisfy 0 <= low <= high <= 1, got {cutmix_lambda_range}")
        if not 0 <= cutmix_skip_rate <= 1:
            raise ValueError(f"cutmix_skip_rate must be in [0, 1], got {cutmix_skip_rate}")
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        self.model = model
        self.label_smoothing = float(label_smoothing)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix = bool(cutmix)
        self.cutmix_lambda_range = (float(low), float(high))
        self.cutmix_skip_rate = float(cutmix_skip_rate)
        self.channels_last = bool(channels_last)
        self.input_dtype = input_dtype
        # A hook the IPU backend sets to `lambda loss: poptorch.identity_loss(loss, reduction="none")`,
        # which poptorch needs to recognise a loss it did not build itself. None: the loss as it is.
        self.mark_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        # Not persistent: the state dict holds only the network's weights ("model.*").
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, model: nn.Module, train: Any, **overrides: Any) -> TrainingModel:
        """From a `config.TrainConfig` (label_smoothing, mixup_alpha, cutmix, channels_last as
        `resolve_channels_last` reads it for the torch backend; another backend passes channels_last)."""
        kwargs = {"label_smoothing": train.label_smoothing, "mixup_alpha": train.mixup_alpha,
                  "cutmix": train.cutmix, "channels_last": resolve_channels_last(train)}
        kwargs.update(overrides)
        return cls(model, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Pieces of forward, public so that tests and backends can use them one at a time

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0-255) N x C x H x W -> float32 (x / 255 - mean) / std."""
        return (images.to(torch.float32) / 255.0 - self.mean) / self.std

    def sample_mixup(self, batch_size: int) -> torch.Tensor:
        """N mixup coefficients max(m, 1 - m), m ~ Beta(a, a), from torch's global CPU generator."""
        if self.mixup_alpha <= 0:
            raise ValueError("mixup is off (mixup_alpha = 0): nothing to sample")
        alpha = torch.tensor(self.mixup_alpha, dtype=torch.float32)
        m = torch.distributions.Beta(alpha, alpha).sample((batch_size,))
        return torch.maximum(m, 1.0 - m)

    def sample_cutmix_box(self, height: int, width: int) -> torch.Tensor:
        """One box (y1, x1, y2, x2) for the batch, empty with probability `cutmix_skip_rate`.
        Always draws four numbers from torch's global CPU generator, so the stream does not depend on
        whether the batch was skipped."""
        u_skip, u_lam, u_y, u_x = torch.rand(4, dtype=torch.float64).tolist()
        low, high = self.cutmix_lambda_range
        lam = 1.0 if u_skip < self.cutmix_skip_rate else low + (high - low) * u_lam
        cut_h = height * math.sqrt(1.0 - lam)
        cut_w = width * math.sqrt(1.0 - lam)
        # centre in [cut / 2, size - cut / 2): the box never reaches over the image border
        cy = (height - cut_h) * u_y + cut_h / 2.0
        cx = (width - cut_w) * u_x + cut_w / 2.0
        box = [round(cy - cut_h / 2.0), round(cx - cut_w / 2.0), round(cy + cut_h / 2.0), round(cx + cut_w / 2.0)]
        return torch.tensor(box, dtype=torch.int64)

    def loss(self, logits: torch.Tensor, targets: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
             label_smoothing: Optional[float] = None) -> torch.Tensor:
        s = self.label_smoothing if label_smoothing is None else label_smoothing
        loss = mixed_cross_entropy(logits, targets, weights, s)
        return self.mark_loss(loss) if self.mark_loss is not None else loss

    def network_dtype(self) -> torch.dtype:
        if self.input_dtype is not None:
            return self.input_dtype
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                mixup_coeffs: Optional[torch.Tensor] = None, cutmix_box: Optional[torch.Tensor] = None):
        x = self.normalize(images)
        mixing = self.training and labels is not None
        if not mixing and (mixup_coeffs is not None or cutmix_box is not None):
            raise ValueError("mixup_coeffs / cutmix_box apply only in training mode with labels")
        targets: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        if mixing:
            assert labels is not None
            if mixup_coeffs is None and self.mixup_alpha > 0:
                mixup_coeffs = self.sample_mixup(x.shape[0])
            if cutmix_box is None and self.cutmix:
                cutmix_box = self.sample_cutmix_box(x.shape[-2], x.shape[-1])
            x, targets, weights = mix_batch(x, labels, mixup_coeffs, cutmix_box)
        x = x.to(self.network_dtype())
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        if labels is None:
            return logits
        if mixing:
            return self.loss(logits, targets, weights), logits
        ones = torch.ones(labels.shape[0], dtype=torch.float32, device=logits.device)
        return self.loss(logits, [labels], [ones], label_smoothing=0.0), logits
