"""Learning-rate schedules as pure functions of the fractional epoch t (nanoGPT's `get_lr`, by epoch).

Graphcore's EfficientNet recipe (docs/reference.md section 6):

    lr(t) = lr0 * 0.97 ** floor(0.424 * t) * min(1, t / 5)

0.424 is Graphcore's `lr_scheduler_freq`: the number of decay steps per epoch, one every 1 / 0.424 = 2.36
epochs (the EfficientNet paper decays by 0.97 every 2.4 epochs; 1 / 2.4 would be 0.4167, so Graphcore's
figure is not that rounded: it is kept as published). The warm-up multiplies, as Graphcore's
`WarmUpLRDecorator` does, so at t = 0 the rate is 0. The other schedules follow the same pattern:

    cosine:    lr0 * 0.5 * (1 + cos(pi * min(t, T) / T)) * min(1, t / warmup)    (0 at t >= T)
    constant:  lr0 * min(1, t / warmup)

A warm-up of 0 epochs means no warm-up. Linear scaling with the global batch, when asked for, is
lr0 * global_batch / reference_batch (Goyal et al.; Graphcore states lr0 at its global batch).

    sched = LRSchedule("exponential", lr0=0.05, warmup_epochs=5)
    lr = sched(step / steps_per_epoch)        # or sched.at_step(step, steps_per_epoch)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "LRSchedule",
    "SCHEDULE_NAMES",
    "constant_lr",
    "cosine_lr",
    "exponential_lr",
    "scale_lr",
    "schedule_from_config",
    "warmup_factor",
]

SCHEDULE_NAMES = ("exponential", "cosine", "constant")  # the same names as config.LR_SCHEDULES

# floor() of a product that should be an integer (0.424 * 125 = 53) must not fall to 52.99999...
_FLOOR_SLACK = 1e-9


def warmup_factor(t: float, warmup_epochs: float) -> float:
    """min(1, t / warmup_epochs); 1 when there is no warm-up."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(t, 0.0) / warmup_epochs)


def exponential_lr(t: float, lr0: float, decay_rate: float = 0.97, decays_per_epoch: float = 0.424,
                   warmup_epochs: float = 5.0) -> float:
    """Graphcore's schedule: lr0 * decay_rate ** floor(decays_per_epoch * t) * min(1, t / warmup)."""
    decays = math.floor(decays_per_epoch * max(t, 0.0) + _FLOOR_SLACK)
    return lr0 * decay_rate ** decays * warmup_factor(t, warmup_epochs)


def cosine_lr(t: float, lr0: float, total_epochs: float, warmup_epochs: float = 0.0) -> float:
    """lr0 * 0.5 * (1 + cos(pi * t / T)) * min(1, t / warmup), held at 0 after T."""
    if total_epochs <= 0:
        raise ValueError(f"cosine schedule needs total_epochs > 0, got {total_epochs}")
    progress = min(max(t, 0.0), total_epochs) / total_epochs
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * progress)) * warmup_factor(t, warmup_epochs)


def constant_lr(t: float, lr0: float, warmup_epochs: float = 0.0) -> float:
    return lr0 * warmup_factor(t, warmup_epochs)


def scale_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling: lr * global_batch / reference_batch."""
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be > 0, got global {global_batch}, reference {reference_batch}")
    return lr * global_batch / reference_batch


@dataclass(frozen=True)
class LRSchedule:
    """A schedule built once from config values; call it with the fractional epoch."""

    name: str  # exponential | cosine | constant
    lr0: float
    warmup_epochs: float = 0.0
    total_epochs: Optional[float] = None  # cosine only
    decay_rate: float = 0.97  # exponential only
    decays_per_epoch: float = 0.424  # exponential only

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(f"unknown lr schedule {self.name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
        if self.lr0 < 0 or self.warmup_epochs < 0:
            raise ValueError(f"lr0 and warmup_epochs must be >= 0, got {self.lr0} and {self.warmup_epochs}")
        if self.name == "cosine" and (self.total_epochs is None or self.total_epochs <= 0):
            raise ValueError(f"the cosine schedule needs total_epochs > 0, got {self.total_epochs}")

    def __call__(self, t: float) -> float:
        if self.name == "exponential":
            return exponential_lr(t, self.lr0, self.decay_rate, self.decays_per_epoch, self.warmup_epochs)
        if self.name == "cosine":
            assert self.total_epochs is not None
            return cosine_lr(t, self.lr0, self.total_epochs, self.warmup_epochs)
        return constant_lr(t, self.lr0, self.warmup_epochs)

    def at_step(self, step: int, steps_per_epoch: int) -> float:
        """The rate for optimiser step `step` (0-based), at t = step / steps_per_epoch."""
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
        return self(step / steps_per_epoch)


def schedule_from_config(train: Any, *, lr: Optional[float] = None, total_epochs: Optional[float] = None,
                         global_batch: Optional[int] = None,
                         reference_batch: Optional[int] = None) -> LRSchedule:
    """From a `config.TrainConfig` (lr, lr_schedule, warmup_epochs, epochs). `lr`/`total_epochs` override
    the config's; with both `global_batch` and `reference_batch`, lr0 is scaled linearly."""
    lr0 = train.lr if lr is None else lr
    if global_batch is not None and reference_batch is not None:
        lr0 = scale_lr(lr0, global_batch, reference_batch)
    total = train.epochs if total_epochs is None else total_epochs
    return LRSchedule(train.lr_schedule, lr0, warmup_epochs=train.warmup_epochs, total_epochs=total)
