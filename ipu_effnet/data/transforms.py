"""Image transforms without torchvision, ending in uint8 C x H x W tensors (docs/reference.md section 6).

Training: Inception-style RandomResizedCrop (area scale 0.08-1, aspect ratio 3/4-4/3, ten attempts, then
the largest centred crop whose aspect ratio is in range, as torchvision does) and a horizontal flip with
probability 0.5. Evaluation: resize the shorter side to round(res / 0.875) (256 for 224) and take the
centre res x res crop. Interpolation is bilinear with Pillow's antialiasing when shrinking. Images stay
uint8 all the way to the device; mean/std normalisation happens in the model wrapper.

Both transforms work out a crop box in the source image first and then produce the output with one
`Image.resize(..., box=...)`, which equals resizing the whole image and cropping, at the cost of the crop
only. That order also lets a JPEG be decoded at reduced scale (`Image.draft`: libjpeg's DCT scaling by
1/2, 1/4 or 1/8) before any pixel is decoded: `decode_region` asks for the smallest scale that still
leaves at least res x res source pixels inside the crop box, so half-resolution training (128 or 160 px
out of ~400 x 350 ImageNet images, or far larger photographs) is not bound by JPEG decoding. The
decoded image keeps enough pixels for the crop, so the output differs from a full decode only by the
difference between the DCT's and Pillow's box-like downsampling.

Two further fast paths (`data/decode.py`) are chosen per transform: the JPEG decoder (`decoder`:
simplejpeg, the same pixels as Pillow with less overhead) and, for training crops, the resampler
(`resampler`: torch's uint8 antialiased bilinear kernel, or Pillow's). Both default to "auto" in the
training transform; evaluation keeps Pillow's resampler so that its fractional crop box stays exact.

A transform is called as `transform(img, rng)`: `img` a PIL image as `Image.open` returns it (not yet
decoded, so that the draft can take effect) or a `decode.JpegFile` (a JPEG's bytes and size, which the
dataset reads for the simplejpeg decoder), `rng` a `random.Random` (None: the `random` module), so that
a dataset can own its random stream and the loader can seed it per worker and epoch.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ipu_effnet.data.decode import (
    BILINEAR,
    Box,
    JpegFile,
    decode_jpeg_file,
    draft_scale,
    pillow_resize_array,
    resize_array,
    resolve_decoder,
    resolve_resampler,
    whole_pixel_box,
)

__all__ = [
    "BILINEAR",
    "EVAL_CROP_FRACTION",
    "Box",
    "EvalTransform",
    "TrainTransform",
    "crop_resize",
    "decode_region",
    "eval_crop_box",
    "random_resized_crop_box",
    "random_translate",
    "resize_region",
    "to_uint8_tensor",
]

EVAL_CROP_FRACTION = 0.875  # 224 / 256: evaluation resizes the shorter side to res / 0.875


def to_uint8_tensor(img: Any) -> torch.Tensor:
    """A PIL image or H x W (x C) uint8 array -> a contiguous uint8 C x H x W tensor."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    # H x W x C -> C x H x W in NumPy, one writable copy (torch.from_numpy warns on read-only arrays).
    # Not torch's permute().contiguous(): that copy goes through torch's intra-op thread pool, which on
    # a busy machine cost 20+ ms per 160 px image with 2 threads against 0.15 ms here (docs/PERFORMANCE.md).
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), dtype=np.uint8, order="C"))


