"""Precision names (Graphcore's weights.partials: 32.32, 16.32, 16.16, and bf16) and what autocast
offers for each on a host device. The IPU backend maps the same names to poptorch's options."""

from __future__ import annotations

from typing import Optional

import torch

# Graphcore's precision names (weights.partials) mapped to what autocast offers on each device.
_AUTOCAST = {
    ("32.32", "cpu"): None,
    ("32.32", "cuda"): None,
    ("bf16", "cpu"): torch.bfloat16,
    ("bf16", "cuda"): torch.bfloat16,
    ("16.32", "cpu"): torch.bfloat16,   # CPUs have no fast fp16: bf16 is the reduced precision there
    ("16.16", "cpu"): torch.bfloat16,
    ("16.32", "cuda"): torch.float16,
    ("16.16", "cuda"): torch.float16,
}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    try:
        return _AUTOCAST[(precision, device.type)]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not supported on {device.type}") from None
