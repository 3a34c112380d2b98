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
    With the simplejpeg decoder (`data.jpeg_decoder`) a `.jpg` file's bytes and header are read by
    `decode.open_jpeg` instead of Pillow; whatever that does not take is opened by Pillow as before.

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

Unreadable images (imagenet): the scan opens every selected file's header (`data.verify_images`, in a
few threads) and drops empty files, non-images and files Pillow cannot identify; a file that passes
the header check but fails to decode while loading (a truncated JPEG) is replaced by the next readable
sample and recorded (`UnreadableImages`), so a bad file never kills a loader worker mid-epoch. Both
are counted against `data.max_corrupt_fraction` (default 1 %): more stops the run with a DataError.
Readable oddities are converted: grayscale and CMYK to RGB, 16-bit to 8-bit, palette and alpha images
composited over the ImageNet mean colour (zero after normalisation).

`data.num_train` / `data.num_val` set the size of the generated data; for imagenet and digits they cap
the split at that many images, taken at evenly spaced positions of the (class-sorted) list so that every
class keeps its share.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import random
import shutil
import struct
import tempfile
import warnings
import weakref
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ipu_effnet.config import DATASETS
from ipu_effnet.data.decode import open_jpeg
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
    "UnreadableImages",
    "create_dataset",
    "digits_split",
    "image_extensions",
    "prepare_mode",
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
    """Bad data: a missing folder, no images, too many unreadable files, a class-count mismatch. One line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class DataWarning(UserWarning):
    """Data that was skipped or worked around: unreadable images, empty class folders, stray files."""


DEFAULT_MAX_CORRUPT_FRACTION = 0.01
# What Pillow (and the zlib / struct code under it) raises for a file it cannot decode. Anything else, a
# bug in a transform say, still propagates; a systematic error would anyway exceed the corrupt fraction
# at once, with its message in the error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_MAX_SUBSTITUTES = 32  # consecutive unreadable samples tried before __getitem__ gives up
_SHOW = 5  # unreadable files named in a message
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")  # read by the fast decoder's own header parser


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _remove_log_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker that happens to collect its copy
        shutil.rmtree(path, ignore_errors=True)


class UnreadableImages:
    """The unreadable images of one dataset split: found by the scan (main process) or when loading
    them, in whichever process loads them. Loader workers are separate processes that cannot update a
    Python counter here, so a worker appends one JSON line per failure to `<log_dir>/<pid>.jsonl` and
    the main process reads those files (`collect`, between epochs). Counted once per path; the paths
    collected are skipped directly by the workers of later epochs (they are forked from the main
    process with the updated set)."""

    def __init__(self, where: str, total: int, max_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION,
                 found: Sequence[Tuple[str, str]] = ()) -> None:
        self.where = where  # e.g. "imagenet data /data/train"
        self.total = int(total)  # images of the split before any was skipped
        self.max_fraction = float(max_fraction)
        self.found: Dict[str, str] = dict(found)  # path -> what is wrong, in the order found
        self.reported = 0  # how many of `found` a message has named
        self.log_dir = tempfile.mkdtemp(prefix="ipu_effnet-unreadable-")
        self._owner = os.getpid()
        weakref.finalize(self, _remove_log_dir, self.log_dir, self._owner)

    def record(self, path: str, problem: str) -> None:
        if os.getpid() == self._owner:
            self.found.setdefault(path, problem)
            return
        line = json.dumps({"path": path, "problem": problem}) + "\n"
        with open(os.path.join(self.log_dir, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
            f.write(line)

    def collect(self) -> int:
        """Merge what the workers recorded; returns the number of unreadable images so far."""
        try:
            names = sorted(os.listdir(self.log_dir))
        except OSError:
            names = []
        for name in names:
            try:
                with open(os.path.join(self.log_dir, name), encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line a killed worker left half-written
                    continue
                self.found.setdefault(entry["path"], entry["problem"])
        return len(self.found)

    @property
    def fraction(self) -> float:
        return len(self.found) / max(self.total, 1)

    def _named(self, items: Sequence[Tuple[str, str]]) -> str:
        shown = "; ".join(f"{path} ({problem})" for path, problem in items[:_SHOW])
        return shown + (f"; and {len(items) - _SHOW} more" if len(items) > _SHOW else "")

    def check(self) -> None:
        """DataError when more than max_fraction of the split is unreadable."""
        if self.fraction > self.max_fraction:
            raise DataError(f"{self.where}: {len(self.found)} of {self.total} images are unreadable "
                            f"({self.fraction:.2%}), more than data.max_corrupt_fraction = {self.max_fraction:g} "
                            f"allows; first: {self._named(list(self.found.items()))}. Fix or remove these files, "
                            f"or raise data.max_corrupt_fraction")

    def news(self) -> Optional[str]:
        """A warning naming the unreadable images no message has named yet, with the running total."""
        items = list(self.found.items())
        new = items[self.reported:]
        if not new:
            return None
        self.reported = len(items)
        return (f"{self.where}: {len(new)} unreadable image(s) skipped: {self._named(new)} "
                f"(in all {len(items)} of {self.total}, {self.fraction:.2%}; the run stops above "
                f"data.max_corrupt_fraction = {self.max_fraction:g})")


def _header_problem(path: str) -> Optional[str]:
    """What is wrong with an image file that opening its header shows (no pixels are decoded)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            if img.width < 1 or img.height < 1:
                return f"image of size {img.width} x {img.height}"
    except _DECODE_ERRORS as exc:
        return _first_line(exc)
    return None


