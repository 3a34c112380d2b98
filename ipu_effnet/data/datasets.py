"""Datasets: an ImageNet-style folder, generated images, and scikit-learn's bundled 8x8 digits.

Each dataset yields `(image, label)`: a uint8 C x H x W tensor after its transform and an int, and has a
`num_classes` attribute. Datasets that draw random numbers (augmentation) own a `random.Random` that the
loader seeds per rank, epoch and worker through `reseed(seed)`, so augmentation neither depends on nor
disturbs the training process's global random state.

imagenet
    `<path>/train/<class>/*` and `<path>/validation/<class>/*` (`val/` is accepted too), any image Pillow
    reads, converted to RGB. Class indices come from the sorted folder names under `train/`; validation
    uses the same mapping (and fails on a class that train does not have). Only when `train/` is absent
    (an evaluation-only copy) do the validation folders define the classes. Training applies
    `TrainTransform` (RandomResizedCrop + flip), evaluation `EvalTransform` (resize, centre crop).

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

`data.num_train` / `data.num_val` set the size of the generated data; for imagenet and digits they cap
the split at that many images, taken at evenly spaced positions of the (class-sorted) list so that every
class keeps its share.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ipu_effnet.config import DATASETS
from ipu_effnet.data.transforms import (
    BILINEAR,
    EvalTransform,
    TrainTransform,
    random_translate,
    to_uint8_tensor,
)
from ipu_effnet.errors import UsageError

if TYPE_CHECKING:
    from ipu_effnet.config import DataConfig

__all__ = [
    "DIGITS_NUM_IMAGES",
    "DIGITS_VAL_PER_CLASS",
    "GENERATED_DEFAULT_CLASSES",
    "GENERATED_DEFAULT_SIZES",
    "SPLITS",
    "DataError",
    "DigitsDataset",
    "GeneratedDataset",
    "ImageFolderDataset",
    "create_dataset",
    "digits_split",
    "image_extensions",
]

SPLITS = ("train", "validation")
GENERATED_DEFAULT_SIZES = {"train": 1024, "validation": 256}  # images per epoch when num_train/num_val unset
GENERATED_DEFAULT_CLASSES = 1000
DIGITS_NUM_IMAGES = 1797
DIGITS_NUM_CLASSES = 10
DIGITS_VAL_PER_CLASS = 30  # 300 validation images, 1,497 training images
DIGITS_SPLIT_SEED = 0

Transform = Callable[[Image.Image, Optional[random.Random]], torch.Tensor]
Sample = Tuple[torch.Tensor, int]


class DataError(UsageError):
    """Bad data: a missing folder, no images, an unreadable file, a class-count mismatch. One line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _split_name(split: str) -> str:
    name = {"train": "train", "validation": "validation", "val": "validation"}.get(str(split).lower())
    if name is None:
        raise DataError(f"split {split!r} is not one of 'train', 'validation' (or 'val')")
    return name


def _evenly_spaced(n: int, limit: Optional[int]) -> np.ndarray:
    """`limit` distinct positions spread over range(n) (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit) * n) // limit


class _Seedable:
    """The random stream a dataset's augmentation draws from; the loader calls reseed() per worker/epoch."""

    rng: Optional[random.Random] = None  # None: the global `random` module, until reseeded

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)


# ----------------------------------------------------------------------------------------------------
# imagenet: a folder of class folders


@functools.lru_cache(maxsize=None)
def image_extensions() -> Tuple[str, ...]:
    """Lower-case file extensions (with the dot) of every format this Pillow can open."""
    Image.init()
    return tuple(sorted({ext.lower() for ext in Image.registered_extensions()}))


