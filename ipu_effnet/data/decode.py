"""Fast paths from an image file and a crop box to the network's input: the JPEG decoder and the resampler.

Each has Pillow as the reference and the fallback, and each is chosen in the config (`data.jpeg_decoder`,
`data.resampler`) so that `bench --mode data` can measure it on and off (docs/PERFORMANCE.md).

JPEG decoder
    `simplejpeg` (libjpeg-turbo's TurboJPEG API; a pip wheel with the library inside) decodes the same
    pixels as Pillow: both run libjpeg-turbo with its default accurate integer IDCT and fancy chroma
    upsampling, and the DCT scale (1/2, 1/4, 1/8) is the one Pillow's `draft` would pick
    (`draft_scale`), so the decoded array is bitwise Pillow's (tests/test_decode.py checks it). What it
    saves is Pillow's per-image overhead around the same library (docs/PERFORMANCE.md, the data loader
    section, has the measurement on ImageNet-sized JPEGs). It takes file-backed JPEGs that Pillow
    opens as RGB or L; everything else (PNG, CMYK JPEGs, in-memory images, a file it rejects) goes to
    Pillow, which then decodes it or raises as before, so unreadable files are reported the same way.
    Scales other than powers of two are not used: libjpeg-turbo's 3/4 or 5/8 scaled IDCT has no SIMD
    and was slower here than a full decode.

Resampler (training crops)
    torch's uint8 antialiased bilinear `interpolate` (vectorised from torch 2.1; detected, not assumed)
    instead of Pillow's `resize`, faster for a training crop (docs/PERFORMANCE.md, the data loader
    section, has the figure). It needs a box in whole pixels, so the box (fractional after a
    reduced-scale decode) is rounded, and its values differ from
    Pillow's by a mean of 0.02 levels (max 5 of 255). "auto" uses it only in a loader worker or with one
    torch thread: in the training process itself it would share torch's thread pool with the step.
    Evaluation keeps Pillow, whose fractional box reproduces the reference resize-and-centre-crop exactly.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ipu_effnet.config import JPEG_DECODERS, RESAMPLERS
from ipu_effnet.errors import UsageError

__all__ = [
    "BILINEAR",
    "DRAFT_SCALES",
    "JpegFile",
    "decode_jpeg_file",
    "draft_scale",
    "jpeg_decoder_available",
    "open_jpeg",
    "pillow_resize_array",
    "resize_array",
    "resolve_decoder",
    "resolve_resampler",
    "torch_resampler_available",
    "whole_pixel_box",
]

Box = Tuple[float, float, float, float]  # (left, upper, right, lower), Pillow's convention
BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Image.Resampling from Pillow 9.1
DRAFT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg's DCT scaling offers that keep its SIMD IDCT
_FAST_MODES = ("RGB", "L")  # Pillow modes whose JPEGs the fast decoder turns into the same RGB pixels


def draft_scale(size: Tuple[int, int], box: Box, out_size: Sequence[int]) -> int:
    """The largest DCT reduction 1/s (s in 8, 4, 2, 1) that leaves at least `out_size` pixels inside the
    crop `box` of an image of `size`, applied only where the box is shrunk by at least 2x in both
    directions. The same choice as Pillow's `Image.draft(mode, need)` with the `need` used here."""
    width, height = size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    if box_w <= 0 or box_h <= 0:
        return 1
    need = (math.ceil(width * out_size[0] / box_w), math.ceil(height * out_size[1] / box_h))
    if 2 * need[0] > width or 2 * need[1] > height:
        return 1
    fits = min(width // need[0], height // need[1])
    return next(s for s in DRAFT_SCALES if fits >= s)


@functools.lru_cache(maxsize=None)
def jpeg_decoder_available() -> bool:
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def torch_resampler_available() -> bool:
    """Whether this torch resizes uint8 images with antialiasing (torch >= 2.1 on the CPU)."""
    try:
        x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
        torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def resolve_decoder(name: str) -> str:
    """"pillow" or "simplejpeg" for a `data.jpeg_decoder` value; "auto" takes simplejpeg when installed."""
    if name not in JPEG_DECODERS:
        raise UsageError(f"data.jpeg_decoder = {name!r} is not one of {', '.join(map(repr, JPEG_DECODERS))}")
    if name == "auto":
        return "simplejpeg" if jpeg_decoder_available() else "pillow"
    if name == "simplejpeg" and not jpeg_decoder_available():
        raise UsageError("data.jpeg_decoder = 'simplejpeg' but simplejpeg is not installed; "
                         "pip install simplejpeg (it is in requirements.txt), or use 'auto' or 'pillow'")
    return name


def resolve_resampler(name: str, in_worker: Optional[bool] = None) -> str:
    """"pillow" or "torch" for a `data.resampler` value. "auto" takes torch where it has the uint8 kernel
    and this runs in a loader worker or with one torch thread (`in_worker`: None asks the DataLoader)."""
    if name not in RESAMPLERS:
        raise UsageError(f"data.resampler = {name!r} is not one of {', '.join(map(repr, RESAMPLERS))}")
    if name == "torch" and not torch_resampler_available():
        raise UsageError(f"data.resampler = 'torch' needs torch >= 2.1 (uint8 antialiased interpolate); "
                         f"this is torch {torch.__version__}: use 'auto' or 'pillow'")
    if name != "auto":
        return name
    if in_worker is None:
        from torch.utils.data import get_worker_info

        in_worker = get_worker_info() is not None
    if torch_resampler_available() and (in_worker or torch.get_num_threads() == 1):
        return "torch"
    return "pillow"


class JpegFile:
    """A JPEG file's bytes and size, its header read by simplejpeg instead of Pillow (Pillow's `open`
    parses the markers in Python: about 0.4 ms of a 3 ms training sample here). The transforms take it
    where they take a PIL image (`size`, `format`, `mode`); `crop_resize` decodes it, and `pillow()`
    opens the same bytes with Pillow for everything the fast decoder does not do."""

    format = "JPEG"
    mode = "RGB"  # what it decodes to; grayscale JPEGs are replicated to RGB as Pillow's convert does

    def __init__(self, path: str, data: bytes, size: Tuple[int, int]) -> None:
        self.filename, self.data, self.size = path, data, size

    def pillow(self) -> Image.Image:
        img = Image.open(io.BytesIO(self.data))
        img.filename = self.filename  # for messages; the bytes are already here
        return img

    def __repr__(self) -> str:
        return f"JpegFile({self.filename!r}, {self.size[0]}x{self.size[1]}, {len(self.data)} bytes)"


def open_jpeg(path: str) -> Optional[JpegFile]:
    """`path` as a JpegFile when simplejpeg reads its header as an RGB, YCbCr or grayscale JPEG; None
    otherwise (another format, CMYK, a broken header): the caller opens it with Pillow, as without it."""
    import simplejpeg

    with open(path, "rb") as f:
        data = f.read()
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if str(colorspace).upper() in ("CMYK", "YCCK") or width < 1 or height < 1:
        return None
    return JpegFile(path, data, (int(width), int(height)))


def decode_jpeg_file(img, scale: int) -> Optional[np.ndarray]:
    """`img` (a JpegFile, or a PIL image as `Image.open(path)` returns it) decoded by simplejpeg at
    1/`scale` as an H x W x 3 uint8 array, or None when it is not a file-backed RGB or grayscale JPEG or
    simplejpeg rejects it (the caller then decodes with Pillow, which reports a broken file as usual)."""
    if isinstance(img, JpegFile):
        data = img.data
    else:
        path = getattr(img, "filename", "")
        if img.format != "JPEG" or img.mode not in _FAST_MODES or not path:
            return None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
    import simplejpeg

    width, height = img.size
    want = (-(-width // scale), -(-height // scale))  # libjpeg rounds a scaled size up
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=want[0], min_height=want[1])
    except ValueError:
        return None
    if (arr.shape[1], arr.shape[0]) != want:
        return None  # another scale than asked (not expected): let Pillow do it as the reference
    return arr


def whole_pixel_box(box: Box, width: int, height: int) -> Tuple[int, int, int, int]:
    """`box` rounded to whole pixels, clipped to a width x height image and at least one pixel wide."""
    left = min(max(int(round(box[0])), 0), width - 1)
    top = min(max(int(round(box[1])), 0), height - 1)
    right = min(max(int(round(box[2])), left + 1), width)
    lower = min(max(int(round(box[3])), top + 1), height)
    return left, top, right, lower


def resize_array(arr: np.ndarray, box: Box, out_size: Sequence[int]) -> torch.Tensor:
    """The `box` of an H x W x C uint8 array resized (bilinear, antialiased) to `out_size` (width,
    height) by torch, as a contiguous C x H x W uint8 tensor. The box is rounded to whole pixels."""
    left, top, right, lower = whole_pixel_box(box, arr.shape[1], arr.shape[0])
    if not arr.flags.writeable:
        arr = np.array(arr)  # torch.from_numpy warns on read-only arrays (Pillow's __array_interface__)
    crop = torch.from_numpy(arr)[top:lower, left:right].permute(2, 0, 1).unsqueeze(0)
    out = torch.nn.functional.interpolate(crop, size=(int(out_size[1]), int(out_size[0])), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out[0].contiguous()


def pillow_resize_array(arr: np.ndarray, box: Box, out_size: Sequence[int], exact: bool = True):
    """Pillow's bilinear resize of the `box` of an H x W x 3 uint8 array, as a PIL image. exact=False
    hands Pillow only the part its filter reads (the box and a margin of its reduction factor + 2),
    not the whole decoded image: the conversion to Pillow's layout is most of the cost, and the result
    differs from the whole image's by at most one level (Pillow's filter weights, computed in floating
    point from shifted coordinates, round differently at some pixels)."""
    if exact:
        return Image.fromarray(arr).resize(tuple(out_size), BILINEAR, box=box)
    height, width = arr.shape[:2]
    mx = math.ceil(max(1.0, (box[2] - box[0]) / out_size[0])) + 2
    my = math.ceil(max(1.0, (box[3] - box[1]) / out_size[1])) + 2
    left, top = max(0, math.floor(box[0]) - mx), max(0, math.floor(box[1]) - my)
    right, lower = min(width, math.ceil(box[2]) + mx), min(height, math.ceil(box[3]) + my)
    region = Image.fromarray(np.ascontiguousarray(arr[top:lower, left:right]))
    return region.resize(tuple(out_size), BILINEAR, box=(box[0] - left, box[1] - top, box[2] - left, box[3] - top))
