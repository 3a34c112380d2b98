"""What the datasets share: their errors and warnings, the split names, the random stream a dataset's
augmentation draws from (reseeded by the loader), and the evenly spaced subsets `data.num_train` and
`data.num_val` select."""

from __future__ import annotations

import random
from typing import Optional, Tuple

import numpy as np
import torch

from ipu_effnet.errors import UsageError

__all__ = ["SPLITS", "DataError", "DataWarning", "Sample", "Seedable", "evenly_spaced", "split_name"]

SPLITS = ("train", "validation")

Sample = Tuple[torch.Tensor, int]


class DataError(UsageError):
    """Bad data: a missing folder, no images, too many unreadable files, a class-count mismatch. One line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class DataWarning(UserWarning):
    """Data that was skipped or worked around: unreadable images, empty class folders, stray files."""


def split_name(split: str) -> str:
    name = {"train": "train", "validation": "validation", "val": "validation"}.get(str(split).lower())
    if name is None:
        raise DataError(f"split {split!r} is not one of 'train', 'validation' (or 'val')")
    return name


def evenly_spaced(n: int, limit: Optional[int]) -> np.ndarray:
    """`limit` distinct positions spread over range(n) (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit) * n) // limit


class Seedable:
    """The random stream a dataset's augmentation draws from; the loader calls reseed() per worker/epoch."""

    rng: Optional[random.Random] = None  # None: the global `random` module, until reseeded

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)
