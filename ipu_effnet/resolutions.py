"""Every resolution a recipe uses, decided in one place.

    train_resolution(cfg)      model.resolution, else the model's native size
    eval_resolution(cfg)       data.eval_resolution, else the training resolution
    finetune_resolution(cfg)   finetune.resolution, else the model's native size
    halfres_resolution(cfg)    the half-resolution recipe's training size (below)

Half-resolution sizes: the paper's for B0..B5 (160, 176, 192, 204, 252, 328, also for their G16
variants; docs/reference.md section 5) and model.resolution when set; otherwise `halfres_rule`: native /
sqrt(2) (half the pixels) rounded to the nearest size with the same remainder modulo 32 as the fine-tune
resolution, ties to the smaller. The network's total stride is 32, so with equal remainders the last
feature maps are cropped and padded alike at both resolutions (the paper's advice, train % 32 ==
fine-tune % 32); the rule reproduces the paper's B0, B1, B3 and B5 sizes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ipu_effnet.models import native_resolution

# The paper's half-resolution training sizes (docs/reference.md section 5), by V1 variant.
HALFRES_SIZES: Dict[str, int] = {"efficientnet_b0": 160, "efficientnet_b1": 176, "efficientnet_b2": 192,
                                 "efficientnet_b3": 204, "efficientnet_b4": 252, "efficientnet_b5": 328}


def train_resolution(cfg: Any) -> int:
    return cfg.model.resolution or native_resolution(cfg.model.name)


def eval_resolution(cfg: Any) -> int:
    return cfg.data.eval_resolution or train_resolution(cfg)


def finetune_resolution(cfg: Any) -> int:
    return cfg.finetune.resolution or native_resolution(cfg.model.name)


def halfres_rule(native: int, finetune: Optional[int] = None) -> int:
    """native / sqrt(2) rounded to the nearest size with finetune's remainder mod 32 (ties: smaller)."""
    finetune = native if finetune is None else finetune
    target = native / math.sqrt(2.0)
    residue = finetune % 32
    below = residue + 32 * math.floor((target - residue) / 32)
    above = below + 32
    best = below if target - below <= above - target else above
    return int(best if best >= 32 else best + 32)


def halfres_resolution(cfg: Any) -> int:
    """The half-resolution training size: model.resolution, else the paper's, else `halfres_rule`."""
    if cfg.model.resolution:
        return cfg.model.resolution
    name = cfg.model.name[:-len("_g16")] if cfg.model.name.endswith("_g16") else cfg.model.name
    if name in HALFRES_SIZES:
        return HALFRES_SIZES[name]
    return halfres_rule(native_resolution(cfg.model.name), finetune_resolution(cfg))
