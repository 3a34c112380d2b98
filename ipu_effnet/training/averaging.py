"""Exponential weight averaging: over per-epoch checkpoints (the paper's), or per step (an EMA).

Masters et al. (2021, section 5 and appendix) evaluate and fine-tune from an exponential moving average of
the per-epoch checkpoints with decay 0.97; Graphcore's `weight_avg.py` initialises the average with the
first checkpoint and then folds in each later one. Here the average is kept during training instead of
re-reading checkpoints, which gives the same numbers:

    first update:  avg = w_1
    then:          avg = decay * avg + (1 - decay) * w_k

so after epochs 1..3, avg = d^2 w_1 + d (1 - d) w_2 + (1 - d) w_3. The loop calls `update` at each epoch
end (interval "epoch") or after each optimiser step (interval "step", an EMA with a decay such as 0.9999).

What is averaged: every floating-point entry of the model's state dict, i.e. the parameters and the
floating buffers (BatchNorm running mean and variance); integer buffers (num_batches_tracked) are copied
from the latest weights. The average is kept in at least fp32 (fp16 weights are averaged in fp32) on the
device given (default: where the weights are). Pass the network itself, not a DDP wrapper, so the names
match the checkpoint's model state.

    averager = WeightAverager(decay=0.97)
    averager.update(net)                      # at each epoch end
    recalibrate_average(averager, net, train_loader, num_batches=100)   # BatchNorm statistics, see below
    with averager.swapped_in(net):            # evaluate the averaged weights, then put the live ones back
        evaluate(net)

BatchNorm statistics: the averaged running mean and variance belong to no set of weights (an average of
other weights' statistics) and can wreck the averaged model's accuracy. `recalibrate_average` runs
batches through the averaged network (`bn_stats.recalibrate_batchnorm`: BN in train mode, cumulative
average, no_grad) and stores the resulting statistics beside the average, tagged with the update count
they belong to (`bn_stats_at`). While they are current (no `update` since), `swapped_in`, `copy_to`,
`averaged_state` and `averaged_model_state` (for a checkpoint's stored averager) put them over the
averaged ones; an `update` makes them stale and they are ignored until recomputed. The average itself
keeps averaging the raw running statistics, so a resumed run continues the same average. The stored
statistics travel in `state_dict()`, i.e. in every checkpoint, so evaluate, finetune and sweep of
`--averaged` weights get them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["AVERAGING_INTERVALS", "WeightAverager", "averaged_model_state", "recalibrate_average"]

AVERAGING_INTERVALS = ("epoch", "step")


class WeightAverager:
    """avg <- decay * avg + (1 - decay) * weights; the first update copies the weights."""

    def __init__(self, decay: float = 0.97, interval: str = "epoch",
                 device: Optional[Union[str, torch.device]] = None) -> None:
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if interval not in AVERAGING_INTERVALS:
            raise ValueError(f"interval must be one of {', '.join(AVERAGING_INTERVALS)}, got {interval!r}")
        self.decay = float(decay)
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.num_updates = 0
        self.average: Dict[str, torch.Tensor] = {}
        self.bn_stats: Dict[str, torch.Tensor] = {}  # recomputed BatchNorm statistics of the average
        self.bn_stats_at: Optional[int] = None  # num_updates they were computed at
        self.bn_stats_images = 0  # images (all processes) they were computed over

    def _stored(self, value: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(value.dtype, torch.float32) if value.is_floating_point() else value.dtype
        # as_subclass: a tensor subclass (poptorch's wrapped buffers keep theirs through detach) is stored
        # as the plain tensor a checkpoint can hold
        return value.detach().as_subclass(torch.Tensor).to(device=self.device if self.device is not None else value.device,
                                                           dtype=dtype, copy=True)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        if self.num_updates == 0:
            self.average = {name: self._stored(value) for name, value in state.items()}
        else:
            missing = set(self.average) ^ set(state)
            if missing:
                raise KeyError(f"the model's state does not match the average: {sorted(missing)[:5]}")
            for name, value in state.items():
                avg = self.average[name]
                if avg.is_floating_point():
                    avg.mul_(self.decay).add_(value.detach().to(device=avg.device, dtype=avg.dtype),
                                              alpha=1.0 - self.decay)
                else:
                    avg.copy_(value)
        self.num_updates += 1

    @property
    def bn_stats_current(self) -> bool:
        """True when recomputed BatchNorm statistics exist for the average as it is now."""
        return bool(self.bn_stats) and self.bn_stats_at == self.num_updates

    def set_bn_stats(self, stats: Dict[str, torch.Tensor], images: int = 0) -> None:
        """Store recomputed BatchNorm statistics (state-dict keys -> tensors) for the current average."""
        self._require()
        unknown = set(stats) - set(self.average)
        if unknown:
            raise KeyError(f"BatchNorm statistics for entries the average does not hold: {sorted(unknown)[:5]}")
        self.bn_stats = {name: self._stored(value) for name, value in stats.items()}
        self.bn_stats_at = self.num_updates
        self.bn_stats_images = int(images)

    def _model_state(self) -> Dict[str, torch.Tensor]:
        if not self.bn_stats_current:
            return self.average
        return dict(self.average, **self.bn_stats)

    def averaged_state(self) -> Dict[str, torch.Tensor]:
        """A copy of the averaged model's state dict (in the averager's dtypes), with the recomputed
        BatchNorm statistics when they are current."""
        self._require()
        return {name: value.clone() for name, value in self._model_state().items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s weights and buffers with the averaged model (cast to the model's dtypes)."""
        self._require()
        _copy_state(model, self._model_state())

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block `model` holds the averaged weights; afterwards its own come back."""
        self._require()
        live = {name: value.detach().clone() for name, value in model.state_dict().items()}
        _copy_state(model, self._model_state())
        try:
            yield model
        finally:
            _copy_state(model, live)

    def state_dict(self) -> Dict[str, object]:
        """Plain data for a checkpoint (tensors, numbers, strings)."""
        return {"decay": self.decay, "interval": self.interval, "num_updates": self.num_updates,
                "average": {name: value.detach().clone() for name, value in self.average.items()},
                "bn_stats": {name: value.detach().clone() for name, value in self.bn_stats.items()},
                "bn_stats_at": self.bn_stats_at, "bn_stats_images": self.bn_stats_images}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.interval = str(state["interval"])
        self.num_updates = int(state["num_updates"])  # type: ignore[call-overload]
        average = state["average"]
        assert isinstance(average, dict)
        self.average = {name: self._stored(value) for name, value in average.items()}
        stats = state.get("bn_stats") or {}  # absent in checkpoints written before recalibration existed
        assert isinstance(stats, dict)
        self.bn_stats = {name: self._stored(value) for name, value in stats.items()}
        at = state.get("bn_stats_at")
        self.bn_stats_at = int(at) if at is not None else None  # type: ignore[call-overload]
        self.bn_stats_images = int(state.get("bn_stats_images") or 0)  # type: ignore[call-overload]

    def _require(self) -> None:
        if self.num_updates == 0:
            raise RuntimeError("the average is empty: call update(model) at least once first")


def averaged_model_state(state: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """The averaged model's state dict from a stored `WeightAverager.state_dict()` (a checkpoint's
    `averagers[name]`): the average, with the recomputed BatchNorm statistics when they are current."""
    averager = WeightAverager()
    averager.load_state_dict(state)
    return averager.averaged_state()


def recalibrate_average(averager: WeightAverager, model: nn.Module, batches: Iterable[Any], num_batches: int,
                        skip: Sequence[str] = (), **kwargs: Any) -> int:
    """Recompute the BatchNorm statistics of the averaged weights (`bn_stats.recalibrate_batchnorm`, whose
    keyword arguments pass through) and store them in `averager`; `model` is the network the average
    belongs to and gets its own weights back. Returns the images this process ran; 0 when the network
    has no BatchNorm outside `skip` or num_batches is 0 (then nothing runs and nothing is stored)."""
    from ipu_effnet.training.bn_stats import has_batchnorm, recalibrate_batchnorm, running_stats

    if num_batches <= 0 or not has_batchnorm(model, skip):
        return 0
    with averager.swapped_in(model):
        images = recalibrate_batchnorm(model, batches, num_batches, skip=skip, **kwargs)
        stats = running_stats(model, skip)
    collectives = kwargs.get("collectives")
    total = images
    if collectives is not None and getattr(collectives, "size", 1) > 1:
        total = int(collectives.all_reduce_sum({"images": float(images)})["images"])
    averager.set_bn_stats(stats, total)
    return images


@torch.no_grad()
def _copy_state(model: nn.Module, source: Dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    missing = set(source) ^ set(target)
    if missing:
        raise KeyError(f"the model's state does not match the average: {sorted(missing)[:5]}")
    for name, value in target.items():
        value.copy_(source[name])
