"""The EfficientNet network: stem, stages of blocks, head, pooling, dropout, classifier.

Module paths (stable names for pipeline splits, recomputation and fine-tuning):

    stem                     conv 3x3 stride 2 + norm + act       (stem.conv, stem.norm)
    blocks.<stage>.<index>   MBConv / Fused-MBConv, stages from 0  (e.g. blocks.3.0.conv_pw)
    head                     conv 1x1 + norm + act                 (head.conv, head.norm)
    pool, dropout            global average pooling, dropout
    classifier               linear layer to the classes
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from norms import NormSpec
from norms.proxy import shared_proxy_stats

from .blocks import BLOCKS, ConvNormAct, mark_fresh_inputs
from .builder import BlockArgs


class EfficientNet(nn.Module):
    def __init__(self, block_args: Sequence[Sequence[BlockArgs]], stem_chs: int, head_chs: int,
                 num_classes: int = 1000, in_chans: int = 3, norm: Optional[NormSpec] = None, act: str = "silu",
                 drop_rate: float = 0.2) -> None:
        super().__init__()
        norm = NormSpec() if norm is None else norm
        self.num_classes = num_classes
        self.block_args: List[List[BlockArgs]] = [list(stage) for stage in block_args]
        self.stem = ConvNormAct(in_chans, stem_chs, 3, 2, norm, act)
        self.blocks = nn.Sequential(*[
            nn.Sequential(*[BLOCKS[args.block](args, norm, act) for args in stage]) for stage in self.block_args
        ])
        last_chs = self.block_args[-1][-1].out_chs
        self.head = ConvNormAct(last_chs, head_chs, 1, 1, norm, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(head_chs, num_classes)
        self.num_features = head_chs
        self._init_weights()
        mark_fresh_inputs(self)

    def _init_weights(self) -> None:
        # Convolutions: He-normal over fan-out (the EfficientNet reference); linear: uniform in
        # +-1/sqrt(out). Normalisation modules keep the initialisation they define themselves.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with shared_proxy_stats(self):  # Proxy Norm's statistics for all layers at once (norms/proxy.py)
            return self.forward_head(self.forward_features(x))

    def block_paths(self) -> List[str]:
        """`blocks.<stage>.<index>` for every block, in execution order."""
        return [args.path for stage in self.block_args for args in stage]
