"""The imagenet dataset: an ImageNet-style folder of class folders, and what it does with unreadable
and unusual images.

`<path>/train/<class>/*` and `<path>/validation/<class>/*` (`val/` is accepted too), any image Pillow
reads, converted to RGB. Class indices come from the sorted folder names under `train/`; validation
uses the same mapping (and fails on a class that train does not have). Only when `train/` is absent
(an evaluation-only copy) do the validation folders define the classes. Training applies
`TrainTransform` (RandomResizedCrop + flip), evaluation `EvalTransform` (resize, centre crop).
With the simplejpeg decoder (`data.jpeg_decoder`) a `.jpg` file's bytes and header are read by
`decode.open_jpeg` instead of Pillow; whatever that does not take is opened by Pillow as before.

Unreadable images: the scan opens every selected file's header (`data.verify_images`, in a
few threads) and drops empty files, non-images and files Pillow cannot identify; a file that passes
the header check but fails to decode while loading (a truncated JPEG) is replaced by the next readable
sample and recorded (`UnreadableImages`), so a bad file never kills a loader worker mid-epoch. Both
are counted against `data.max_corrupt_fraction` (default 1 %): more stops the run with a DataError.
Readable oddities are converted: grayscale and CMYK to RGB, 16-bit to 8-bit, palette and alpha images
composited over the ImageNet mean colour (zero after normalisation).
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ipu_effnet.data.base import DataError, DataWarning, Sample, Seedable, evenly_spaced, split_name
from ipu_effnet.data.decode import open_jpeg
from ipu_effnet.data.transforms import to_uint8_tensor

__all__ = [
    "ALPHA_FILL",
    "DEFAULT_MAX_CORRUPT_FRACTION",
    "ImageFolderDataset",
    "UnreadableImages",
    "image_extensions",
    "prepare_mode",
]

Transform = Callable[[Image.Image, Optional[random.Random]], torch.Tensor]

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


class ImageFolderDataset(Seedable, Dataset):
    """An ImageNet-style `<root>/<split>/<class>/<image>` folder; train's sorted class names define labels."""

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 transform: Optional[Transform] = None, limit: Optional[int] = None,
                 max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION, verify: bool = True) -> None:
        root = Path(root).expanduser()
        split = split_name(split)
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
        selected = [samples[i] for i in evenly_spaced(len(samples), limit)]
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
