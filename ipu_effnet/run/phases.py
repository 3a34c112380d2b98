"""What one phase of a recipe is: its stages (resolution and regularisation) and how it differs from a
plain run (a network to start from, frozen layers, evaluation preprocessing). `recipes.py` builds these;
`loop.train_phase` runs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch.nn as nn

from ipu_effnet.config import Config
from ipu_effnet.data import create_dataset
from ipu_effnet.data.randaugment import RandAugment
from ipu_effnet.resolutions import train_resolution
from ipu_effnet.training.model import TrainingModel


@dataclass
class Stage:
    """One stage of a phase: its training resolution and regularisation (None: leave as built)."""

    resolution: int
    dropout: Optional[float] = None  # the model's `dropout` module rate
    randaugment: Optional[float] = None  # RandAugment magnitude; None or 0: off
    mixup: float = 0.0  # TrainingModel.mixup_alpha


@dataclass
class PhaseOptions:
    """How one phase of a recipe differs from a plain run (recipes.py builds these)."""

    name: str = "train"
    stages: Optional[List[Stage]] = None  # None: one stage at train_resolution(cfg), the config's regularisation
    model: Optional[nn.Module] = None  # the network to start from (e.g. the weight-averaged one); None: a new one
    freeze: bool = False  # freeze the modules before `first_trainable` (fine-tuning)
    first_trainable: Optional[str] = None  # None with freeze: freeze.default_first_trainable
    eval_preprocessing: bool = False  # training images get the evaluation transform (fine-tuning)
    tensorboard_dir: Optional[Path] = None  # None: run_dir/tensorboard (training/tb.py)
    step_offset: int = 0  # added to this phase's steps in TensorBoard (a recipe's later phases)


def phase_stages(cfg: Config, phase: PhaseOptions) -> List[Stage]:
    """The phase's stages: its own, else one at the config's resolution with the config's regularisation."""
    return phase.stages or [Stage(train_resolution(cfg), None, cfg.train.randaugment_magnitude,
                                  cfg.train.mixup_alpha)]


def stage_index(epoch: int, num_epochs: int, num_stages: int) -> int:
    """The stage an epoch belongs to when `num_epochs` are split evenly over `num_stages`."""
    return min(num_stages - 1, epoch * num_stages // max(num_epochs, 1))


def set_dropout(model: nn.Module, rate: float) -> None:
    """Set the classifier dropout rate: `model.dropout` is nn.Dropout, or nn.Identity when built at 0."""
    if isinstance(model.dropout, nn.Dropout):
        model.dropout.p = float(rate)
    elif rate > 0:
        model.dropout = nn.Dropout(float(rate))  # no parameters: the optimiser is unaffected


def apply_stage(stage: Stage, model: nn.Module, tm: TrainingModel) -> None:
    if stage.dropout is not None:
        set_dropout(model, stage.dropout)
    tm.mixup_alpha = float(stage.mixup)


def stage_train_set(cfg: Config, stage: Stage, eval_preprocessing: bool) -> Any:
    augment = None
    if stage.randaugment and not eval_preprocessing:
        augment = RandAugment(stage.randaugment, cfg.train.randaugment_ops)
    return create_dataset(cfg.data, "train", stage.resolution, train=not eval_preprocessing,
                          num_classes=cfg.model.num_classes, seed=cfg.train.seed, randaugment=augment)