def random_resized_crop_box(size: Tuple[int, int], scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3), rng: Optional[random.Random] = None,
                            attempts: int = 10) -> Box:
    """Inception's crop for an image of `size` (width, height): area fraction in `scale`, aspect ratio
    (w / h) log-uniform in `ratio`; after `attempts` misses, the largest centred crop whose aspect ratio
    lies in `ratio` (torchvision's RandomResizedCrop.get_params)."""
    rng = random if rng is None else rng
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def eval_crop_box(size: Tuple[int, int], resolution: int, crop_fraction: float = EVAL_CROP_FRACTION) -> Box:
    """The source region that "resize the shorter side to round(res / crop_fraction), then centre-crop
    res x res" keeps, for an image of `size` (width, height). Sizes and offsets are rounded as
    torchvision's Resize and CenterCrop round them, so the output matches that two-step pipeline."""
    width, height = size
    short = int(round(resolution / crop_fraction))
    if width <= height:
        resized_w, resized_h = short, int(short * height / width)  # Resize truncates the longer side
    else:
        resized_w, resized_h = int(short * width / height), short
    left = int(round((resized_w - resolution) / 2.0))
    top = int(round((resized_h - resolution) / 2.0))
    sx, sy = width / resized_w, height / resized_h
    return (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)


