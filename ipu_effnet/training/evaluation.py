"""Validation on the host: top-1, top-5 and mean cross entropy of a network over a loader.

    metrics = evaluate(model, loader, device, precision)              # this process's loader
    metrics = evaluate(model, loader, device, precision, reduce=sum)  # counts summed over processes

`model` is a bare network or its `TrainingModel` (the loss inside forward, the input normalisation on
the device); the loader yields uint8 host batches. `reduce` takes and returns a dict of float counts
(the host collectives' `all_reduce_sum`), so every data-parallel process reports the whole set.

`inference_model(network)` is what a finished checkpoint is evaluated with (`sweep`, `evaluate`): the
inference copy (BatchNorm folded, Proxy Norm's statistics frozen, `models/fold.py`) in channels_last,
the layout the torch backend trains in. It gives the same logits to rounding, in less time
(docs/PERFORMANCE.md, fast paths, "Evaluation of a checkpoint").
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from ipu_effnet.training.model import TrainingModel
from ipu_effnet.training.precision import autocast_dtype

Reduce = Callable[[Dict[str, float]], Dict[str, float]]


def inference_model(network: nn.Module, channels_last: bool = True) -> TrainingModel:
    """The `TrainingModel` (plain cross entropy, input normalisation) around the inference copy of
    `network`; `network` itself is left as it is."""
    from ipu_effnet.models.fold import inference_copy

    return TrainingModel(inference_copy(network), channels_last=channels_last).eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, precision: str = "32.32",
             reduce: Optional[Reduce] = None) -> Dict[str, float]:
    """Top-1, top-5 (fractions), mean cross entropy and the sample count over every batch of `loader`."""
    tm = model if isinstance(model, TrainingModel) else TrainingModel(model)
    was_training = tm.training
    tm.eval()
    amp = autocast_dtype(precision, device)
    ctx = torch.autocast(device_type=device.type, dtype=amp) if amp is not None else None
    sums = {"correct1": 0.0, "correct5": 0.0, "loss": 0.0, "samples": 0.0}
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if ctx is not None:
            with ctx:
                loss, logits = tm(images, labels)
        else:
            loss, logits = tm(images, labels)
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums["correct1"] += float(hit[:, 0].sum())
        sums["correct5"] += float(hit.any(1).sum())
        sums["loss"] += float(loss) * labels.shape[0]
        sums["samples"] += labels.shape[0]
    tm.train(was_training)
    return summarise(reduce(sums) if reduce is not None else sums)


def summarise(sums: Dict[str, float]) -> Dict[str, float]:
    """Fractions and the mean loss from summed counts (correct1, correct5, loss, samples)."""
    n = max(sums["samples"], 1.0)
    return {"top1": sums["correct1"] / n, "top5": sums["correct5"] / n, "loss": sums["loss"] / n,
            "samples": int(sums["samples"])}
