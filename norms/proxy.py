"""Proxy Norm (Labatie et al. 2021). Arrives with the Proxy Norm issue."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .spec import NormSpec


def make_proxy_norm_act(spec: NormSpec, num_channels: int, act: Optional[str] = "silu",
                        apply_act: bool = True) -> nn.Module:
    raise NotImplementedError("Proxy Norm (NormSpec(proxy=True)) is not implemented yet")
