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
    with averager.swapped_in(net):            # evaluate the averaged weights, then put the live ones back
        evaluate(net)
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Union

import torch
import torch.nn as nn

__all__ = ["AVERAGING_INTERVALS", "WeightAverager"]

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

    def _stored(self, value: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(value.dtype, torch.float32) if value.is_floating_point() else value.dtype
        return value.detach().to(device=self.device if self.device is not None else value.device, dtype=dtype, copy=True)

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

    def averaged_state(self) -> Dict[str, torch.Tensor]:
        """A copy of the averaged state dict (in the averager's dtypes)."""
        self._require()
        return {name: value.clone() for name, value in self.average.items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s weights and buffers with the average (cast to the model's dtypes)."""
        self._require()
        _copy_state(model, self.average)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block `model` holds the averaged weights; afterwards its own come back."""
        self._require()
        live = {name: value.detach().clone() for name, value in model.state_dict().items()}
        _copy_state(model, self.average)
        try:
            yield model
        finally:
            _copy_state(model, live)

    def state_dict(self) -> Dict[str, object]:
        """Plain data for a checkpoint (tensors, numbers, strings)."""
        return {"decay": self.decay, "interval": self.interval, "num_updates": self.num_updates,
                "average": {name: value.detach().clone() for name, value in self.average.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.interval = str(state["interval"])
        self.num_updates = int(state["num_updates"])  # type: ignore[call-overload]
        average = state["average"]
        assert isinstance(average, dict)
        self.average = {name: self._stored(value) for name, value in average.items()}

    def _require(self) -> None:
        if self.num_updates == 0:
            raise RuntimeError("the average is empty: call update(model) at least once first")


@torch.no_grad()
def _copy_state(model: nn.Module, source: Dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    missing = set(source) ^ set(target)
    if missing:
        raise KeyError(f"the model's state does not match the average: {sorted(missing)[:5]}")
    for name, value in target.items():
        value.copy_(source[name])
