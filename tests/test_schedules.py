"""LR schedules at specific epochs: warm-up, Graphcore's 0.97 decay steps, the cosine end
(docs/reference.md section 6: lr(t) = lr0 * 0.97 ** floor(0.424 * t) * min(1, t / 5))."""

from __future__ import annotations

import math

import pytest

from ipu_effnet.config import TrainConfig
from ipu_effnet.training.schedules import (
    LRSchedule,
    constant_lr,
    cosine_lr,
    exponential_lr,
    scale_lr,
    schedule_from_config,
    warmup_factor,
)

LR0 = 0.05  # B0 at global batch 800


@pytest.mark.parametrize("t,expected", [
    (0.0, 0.0),                        # warm-up starts at zero (Graphcore's multiplicative warm-up)
    (1.0, LR0 * 0.2),                  # 1/5 of the way; floor(0.424) = 0 decays
    (2.5, LR0 * 0.5 * 0.97),           # floor(1.06) = 1 decay during warm-up
    (5.0, LR0 * 0.97 ** 2),            # warm-up done; floor(2.12) = 2
    (10.0, LR0 * 0.97 ** 4),           # floor(4.24) = 4
    (125.0, LR0 * 0.97 ** 53),         # 0.424 * 125 = 53 exactly: a decay step, not 52.999...
    (350.0, LR0 * 0.97 ** 148),        # the end of the run: floor(148.4)
])
def test_graphcore_exponential_schedule(t, expected):
    assert exponential_lr(t, LR0) == pytest.approx(expected, rel=1e-12, abs=0)
    assert LRSchedule("exponential", LR0, warmup_epochs=5)(t) == pytest.approx(expected, rel=1e-12, abs=0)


def test_exponential_decays_once_every_1_over_0_424_epochs():
    period = 1 / 0.424  # 2.358 epochs (not 2.4: Graphcore's lr_scheduler_freq)
    sched = LRSchedule("exponential", LR0, warmup_epochs=0)
    assert sched(period - 1e-6) == LR0
    assert sched(period + 1e-6) == pytest.approx(LR0 * 0.97)
    assert sched(2 * period - 1e-6) == pytest.approx(LR0 * 0.97)
    assert sched(2 * period + 1e-6) == pytest.approx(LR0 * 0.97 ** 2)
    # "every 2.4 epochs" written as a rate: (1 / 2.4) * 74.4 is 30.999999999999996 in floating point,
    # which must still count as the 31st decay
    assert exponential_lr(2.4 * 31, 1.0, decays_per_epoch=1 / 2.4, warmup_epochs=0) == pytest.approx(0.97 ** 31)
    # and with a custom rate: every 2 epochs, halve
    assert exponential_lr(4.1, 1.0, decay_rate=0.5, decays_per_epoch=0.5, warmup_epochs=0) == 0.25


def test_cosine_with_warmup():
    sched = LRSchedule("cosine", 0.25, warmup_epochs=0, total_epochs=2)
    assert sched(0) == 0.25
    assert sched(0.5) == pytest.approx(0.25 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert sched(1.0) == pytest.approx(0.125, rel=1e-12)
    assert sched(2.0) == pytest.approx(0.0, abs=1e-15)   # the cosine end
    assert sched(3.0) == pytest.approx(0.0, abs=1e-15)   # held there
    warm = LRSchedule("cosine", 1.0, warmup_epochs=5, total_epochs=100)
    assert warm(0) == 0.0
    assert warm(2.5) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.025)), rel=1e-12)
    assert warm(50) == pytest.approx(0.5, rel=1e-12)
    assert cosine_lr(100, 1.0, 100, 5) == pytest.approx(0.0, abs=1e-15)


def test_constant_and_warmup():
    assert constant_lr(0.0, 0.1, warmup_epochs=4) == 0.0
    assert constant_lr(1.0, 0.1, warmup_epochs=4) == pytest.approx(0.025)
    assert constant_lr(4.0, 0.1, warmup_epochs=4) == 0.1
    assert constant_lr(40.0, 0.1, warmup_epochs=4) == 0.1
    assert constant_lr(0.0, 0.1, warmup_epochs=0) == 0.1
    assert warmup_factor(0.3, 0) == 1.0 and warmup_factor(-1, 2) == 0.0


def test_at_step_and_linear_batch_scaling():
    sched = LRSchedule("exponential", LR0, warmup_epochs=5)
    assert sched.at_step(250, steps_per_epoch=100) == pytest.approx(LR0 * 0.5 * 0.97)
    assert scale_lr(0.05, 1600, 800) == pytest.approx(0.1)
    assert scale_lr(0.05, 400, 800) == pytest.approx(0.025)
    with pytest.raises(ValueError):
        scale_lr(0.05, 0, 800)


def test_schedule_from_config():
    cfg = TrainConfig()  # Graphcore's B0 recipe: exponential, lr 0.05, 5 warm-up epochs
    sched = schedule_from_config(cfg)
    assert (sched.name, sched.lr0, sched.warmup_epochs) == ("exponential", 0.05, 5.0)
    assert sched(10) == pytest.approx(0.05 * 0.97 ** 4)
    scaled = schedule_from_config(cfg, global_batch=2048, reference_batch=800)
    assert scaled.lr0 == pytest.approx(0.05 * 2048 / 800)
    cos = schedule_from_config(TrainConfig(lr_schedule="cosine", lr=0.25, warmup_epochs=0, epochs=2))
    assert cos(2) == pytest.approx(0.0, abs=1e-15) and cos(0) == 0.25
    ft = schedule_from_config(TrainConfig(lr_schedule="cosine", warmup_epochs=0), lr=0.25, total_epochs=2)
    assert ft(1) == pytest.approx(0.125)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        LRSchedule("step", 0.1)
    with pytest.raises(ValueError, match="total_epochs"):
        LRSchedule("cosine", 0.1)
    with pytest.raises(ValueError):
        LRSchedule("constant", -1.0)