def _class_folders(split_dir: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


@functools.lru_cache(maxsize=8)
def _scan(split_dir: str, classes: Tuple[str, ...]) -> Tuple[Tuple[str, int], ...]:
    """(path, label) for every image under split_dir/<class>/ (recursively), sorted; cached, as a full
    ImageNet scan takes seconds and the half-resolution recipe builds the datasets twice."""
    extensions = set(image_extensions())
    samples = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        found = []
        for folder, subdirs, files in os.walk(class_dir, followlinks=True):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found.extend(os.path.join(folder, f) for f in files
                         if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions)
        samples.extend((path, label) for path in sorted(found))
    return tuple(samples)


def _find_split_dir(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("validation", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{root / n}" for n in names)
    raise DataError(f"imagenet data: {wanted} does not exist; expected a folder with train/<class>/<image> "
                    f"and validation/<class>/<image> (or val/<class>/<image>) under data.path = {str(root)!r}")


class ImageFolderDataset(_Seedable, Dataset):
    """An ImageNet-style `<root>/<split>/<class>/<image>` folder; train's sorted class names define labels."""

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 transform: Optional[Transform] = None, limit: Optional[int] = None) -> None:
        root = Path(root).expanduser()
        split = _split_name(split)
        if not root.is_dir():
            raise DataError(f"imagenet data: data.path = {str(root)!r} is not a folder; expected a folder "
                            "with train/<class>/<image> and validation/<class>/<image> (or val/)")
        split_dir = _find_split_dir(root, split)
        class_dir = root / "train" if (root / "train").is_dir() else split_dir
        classes = _class_folders(class_dir)
        if not classes:
            raise DataError(f"imagenet data: {class_dir} has no class folders; expected "
                            f"{class_dir.name}/<class>/<image> (e.g. {class_dir.name}/n01440764/x.JPEG)")
        if split_dir != class_dir:
            unknown = sorted(set(_class_folders(split_dir)) - set(classes))
            if unknown:
                raise DataError(f"imagenet data: {split_dir} has class folder(s) {', '.join(unknown[:5])}"
                                f"{' ...' if len(unknown) > 5 else ''} that {class_dir} does not have; "
                                f"expected the same class names as {class_dir} ({len(classes)} classes)")
        samples = _scan(str(split_dir), tuple(classes))
        if not samples:
            raise DataError(f"imagenet data: no images under {split_dir}/<class>/; expected image files "
                            f"Pillow can read (e.g. .jpeg, .jpg, .png) in {len(classes)} class folder(s)")
        self.root = root
        self.split = split
        self.split_dir = split_dir
        self.classes = classes
        self.class_to_idx: Dict[str, int] = {name: i for i, name in enumerate(classes)}
        self.num_classes = len(classes)
        self.samples: List[Tuple[str, int]] = [samples[i] for i in _evenly_spaced(len(samples), limit)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                if self.transform is None:
                    image = to_uint8_tensor(img.convert("RGB"))
                else:
                    image = self.transform(img, self.rng)
        except (OSError, SyntaxError) as exc:  # Pillow's UnidentifiedImageError is an OSError
            raise DataError(f"imagenet data: cannot read image {path}: {exc}") from exc
        return image, label

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.split_dir)!r}, {len(self)} images, {self.num_classes} classes, "
                f"transform={self.transform!r})")


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
        self.split = _split_name(split)
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


class DigitsDataset(_Seedable, Dataset):
    """scikit-learn's 8x8 digits, bilinear-upsampled to resolution x resolution, three equal channels."""

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train", resolution: int = 32, train: bool = False,
                 limit: Optional[int] = None, max_shift: Optional[int] = None,
                 randaugment: Optional[Callable] = None) -> None:
        self.split = _split_name(split)
        self.randaugment = randaugment if train else None  # applied to the upsampled image, before the shift
        self.resolution = int(resolution)
        self.train = bool(train)
        self.max_shift = max(1, self.resolution // 16) if max_shift is None else int(max_shift)
        images, labels = _load_digits()
        train_idx, val_idx = digits_split()
        indices = train_idx if self.split == "train" else val_idx
        self.indices = indices[_evenly_spaced(len(indices), limit)]
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


# ----------------------------------------------------------------------------------------------------


def create_dataset(data_cfg: DataConfig, split: str, resolution: int, train: bool,
                   num_classes: Optional[int] = None, seed: int = 0, randaugment: Optional[Callable] = None) -> Dataset:
    """The dataset `data_cfg.dataset` names, for `split` ("train" or "validation"; "val" accepted) at
    `resolution` (the caller picks it: data_cfg.eval_resolution, or the trained resolution when None),
    with training augmentation when `train`. `num_classes`: the model's (model.num_classes); it sets the
    classes of the generated data and must match the class count of imagenet and digits. `seed`: the
    content of the generated data (the digits split is fixed and ignores it). `randaugment`: a
    `data.randaugment.RandAugment` for the training images of imagenet and digits (generated images are
    tensors and skip it); training with evaluation preprocessing (fine-tuning) passes train=False."""
    split = _split_name(split)
    limit = data_cfg.num_train if split == "train" else data_cfg.num_val
    kind = data_cfg.dataset
    dataset: Dataset
    if kind == "generated":
        size = limit if limit is not None else GENERATED_DEFAULT_SIZES[split]
        classes = num_classes if num_classes is not None else GENERATED_DEFAULT_CLASSES
        return GeneratedDataset(size, classes, resolution, seed=seed, split=split)
    if kind == "digits":
        dataset = DigitsDataset(split, resolution, train=train, limit=limit, randaugment=randaugment)
    elif kind == "imagenet":
        if not data_cfg.path:
            raise DataError("data.path is not set; the imagenet dataset needs a folder with "
                            "train/<class>/<image> and validation/<class>/<image> (or val/)")
        transform = TrainTransform(resolution, randaugment=randaugment) if train else EvalTransform(resolution)
        dataset = ImageFolderDataset(data_cfg.path, split, transform, limit=limit)
    else:
        raise DataError(f"data.dataset = {kind!r} is not one of {', '.join(map(repr, DATASETS))}")
    found = dataset.num_classes  # type: ignore[attr-defined]
    if num_classes is not None and num_classes != found:
        raise DataError(f"model.num_classes = {num_classes} but the {kind} data has {found} classes; "
                        f"set model.num_classes={found}")
    return dataset
