"""RandAugment (Cubuk et al. 2020) with Pillow operations only: N operations per image, magnitude M.

Used by the progressive recipe (EfficientNetV2, docs/reference.md section 2), whose magnitude grows from stage
to stage, and available to any recipe through `train.randaugment_magnitude` / `train.randaugment_ops`.

Magnitude scale: google/automl's (which EfficientNetV2's recipes use): M = 10 is the classic maximum
strength (rotate 30 degrees, shear 0.3, translate 45 % of the side, enhance factor 1 +- 0.9, solarize
threshold 0, posterize to 4 bits). Larger M extrapolates linearly, as automl does for the V2 ranges
(5 -> 15 for S, up to 25 for L); values that would leave an operation's domain are clamped (enhance
factors at 0, posterize at 1 bit, solarize threshold at 0). M = 0 leaves every operation at identity.

Each chosen operation is applied with probability 1 (the paper's RandAugment) and, for the signed ones
(rotate, shear, translate, the enhancements), with a random sign. Every random draw comes from the
`random.Random` passed in (the dataset's stream, which the loader seeds per rank, epoch and worker), so
the augmentation is a function of that stream's seed.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageEnhance, ImageOps

__all__ = ["MAX_LEVEL", "OPS", "RandAugment", "apply_op"]

MAX_LEVEL = 10.0  # automl's _MAX_LEVEL: the magnitude that gives each operation its classic maximum
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
_AFFINE = getattr(Image, "Transform", Image).AFFINE


def _fill(img: Image.Image) -> Tuple[int, ...]:
    return (128,) * len(img.getbands())  # grey where rotate/shear/translate uncover the image


def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() < 0.5 else v


def _identity(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
    return img


def _autocontrast(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
    return ImageOps.equalize(img)


def _rotate(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
    return img.rotate(_signed(30.0 * f, rng), resample=_BILINEAR, fillcolor=_fill(img))


def _solarize(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
    return ImageOps.solarize(img, int(max(0.0, 256.0 - 256.0 * f)))  # stronger: lower threshold


def _posterize(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
    return ImageOps.posterize(img, int(min(8, max(1, 8 - int(4.0 * f)))))


def _enhancer(cls: Callable) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    def op(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
        return cls(img).enhance(max(0.0, 1.0 + _signed(0.9 * f, rng)))
    return op


def _shear(axis: int) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    def op(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
        s = _signed(0.3 * f, rng)
        coeffs = (1, s, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, _AFFINE, coeffs, resample=_BILINEAR, fillcolor=_fill(img))
    return op


def _translate(axis: int) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    def op(img: Image.Image, f: float, rng: random.Random) -> Image.Image:
        pixels = _signed(0.45 * f * img.size[axis], rng)  # a fraction of the side: resolution-independent
        coeffs = (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels)
        return img.transform(img.size, _AFFINE, coeffs, resample=_BILINEAR, fillcolor=_fill(img))
    return op


# The standard list (RandAugment paper, timm's `_RAND_TRANSFORMS`, automl's NAME_TO_FUNC).
OPS: Dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
    "solarize": _solarize,
    "color": _enhancer(ImageEnhance.Color),
    "posterize": _posterize,
    "contrast": _enhancer(ImageEnhance.Contrast),
    "brightness": _enhancer(ImageEnhance.Brightness),
    "sharpness": _enhancer(ImageEnhance.Sharpness),
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}


def apply_op(name: str, img: Image.Image, magnitude: float, rng: Optional[random.Random] = None) -> Image.Image:
    """One operation at `magnitude` (automl's scale, see the module docstring)."""
    return OPS[name](img, float(magnitude) / MAX_LEVEL, random if rng is None else rng)


class RandAugment:
    """`num_ops` operations drawn uniformly (with replacement) from `ops`, each at `magnitude`."""

    def __init__(self, magnitude: float, num_ops: int = 2, ops: Sequence[str] = tuple(OPS)) -> None:
        if magnitude < 0:
            raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude}")
        if num_ops < 0:
            raise ValueError(f"RandAugment num_ops must be >= 0, got {num_ops}")
        unknown = [name for name in ops if name not in OPS]
        if unknown or not ops:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; valid: {', '.join(OPS)}")
        self.magnitude = float(magnitude)
        self.num_ops = int(num_ops)
        self.ops: List[str] = list(ops)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> Image.Image:
        rng = random if rng is None else rng
        for _ in range(self.num_ops):
            img = apply_op(self.ops[rng.randrange(len(self.ops))], img, self.magnitude, rng)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(magnitude={self.magnitude}, num_ops={self.num_ops})"
