"""One builder for the whole family: width rounding, depth scaling, stride on the first block of a
stage, expansion and group-size overrides, and the drop-path schedule.

Blocks receive explicit per-block arguments (`BlockArgs`) and never know which variant they belong to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .specs import HEAD_CHS, StageSpec


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round to the nearest multiple of `divisor`, never below `min_value` (default: divisor), and
    bumped up by one divisor if rounding lost more than 10 % (EfficientNet's channel rounding)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def round_channels(chs: int, width: float) -> int:
    return make_divisible(chs * width)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


@dataclass(frozen=True)
class BlockArgs:
    """Everything one block needs, already scaled."""

    block: str             # "mbconv" | "fused"
    in_chs: int
    out_chs: int
    mid_chs: int           # expanded width (== in_chs without expansion)
    kernel: int
    stride: int
    groups: int            # groups of the MBConv spatial convolution (mid_chs = depthwise)
    se_chs: int            # squeeze-excite width (0 = no SE)
    drop_path_rate: float
    path: str              # module path in the built model, "blocks.<stage>.<index>"


def groups_for(channels: int, group_size: int, fit: bool, where: str) -> int:
    """Number of groups of a grouped convolution over `channels` with `group_size` channels per group.

    group_size must divide the channels. With `fit` (the *_g16 variants), a channel count that it does
    not divide takes max(channels // group_size, 1) groups, the rule of Graphcore's public G16 code
    (24 channels -> 1 group of 24; 40 -> 2 groups of 20); where even that does not divide the channels
    (56 in B6's stem), the largest smaller number of groups that does (56 -> 2 groups of 28).
    Without `fit` the mismatch is an error naming the convolution.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if channels % group_size == 0:
        return channels // group_size
    if fit:
        groups = max(channels // group_size, 1)
        while channels % groups:
            groups -= 1
        return groups
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    raise ValueError(
        f"group_size {group_size} does not divide the {channels} channels of {where}; "
        f"divisors of {channels}: {divisors} (or fit_group_size=True: max({channels} // {group_size}, 1) groups there)")


def build_blocks(stages: Sequence[StageSpec], width: float = 1.0, depth: float = 1.0, group_size: int = 1,
                 expand_ratio: Optional[float] = None, fit_group_size: bool = False,
                 drop_path_rate: float = 0.0) -> List[List[BlockArgs]]:
    """Scale a stage table into per-block arguments, one list per stage.

    - channels: `round_channels(ch, width)`; repeats: `ceil(repeats * depth)`;
    - the stage stride applies to its first block only; later blocks take the stage's output width;
    - `expand_ratio` replaces the expansion of every stage whose table expansion is not 1;
    - `group_size` is the channels per group of the MBConv spatial convolution (1 = depthwise;
      see `groups_for` for `fit_group_size`); Fused-MBConv has no separate spatial convolution and
      ignores it;
    - drop-path rate of block i (counted over the whole network, from 0) is rate * i / total_blocks.
    """
    repeats = [round_repeats(s.repeats, depth) for s in stages]
    total = sum(repeats)
    stage_args: List[List[BlockArgs]] = []
    index = 0
    for stage_idx, (spec, n) in enumerate(zip(stages, repeats)):
        blocks = []
        out_chs = round_channels(spec.out_chs, width)
        expand = spec.expand if (expand_ratio is None or spec.expand == 1) else expand_ratio
        for block_idx in range(n):
            in_chs = round_channels(spec.in_chs, width) if block_idx == 0 else out_chs
            mid_chs = in_chs if expand == 1 else make_divisible(in_chs * expand)
            path = f"blocks.{stage_idx}.{block_idx}"
            groups = 1
            if spec.block == "mbconv":
                groups = groups_for(mid_chs, group_size, fit_group_size, f"{path}.conv_dw")
            blocks.append(BlockArgs(
                block=spec.block,
                in_chs=in_chs,
                out_chs=out_chs,
                mid_chs=mid_chs,
                kernel=spec.kernel,
                stride=spec.stride if block_idx == 0 else 1,
                groups=groups,
                se_chs=max(1, int(in_chs * spec.se_ratio)) if spec.se_ratio > 0 else 0,
                drop_path_rate=drop_path_rate * index / total,
                path=path,
            ))
            index += 1
        stage_args.append(blocks)
    return stage_args


def stem_channels(stages: Sequence[StageSpec], width: float) -> int:
    return round_channels(stages[0].in_chs, width)


def head_channels(width: float) -> int:
    return round_channels(HEAD_CHS, width)
