"""The EfficientNet family as tables that read like the papers' tables.

One row per stage: (block, expand, kernel, stride, in, out, repeats, SE ratio), for the base network
before width/depth scaling. A second table holds each variant's scaling coefficients, native resolution
and dropout. The builder (`builder.py`) is the only place that turns these into per-block arguments.

Sources: EfficientNet (Tan & Le 2019, arXiv 1905.11946) Table 1 and the compound-scaling coefficients;
EfficientNetV2 (Tan & Le 2021, arXiv 2104.00298) Table 4 and its S/M/L configurations;
G16 (Masters et al. 2021, arXiv 2106.03640) section 3: 16 channels per group, expansion 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

MBCONV = "mbconv"
FUSED = "fused"


@dataclass(frozen=True)
class StageSpec:
    """One stage of the base network: `repeats` blocks, the first with `stride`."""

    block: str        # MBCONV or FUSED
    expand: int       # expansion ratio of the inverted residual (1 = no expansion conv)
    kernel: int       # spatial kernel size
    stride: int       # stride of the first block of the stage
    in_chs: int
    out_chs: int
    repeats: int
    se_ratio: float   # squeeze-excite width as a fraction of the block's *input* channels (0 = none)


def _mb(expand, kernel, stride, in_chs, out_chs, repeats, se_ratio=0.25):
    return StageSpec(MBCONV, expand, kernel, stride, in_chs, out_chs, repeats, se_ratio)


def _fused(expand, kernel, stride, in_chs, out_chs, repeats):
    return StageSpec(FUSED, expand, kernel, stride, in_chs, out_chs, repeats, 0.0)


# EfficientNet-B0 (paper Table 1; stage numbering here starts at 0 after the stem).
#           expand kernel stride  in  out repeats
EFFICIENTNET_V1 = (
    _mb(1, 3, 1, 32, 16, 1),
    _mb(6, 3, 2, 16, 24, 2),
    _mb(6, 5, 2, 24, 40, 2),
    _mb(6, 3, 2, 40, 80, 3),
    _mb(6, 5, 1, 80, 112, 3),
    _mb(6, 5, 2, 112, 192, 4),
    _mb(6, 3, 1, 192, 320, 1),
)

#               expand kernel stride  in  out repeats
EFFICIENTNET_V2_S = (
    _fused(1, 3, 1, 24, 24, 2),
    _fused(4, 3, 2, 24, 48, 4),
    _fused(4, 3, 2, 48, 64, 4),
    _mb(4, 3, 2, 64, 128, 6),
    _mb(6, 3, 1, 128, 160, 9),
    _mb(6, 3, 2, 160, 256, 15),
)

EFFICIENTNET_V2_M = (
    _fused(1, 3, 1, 24, 24, 3),
    _fused(4, 3, 2, 24, 48, 5),
    _fused(4, 3, 2, 48, 80, 5),
    _mb(4, 3, 2, 80, 160, 7),
    _mb(6, 3, 1, 160, 176, 14),
    _mb(6, 3, 2, 176, 304, 18),
    _mb(6, 3, 1, 304, 512, 5),
)

EFFICIENTNET_V2_L = (
    _fused(1, 3, 1, 32, 32, 4),
    _fused(4, 3, 2, 32, 64, 7),
    _fused(4, 3, 2, 64, 96, 7),
    _mb(4, 3, 2, 96, 192, 10),
    _mb(6, 3, 1, 192, 224, 19),
    _mb(6, 3, 2, 224, 384, 25),
    _mb(6, 3, 1, 384, 640, 7),
)

HEAD_CHS = 1280  # before width scaling


@dataclass(frozen=True)
class ModelDef:
    """A named variant: a stage table, its scaling coefficients and its defaults."""

    stages: Tuple[StageSpec, ...]
    width: float
    depth: float
    train_res: int            # native training resolution
    eval_res: int             # native test resolution (V2 tests above its training resolution)
    drop_rate: float          # dropout before the classifier
    group_size: int = 1       # channels per group of the MBConv spatial convolution (1 = depthwise)
    expand_ratio: Optional[float] = None   # override of the inverted-residual stages' expansion
    fit_group_size: bool = False           # see builder.groups_for
    family: str = "efficientnet"



# Compound-scaling coefficients (EfficientNet paper, section 3.3 and the public code's table).
#            width depth  res  dropout
_V1_COEFFICIENTS: Dict[str, Tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}

# G16 (Masters et al. 2021): 16 channels per group in every spatial convolution, expansion 4.
G16_GROUP_SIZE = 16
G16_EXPAND_RATIO = 4


def _registry() -> Dict[str, ModelDef]:
    models: Dict[str, ModelDef] = {}
    for key, (width, depth, res, dropout) in _V1_COEFFICIENTS.items():
        models[f"efficientnet_{key}"] = ModelDef(EFFICIENTNET_V1, width, depth, res, res, dropout)
        # Every expanded convolution of a G16 variant has exactly 16 channels per group. The expand-1
        # first stage of B3..B6 runs on 24, 40 or 56 channels, which 16 does not divide: there the
        # group count is fitted (builder.groups_for), as Graphcore's public G16 code does.
        models[f"efficientnet_{key}_g16"] = ModelDef(
            EFFICIENTNET_V1, width, depth, res, res, dropout,
            group_size=G16_GROUP_SIZE, expand_ratio=G16_EXPAND_RATIO, fit_group_size=True)
    #                                                  width depth train eval dropout
    models["efficientnetv2_s"] = ModelDef(EFFICIENTNET_V2_S, 1.0, 1.0, 300, 384, 0.2, family="efficientnetv2")
    models["efficientnetv2_m"] = ModelDef(EFFICIENTNET_V2_M, 1.0, 1.0, 384, 480, 0.3, family="efficientnetv2")
    models["efficientnetv2_l"] = ModelDef(EFFICIENTNET_V2_L, 1.0, 1.0, 384, 480, 0.4, family="efficientnetv2")
    # A small member of the V1 family for tests and the CPU quickstart: every channel count a
    # multiple of 16 after expansion, so it runs with group_size 16 as well.
    models["efficientnet_tiny"] = ModelDef(EFFICIENTNET_V1, 0.5, 0.3, 64, 64, 0.1)
    return models


MODELS: Dict[str, ModelDef] = _registry()
