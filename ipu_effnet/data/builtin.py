"""The datasets that need no files: generated images and scikit-learn's bundled 8x8 digits.

generated
    Random uint8 images, any size and number of classes, for throughput runs and tests. Sample i is a
    pure function of (seed, split, i), so every worker and every rank sees the same image for an index;
    its label is i % num_classes and the image is uniform noise in [0, 127] plus half a per-class colour,
    so a model can learn the classes from the mean colour. Train and validation draw different images.

digits
    scikit-learn's `load_digits()`: 1,797 real 8x8 handwritten digits (10 classes, values 0..16), shipped
    with the package. Values are scaled to 0..255 (round(v * 255 / 16)), upsampled to the requested
    resolution with Pillow's bilinear filter (smooth strokes rather than blocks), and repeated over three
    channels. The split is fixed and stratified: for each class in turn (0 to 9), a permutation drawn from
    one `numpy.random.RandomState(0)` (a frozen, version-stable stream) puts its first 30 images into
    validation and the rest into training: 1,497 training and 300 validation images, 30 of each class
    in validation. Training augmentation is a random translation by up to max(1, res // 16) pixels
    (half an original digit pixel) with black fill; no flip, as digits are not flip-invariant.
"""

from __future__ import annotations

import functools
import random
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ipu_effnet.data.base import SPLITS, DataError, Sample, Seedable, evenly_spaced, split_name
from ipu_effnet.data.transforms import BILINEAR, random_translate

__all__ = [
    "DIGITS_NUM_IMAGES",
    "DIGITS_VAL_PER_CLASS",
    "GENERATED_DEFAULT_CLASSES",
    "GENERATED_DEFAULT_SIZES",
    "DigitsDataset",
    "GeneratedDataset",
    "digits_split",
]

GENERATED_DEFAULT_SIZES = {"train": 1024, "validation": 256}  # images per epoch when num_train/num_val unset
GENERATED_DEFAULT_CLASSES = 1000
DIGITS_NUM_IMAGES = 1797
DIGITS_NUM_CLASSES = 10
DIGITS_VAL_PER_CLASS = 30  # 300 validation images, 1,497 training images
DIGITS_SPLIT_SEED = 0


# ----------------------------------------------------------------------------------------------------
# generated


class GeneratedDataset(Dataset):
    """Deterministic random uint8 images: sample i depends only on (seed, split, i); label i % num_classes."""

    def __init__(self, num_samples: int, num_classes: int = GENERATED_DEFAULT_CLASSES,
                 resolution: Union[int, Sequence[int]] = 224, seed: int = 0, split: str = "train",
                 channels: int = 3) -> None:
        if num_samples < 1 or num_classes < 1 or channels < 1:
            raise DataError(f"generated data: num_samples = {num_samples}, num_classes = {num_classes}, "
                            f"channels = {channels}; expected each >= 1")
        if isinstance(resolution, int):
            height = width = resolution
        else:
            height, width = (int(v) for v in resolution)
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.shape = (int(channels), int(height), int(width))
        self.seed = int(seed)
        self.split = split_name(split)
        self._split_id = SPLITS.index(self.split)
        # One mean colour per class (shared by both splits); half of it is added to noise in [0, 127].
        colours = np.random.default_rng([self.seed, 0xC010]).integers(0, 256, (self.num_classes, channels))
        self.class_colours = colours.astype(np.uint8)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} generated images")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, self._split_id, index])
        image = rng.integers(0, 128, self.shape, dtype=np.uint8)
        image += (self.class_colours[label] // 2)[:, None, None]  # at most 127 + 127: no overflow
        return torch.from_numpy(image), label

    def __repr__(self) -> str:
        return (f"GeneratedDataset({self.num_samples} images, {self.num_classes} classes, shape={self.shape}, "
                f"seed={self.seed}, split={self.split!r})")


# ----------------------------------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8 scaled to 0..255, labels int64 N) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits data: scikit-learn is not installed; the digits dataset is its bundled "
                        "load_digits() (pip install scikit-learn)") from None
    bunch = load_digits()
    images = np.round(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


def digits_split() -> Tuple[np.ndarray, np.ndarray]:
    """The fixed (train, validation) index arrays into load_digits(), each sorted: per class 0..9 in
    turn, the first DIGITS_VAL_PER_CLASS of a RandomState(DIGITS_SPLIT_SEED) permutation go to validation."""
    _, labels = _load_digits()
    state = np.random.RandomState(DIGITS_SPLIT_SEED)
    val = np.concatenate([state.permutation(np.flatnonzero(labels == c))[:DIGITS_VAL_PER_CLASS]
                          for c in range(DIGITS_NUM_CLASSES)])
    val = np.sort(val)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class DigitsDataset(Seedable, Dataset):
    """scikit-learn's 8x8 digits, bilinear-upsampled to resolution x resolution, three equal channels."""

    num_classes = DIGITS_NUM_CLASSES
    classes = tuple(str(d) for d in range(DIGITS_NUM_CLASSES))  # the digit each label is

    def __init__(self, split: str = "train", resolution: int = 32, train: bool = False,
                 limit: Optional[int] = None, max_shift: Optional[int] = None,
                 randaugment: Optional[Callable] = None) -> None:
        self.split = split_name(split)
        self.randaugment = randaugment if train else None  # applied to the upsampled image, before the shift
        self.resolution = int(resolution)
        self.train = bool(train)
        self.max_shift = max(1, self.resolution // 16) if max_shift is None else int(max_shift)
        images, labels = _load_digits()
        train_idx, val_idx = digits_split()
        indices = train_idx if self.split == "train" else val_idx
        self.indices = indices[evenly_spaced(len(indices), limit)]
        self._images = images
        self._labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        i = int(self.indices[index])
        img = Image.fromarray(self._images[i])  # 8 x 8 uint8 -> mode "L"
        img = img.resize((self.resolution, self.resolution), BILINEAR)
        if self.randaugment is not None:
            img = self.randaugment(img, self.rng if self.rng is not None else random)
        arr = np.asarray(img)
        if self.train and self.max_shift > 0:
            arr = random_translate(arr, self.max_shift, self.rng)
        image = torch.from_numpy(np.array(arr, dtype=np.uint8))[None].expand(3, -1, -1).contiguous()
        return image, int(self._labels[i])

    @property
    def targets(self) -> List[int]:
        return [int(v) for v in self._labels[self.indices]]

    def __repr__(self) -> str:
        return (f"DigitsDataset(split={self.split!r}, {len(self)} images, resolution={self.resolution}, "
                f"train={self.train})")
