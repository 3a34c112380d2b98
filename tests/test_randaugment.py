"""RandAugment with Pillow: every operation runs, magnitude 0 is identity, the stream decides the ops."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from ipu_effnet.config import load
from ipu_effnet.data import create_dataset
from ipu_effnet.data.randaugment import OPS, RandAugment, apply_op


def image(mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_keeps_size_and_mode(name, mode):
    out = apply_op(name, image(mode), 9.0, random.Random(0))
    assert out.size == (24, 24) and out.mode == mode


@pytest.mark.parametrize("name", ["rotate", "shear_x", "translate_y", "color", "brightness", "solarize", "posterize"])
def test_magnitude_zero_is_identity_and_ten_changes_the_image(name):
    img = image()
    assert np.array_equal(np.asarray(apply_op(name, img, 0.0, random.Random(0))), np.asarray(img))
    assert not np.array_equal(np.asarray(apply_op(name, img, 10.0, random.Random(0))), np.asarray(img))


def test_deterministic_given_the_rng_and_magnitude_extrapolates():
    aug = RandAugment(magnitude=15, num_ops=3)
    a = np.asarray(aug(image(), random.Random(7)))
    b = np.asarray(aug(image(), random.Random(7)))
    assert np.array_equal(a, b)
    outs = {np.asarray(aug(image(), random.Random(s))).tobytes() for s in range(8)}
    assert len(outs) > 1
    with pytest.raises(ValueError):
        RandAugment(magnitude=-1)


def test_digits_training_set_applies_it_and_validation_does_not():
    cfg = load(None, ["data.dataset=digits", "data.num_train=4", "data.num_val=4"])
    plain = create_dataset(cfg.data, "train", 32, train=True, num_classes=10)
    aug = create_dataset(cfg.data, "train", 32, train=True, num_classes=10,
                         randaugment=RandAugment(10, num_ops=2, ops=["rotate"]))
    plain.reseed(0)
    aug.reseed(0)
    assert aug[0][0].shape == (3, 32, 32) and not np.array_equal(aug[0][0].numpy(), plain[0][0].numpy())
    val = create_dataset(cfg.data, "validation", 32, train=False, num_classes=10,
                         randaugment=RandAugment(10))
    assert val.randaugment is None