def decode_region(img: Image.Image, box: Box, out_size: Tuple[int, int],
                  draft: bool = True) -> Tuple[Image.Image, Box]:
    """Decode `img` as RGB, at reduced scale where its format allows (JPEG) and the crop `box` (in the
    image's own coordinates) will be shrunk to `out_size` by at least 2x; return the decoded image and
    the box in its coordinates. The draft keeps at least `out_size` pixels inside the box. draft=False
    always decodes at full size (the baseline `bench --mode data --vs draft=false` compares against)."""
    width, height = img.size
    reduction = 1.0
    scale = draft_scale(img.size, box, out_size) if draft else 1
    if scale > 1:
        # Asking for size // scale makes Pillow pick exactly 1/scale: its draft takes the largest
        # reduction s with size // s >= the request.
        drafted = img.draft("RGB", (width // scale, height // scale))  # None for formats without DCT scaling
        if img.size != (width, height):
            if isinstance(drafted, tuple) and drafted[1] and drafted[1][2]:
                reduction = width / drafted[1][2]  # Pillow >= 7 reports the exact scale in the box
            else:
                ratio = width / img.size[0]
                reduction = float(min((1, 2, 4, 8), key=lambda s: abs(s - ratio)))
    img = img.convert("RGB") if img.mode != "RGB" else img
    img.load()
    dec_w, dec_h = img.size
    scaled = (max(0.0, box[0] / reduction), max(0.0, box[1] / reduction),
              min(float(dec_w), box[2] / reduction), min(float(dec_h), box[3] / reduction))
    return img, scaled


def resize_region(img: Image.Image, box: Box, out_size: Tuple[int, int], draft: bool = True) -> Image.Image:
    """The crop `box` of `img` resized (bilinear, antialiased) to `out_size`, drafting JPEGs first."""
    decoded, scaled = decode_region(img, box, out_size, draft)
    return decoded.resize(out_size, BILINEAR, box=scaled)


def crop_resize(img: Image.Image, box: Box, out_size: Tuple[int, int], draft: bool = True,
                decoder: str = "pillow", resampler: str = "pillow", exact: bool = True) -> torch.Tensor:
    """`resize_region` as a uint8 C x H x W tensor, through the chosen fast paths (data/decode.py):
    `decoder` "simplejpeg" decodes file-backed JPEGs (others go to Pillow), `resampler` "torch" resizes
    with torch's uint8 kernel on a box rounded to whole pixels. With "pillow" for both, or with `exact`
    and the Pillow resampler, the result is resize_region's bit for bit; exact=False (training) lets
    Pillow resize only the region of a simplejpeg-decoded array it reads (within one level)."""
    arr = None
    if decoder == "simplejpeg" or isinstance(img, JpegFile):
        scale = draft_scale(img.size, box, out_size) if draft else 1
        arr = decode_jpeg_file(img, scale)
    if arr is None:
        if isinstance(img, JpegFile):  # simplejpeg rejected it after all: Pillow decodes it or says why
            img = img.pillow()
        if resampler != "torch":
            return to_uint8_tensor(resize_region(img, box, out_size, draft))
        decoded, scaled = decode_region(img, box, out_size, draft)
        # only the crop leaves Pillow: converting the whole decoded image would cost more than the resize
        left, top, right, lower = whole_pixel_box(scaled, *decoded.size)
        crop = np.array(decoded.crop((left, top, right, lower)))
        return resize_array(crop, (0, 0, right - left, lower - top), out_size)
    # the DCT scale is exactly 1/scale on both axes (the last row and column may be partial)
    scaled = (box[0] / scale, box[1] / scale, min(arr.shape[1], box[2] / scale), min(arr.shape[0], box[3] / scale))
    if resampler == "torch":
        return resize_array(arr, scaled, out_size)
    return to_uint8_tensor(pillow_resize_array(arr, scaled, out_size, exact))


def random_translate(arr: np.ndarray, max_shift: int, rng: Optional[random.Random] = None,
                     fill: int = 0) -> np.ndarray:
    """Shift an H x W (or ... x H x W) array by up to `max_shift` pixels in each direction, filling the
    uncovered border with `fill`: a light augmentation for data that is not flip-invariant (digits)."""
    rng = random if rng is None else rng
    dx, dy = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
    if dx == 0 and dy == 0:
        return arr.copy()
    h, w = arr.shape[-2:]
    out = np.full_like(arr, fill)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    # out[y, x] = arr[y - dy, x - dx] wherever both are inside the image
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        arr[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class TrainTransform:
    """RandomResizedCrop to resolution x resolution, a horizontal flip with probability flip_rate, then
    RandAugment when given one."""

    def __init__(self, resolution: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_rate: float = 0.5,
                 randaugment: Optional[Any] = None, draft: bool = True, decoder: str = "auto",
                 resampler: str = "auto") -> None:
        self.resolution = int(resolution)
        self.draft = bool(draft)  # reduced-scale JPEG decoding (decode_region); False only to measure it
        self.decoder = resolve_decoder(decoder)  # data.jpeg_decoder
        self.resampler = resampler  # data.resampler; "auto" is resolved per call (worker or not)
        resolve_resampler(resampler, in_worker=True)  # a bad name or a missing kernel fails here, not in a worker
        self.randaugment = randaugment  # a data.randaugment.RandAugment applied after crop and flip, or None
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_rate = float(flip_rate)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        rng = random if rng is None else rng
        box = random_resized_crop_box(img.size, self.scale, self.ratio, rng)
        size = (self.resolution, self.resolution)
        out = crop_resize(img, box, size, self.draft, self.decoder, resolve_resampler(self.resampler), exact=False)
        if rng.random() < self.flip_rate:
            out = out.flip(-1)
        if self.randaugment is not None:  # RandAugment works on PIL images
            out = to_uint8_tensor(self.randaugment(Image.fromarray(out.permute(1, 2, 0).numpy()), rng))
        return out

    def __repr__(self) -> str:
        return (f"TrainTransform(resolution={self.resolution}, scale={self.scale}, ratio={self.ratio}, "
                f"flip_rate={self.flip_rate}, randaugment={self.randaugment!r}, decoder={self.decoder!r}, "
                f"resampler={self.resampler!r})")


class EvalTransform:
    """Resize the shorter side to round(resolution / crop_fraction), centre-crop resolution x resolution."""

    def __init__(self, resolution: int, crop_fraction: float = EVAL_CROP_FRACTION, decoder: str = "auto",
                 draft: bool = True) -> None:
        self.resolution = int(resolution)
        self.crop_fraction = float(crop_fraction)
        self.decoder = resolve_decoder(decoder)  # the same pixels either way; Pillow resizes (exact box)
        self.draft = bool(draft)  # reduced-scale JPEG decoding; False only to measure it

    def box(self, size: Tuple[int, int]) -> Box:
        return eval_crop_box(size, self.resolution, self.crop_fraction)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        return crop_resize(img, self.box(img.size), (self.resolution, self.resolution), self.draft, self.decoder)

    def __repr__(self) -> str:
        return (f"EvalTransform(resolution={self.resolution}, crop_fraction={self.crop_fraction}, "
                f"decoder={self.decoder!r})")