@functools.lru_cache(maxsize=8)
def _verify(paths: Tuple[str, ...]) -> Tuple[Tuple[str, str], ...]:
    """(path, problem) for every file whose header does not open; threads overlap the file reads."""
    if not paths:
        return ()
    workers = min(8, len(paths))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(_header_problem, paths, chunksize=64))
    return tuple((p, problem) for p, problem in zip(paths, problems) if problem is not None)


# The ImageNet mean colour (0-255): transparent pixels become zero after the model's normalisation.
ALPHA_FILL = (124, 116, 104)
_DIRECT_MODES = ("RGB", "L", "CMYK", "YCbCr", "1")  # decode_region converts these itself (JPEG drafts kept)


def prepare_mode(img: Image.Image) -> Image.Image:
    """`img` if the transforms can take it as it is (RGB, grayscale, CMYK: a JPEG stays undecoded so that
    it can be drafted), else an RGB copy: 16-bit and 32-bit grayscale scaled to 8 bits (Pillow's own
    conversion clips them to 255), palette and alpha images composited over ALPHA_FILL."""
    mode = img.mode
    if mode in _DIRECT_MODES:
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:  # I;16*: 0..65535; I: 32-bit, as 16-bit PNGs and TIFFs open in older Pillow
            arr8 = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode != "RGB" and ("A" in img.mode or "a" in img.mode):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_FILL)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


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
def _scan(split_dir: str, classes: Tuple[str, ...]) -> Tuple[Tuple[Tuple[str, int], ...], Tuple[str, ...]]:
    """((path, label) for every image under split_dir/<class>/ (recursively), sorted; the files there
    without an image extension); cached, as a full ImageNet scan takes seconds and the half-resolution
    recipe builds the datasets twice."""
    extensions = set(image_extensions())
    samples = []
    ignored: List[str] = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        found = []
        for folder, subdirs, files in os.walk(class_dir, followlinks=True):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for f in files:
                if f.startswith("."):
                    continue
                (found if os.path.splitext(f)[1].lower() in extensions else ignored).append(os.path.join(folder, f))
        samples.extend((path, label) for path in sorted(found))
    return tuple(samples), tuple(sorted(ignored))


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
                 transform: Optional[Transform] = None, limit: Optional[int] = None,
                 max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION, verify: bool = True) -> None:
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
        samples, ignored = _scan(str(split_dir), tuple(classes))
        if not samples:
            raise DataError(f"imagenet data: no images under {split_dir}/<class>/; expected image files "
                            f"Pillow can read (e.g. .jpeg, .jpg, .png) in {len(classes)} class folder(s)")
        selected = [samples[i] for i in _evenly_spaced(len(samples), limit)]
        bad = _verify(tuple(p for p, _ in selected)) if verify else ()
        self.unreadable = UnreadableImages(f"imagenet data {split_dir}", len(selected), max_corrupt_fraction, bad)
        self.unreadable.check()  # before any compute: a mostly broken copy of the data stops here
        if bad:
            warnings.warn(self.unreadable.news() or "", DataWarning, stacklevel=2)
        skip = {p for p, _ in bad}
        self.root = root
        self.split = split
        self.split_dir = split_dir
        self.classes = classes
        self.class_to_idx: Dict[str, int] = {name: i for i, name in enumerate(classes)}
        self.num_classes = len(classes)
        self.samples: List[Tuple[str, int]] = [s for s in selected if s[0] not in skip]
        if not self.samples:
            raise DataError(f"imagenet data: none of the images under {split_dir} can be read")
        self.transform = transform
        counts = np.bincount([label for _, label in self.samples], minlength=len(classes))
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        if empty and limit is None:
            warnings.warn(f"imagenet data {split_dir}: {len(empty)} class folder(s) without readable images: "
                          f"{', '.join(empty[:_SHOW])}{' ...' if len(empty) > _SHOW else ''} (their labels are "
                          f"kept, so label numbers match the class folders)", DataWarning, stacklevel=2)
        if ignored:
            warnings.warn(f"imagenet data {split_dir}: {len(ignored)} file(s) without an image extension ignored, "
                          f"e.g. {ignored[0]}", DataWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        """The sample at `index`, or, where that file cannot be decoded, the next readable one (recorded
        in `self.unreadable`): one bad file must not end a loader worker, and with it the epoch."""
        n = len(self.samples)
        index = int(index) % n
        tries = min(n, _MAX_SUBSTITUTES)
        for attempt in range(tries):
            path, label = self.samples[(index + attempt) % n]
            if path in self.unreadable.found:  # collected in an earlier epoch
                continue
            try:
                return self._load(path), label
            except _DECODE_ERRORS as exc:  # Pillow's UnidentifiedImageError is an OSError
                self.unreadable.record(path, _first_line(exc))
        raise DataError(f"imagenet data: {tries} consecutive images from {self.samples[index][0]} on are "
                        "unreadable; check the data folder (data.path)")

    def _load(self, path: str) -> torch.Tensor:
        if getattr(self.transform, "decoder", None) == "simplejpeg" and path.lower().endswith(_JPEG_SUFFIXES):
            jpeg = open_jpeg(path)  # None: not a plain JPEG after all; Pillow opens it below
            if jpeg is not None:
                return self.transform(jpeg, self.rng)
        with Image.open(path) as img:
            img = prepare_mode(img)
            if self.transform is None:
                return to_uint8_tensor(img.convert("RGB"))
            return self.transform(img, self.rng)

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
    classes = tuple(str(d) for d in range(DIGITS_NUM_CLASSES))  # the digit each label is

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
        decoder = getattr(data_cfg, "jpeg_decoder", "auto")
        if train:
            transform = TrainTransform(resolution, randaugment=randaugment, decoder=decoder,
                                       resampler=getattr(data_cfg, "resampler", "auto"))
        else:
            transform = EvalTransform(resolution, decoder=decoder)
        dataset = ImageFolderDataset(data_cfg.path, split, transform, limit=limit,
                                     max_corrupt_fraction=getattr(data_cfg, "max_corrupt_fraction",
                                                                  DEFAULT_MAX_CORRUPT_FRACTION),
                                     verify=getattr(data_cfg, "verify_images", True))
    else:
        raise DataError(f"data.dataset = {kind!r} is not one of {', '.join(map(repr, DATASETS))}")
    found = dataset.num_classes  # type: ignore[attr-defined]
    if num_classes is not None and num_classes != found:
        raise DataError(f"model.num_classes = {num_classes} but the {kind} data has {found} classes; "
                        f"set model.num_classes={found}")
    return dataset
