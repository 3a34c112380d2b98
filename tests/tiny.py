"""The tiny training run the end-to-end tests share: efficientnet_tiny G16 with GroupNorm at 32 px on
the generated data (32 training and 12 validation images), micro-batch 4, one epoch, no progress bars.
Each test names only what it changes:

    TINY = tiny("train.epochs=3")                              # --set overrides, replaced or added
    TINY = tiny("norm.kind=batch", drop=("model.group_size",))  # a key left to the config or its default
"""

from __future__ import annotations

from typing import Dict, Iterable, List

BASE: Dict[str, str] = {
    "model.name": "efficientnet_tiny",
    "model.resolution": "32",
    "model.num_classes": "4",
    "model.group_size": "16",
    "model.drop_rate": "0.0",
    "model.drop_path_rate": "0.0",
    "norm.kind": "group",
    "data.num_train": "32",
    "data.num_val": "12",
    "train.micro_batch": "4",
    "train.epochs": "1",
    "logging.progress": "false",
}


def tiny(*changes: str, drop: Iterable[str] = ()) -> List[str]:
    """BASE as `key=value` overrides, with `changes` replacing or adding keys and `drop` removing some."""
    values = {k: v for k, v in BASE.items() if k not in set(drop)}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep:
            raise ValueError(f"{change!r}: expected key=value")
        values[key.strip()] = value.strip()
    return [f"{k}={v}" for k, v in values.items()]
