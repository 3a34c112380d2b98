"""The data fast paths of data/decode.py: simplejpeg decodes Pillow's pixels, torch resizes like Pillow,
the fallbacks keep every other image (and every broken one) on Pillow's path, and the choices are
checked up front."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ipu_effnet.config import Config, ConfigError, apply_overrides
from ipu_effnet.data import decode
from ipu_effnet.data.datasets import ImageFolderDataset
from ipu_effnet.data.decode import (
    JpegFile,
    draft_scale,
    open_jpeg,
    resize_array,
    resolve_decoder,
    resolve_resampler,
)
from ipu_effnet.data.transforms import BILINEAR, EvalTransform, TrainTransform, crop_resize, decode_region
from ipu_effnet.errors import UsageError

simplejpeg = pytest.importorskip("simplejpeg")


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with noise: JPEG-typical content whose decoding error would show."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 127 + 100 * np.sin(xs[..., None] * rng.uniform(0.01, 0.08, 3) + ys[..., None] * rng.uniform(0.01, 0.08, 3))
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def _save(path, arr: np.ndarray, mode: str = "RGB", **kw) -> str:
    Image.fromarray(arr).convert(mode).save(path, "JPEG", quality=90, **kw)
    return str(path)


VARIANTS = {
    "baseline 4:2:0": {},
    "progressive": {"progressive": True},
    "4:4:4": {"subsampling": 0},
    "4:2:2": {"subsampling": 1},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("size", [(333, 250), (101, 77)])
def test_simplejpeg_decodes_pillows_pixels_at_every_scale(tmp_path, variant, size):
    path = _save(tmp_path / "a.jpg", _photo(*size), **VARIANTS[variant])
    for scale in (1, 2, 4, 8):
        with Image.open(path) as img:
            if scale > 1:
                img.draft("RGB", (size[0] // scale, size[1] // scale))
            reference = np.asarray(img.convert("RGB"))
        with Image.open(path) as img:
            ours = decode.decode_jpeg_file(img, scale)
        jpeg = open_jpeg(path)
        assert jpeg is not None and jpeg.size == size
        assert ours is not None and ours.shape == reference.shape == (-(-size[1] // scale), -(-size[0] // scale), 3)
        np.testing.assert_array_equal(ours, reference)
        np.testing.assert_array_equal(decode.decode_jpeg_file(jpeg, scale), reference)


def test_grayscale_jpeg_is_replicated_to_rgb_as_pillow_converts_it(tmp_path):
    path = _save(tmp_path / "g.jpg", _photo(120, 90), mode="L")
    with Image.open(path) as img:
        reference = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(decode.decode_jpeg_file(open_jpeg(path), 1), reference)


def test_draft_scale_is_the_scale_pillows_draft_picks():
    rng = random.Random(0)
    size = (500, 375)
    seen = set()
    for _ in range(300):
        w, h = rng.randint(8, 500), rng.randint(8, 375)
        left, top = rng.randint(0, 500 - w), rng.randint(0, 375 - h)
        box = (left, top, left + w, top + h)
        out = (rng.choice([16, 32, 64, 160]),) * 2
        scale = draft_scale(size, box, out)
        seen.add(scale)
        img = Image.new("RGB", size)
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        with Image.open(buf) as jpeg:
            decoded, scaled = decode_region(jpeg, box, out)
            assert decoded.size == (-(-size[0] // scale), -(-size[1] // scale))
        # the decoded box still holds at least out_size pixels: the output is never upsampled by drafting
        assert (scaled[2] - scaled[0]) >= out[0] - 1e-9 or scale == 1
        assert (scaled[3] - scaled[1]) >= out[1] - 1e-9 or scale == 1
    assert seen == {1, 2, 4, 8}


def test_crops_through_simplejpeg_are_pillows_bitwise_when_exact_and_within_a_level_in_training(tmp_path):
    paths = [_save(tmp_path / f"{i}.jpg", _photo(420 - 40 * i, 300 + 20 * i, seed=i)) for i in range(4)]
    rng = random.Random(0)
    for path in paths:
        for res in (32, 96):
            for _ in range(3):
                with Image.open(path) as img:
                    size = img.size
                left, top = rng.uniform(0, size[0] / 2), rng.uniform(0, size[1] / 2)
                box = (left, top, left + rng.uniform(res / 2, size[0] / 2), top + rng.uniform(res / 2, size[1] / 2))
                with Image.open(path) as img:
                    reference = crop_resize(img, box, (res, res), decoder="pillow")
                exact = crop_resize(open_jpeg(path), box, (res, res), decoder="simplejpeg")
                torch.testing.assert_close(exact, reference, rtol=0, atol=0)
                region = crop_resize(open_jpeg(path), box, (res, res), decoder="simplejpeg", exact=False)
                assert (region.int() - reference.int()).abs().max() <= 1
            # the training transform converts only the region Pillow reads: within a level of Pillow's
            outs = []
            for decoder in ("pillow", "simplejpeg"):
                with Image.open(path) as img:
                    outs.append(TrainTransform(res, decoder=decoder, resampler="pillow")(img, random.Random(res)))
            assert (outs[0].int() - outs[1].int()).abs().max() <= 1
            # evaluation stays exact
            a = EvalTransform(res, decoder="pillow")(Image.open(path))
            b = EvalTransform(res, decoder="simplejpeg")(open_jpeg(path))
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not decode.torch_resampler_available(), reason="this torch has no uint8 antialiased resize")
def test_torch_resampler_matches_pillow_on_whole_pixel_boxes():
    arr = _photo(300, 240)
    img = Image.fromarray(arr)
    rng = random.Random(1)
    for _ in range(10):
        w, h = rng.randint(40, 300), rng.randint(40, 240)
        left, top = rng.randint(0, 300 - w), rng.randint(0, 240 - h)
        box = (left, top, left + w, top + h)
        out = resize_array(arr, box, (64, 48))
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 48, 64) and out.is_contiguous()
        reference = torch.from_numpy(np.array(img.resize((64, 48), BILINEAR, box=box))).permute(2, 0, 1)
        diff = (out.int() - reference.int()).abs()
        assert diff.float().mean() < 0.5 and diff.max() <= 8, (box, diff.float().mean(), diff.max())
    # a fractional box is rounded to whole pixels, never read outside the image
    torch.testing.assert_close(resize_array(arr, (10.4, 20.6, 110.5, 120.2), (32, 32)),
                               resize_array(arr, (10, 21, 110, 120), (32, 32)), rtol=0, atol=0)
    assert tuple(resize_array(arr, (-3.0, -2.0, 400.0, 300.0), (16, 16)).shape) == (3, 16, 16)


def test_dataset_reads_jpegs_through_the_fast_path_and_everything_else_through_pillow(tmp_path, monkeypatch):
    root = tmp_path / "imagenet" / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    _save(root / "a" / "plain.jpg", _photo(200, 150, 1))
    _save(root / "a" / "cmyk.jpg", _photo(200, 150, 2), mode="CMYK")
    Image.fromarray(_photo(200, 150, 3)).save(root / "b" / "png_named.jpg", "PNG")  # a PNG with a .jpg name
    Image.fromarray(_photo(200, 150, 4)).save(root / "b" / "real.png")
    opened = []
    real_open_jpeg = decode.open_jpeg

    def spy(path):
        jpeg = real_open_jpeg(path)
        opened.append((path.rsplit("/", 1)[-1], jpeg is not None))
        return jpeg

    monkeypatch.setattr("ipu_effnet.data.imagefolder.open_jpeg", spy)
    fast = ImageFolderDataset(tmp_path / "imagenet", "train", EvalTransform(48, decoder="simplejpeg"))
    slow = ImageFolderDataset(tmp_path / "imagenet", "train", EvalTransform(48, decoder="pillow"))
    for i in range(len(fast)):
        torch.testing.assert_close(fast[i][0], slow[i][0], rtol=0, atol=0)
        assert fast[i][1] == slow[i][1]
    # the fast path took the plain JPEG only; the CMYK JPEG and the PNG named .jpg went on to Pillow,
    # and the .png never reached the JPEG header parser
    assert sorted(set(opened)) == [("cmyk.jpg", False), ("plain.jpg", True), ("png_named.jpg", False)]


def test_a_truncated_jpeg_is_still_recorded_as_unreadable(tmp_path):
    root = tmp_path / "imagenet" / "train" / "a"
    root.mkdir(parents=True)
    _save(root / "good.jpg", _photo(120, 90))
    _save(root / "cut.jpg", _photo(120, 90, 5))
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert open_jpeg(str(root / "cut.jpg")) is not None  # its header is fine: the damage shows when decoding
    ds = ImageFolderDataset(tmp_path / "imagenet", "train", TrainTransform(32, decoder="simplejpeg"),
                            max_corrupt_fraction=1.0)
    index = [p.rsplit("/", 1)[-1] for p, _ in ds.samples].index("cut.jpg")
    image, _ = ds[index]  # the next readable sample stands in for it
    assert tuple(image.shape) == (3, 32, 32)
    assert [p.rsplit("/", 1)[-1] for p in ds.unreadable.found] == ["cut.jpg"]


def test_a_jpeg_simplejpeg_rejects_goes_to_pillow(tmp_path, monkeypatch):
    path = _save(tmp_path / "a.jpg", _photo(160, 120))

    def reject(*args, **kwargs):
        raise ValueError("not today")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", reject)
    jpeg = open_jpeg(path)
    assert isinstance(jpeg, JpegFile)
    box = (10, 10, 150, 110)
    out = crop_resize(jpeg, box, (32, 32), decoder="simplejpeg")
    with Image.open(path) as img:
        reference = crop_resize(img, box, (32, 32), decoder="pillow")
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_choices_are_checked_where_they_are_made(monkeypatch):
    with pytest.raises(UsageError, match="data.jpeg_decoder"):
        resolve_decoder("libjpeg")
    with pytest.raises(UsageError, match="data.resampler"):
        resolve_resampler("lanczos")
    with pytest.raises(UsageError, match="data.resampler"):
        TrainTransform(32, resampler="lanczos")
    with pytest.raises(ConfigError, match="data.jpeg_decoder"):
        apply_overrides(Config(), ["data.jpeg_decoder=turbo"])
    assert resolve_resampler("pillow", in_worker=True) == "pillow"
    monkeypatch.setattr(decode, "jpeg_decoder_available", lambda: False)
    assert resolve_decoder("auto") == "pillow"
    with pytest.raises(UsageError, match="not installed"):
        resolve_decoder("simplejpeg")
    monkeypatch.setattr(decode, "torch_resampler_available", lambda: True)
    assert resolve_resampler("auto", in_worker=True) == "torch"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert resolve_resampler("auto", in_worker=False) == "pillow"  # the training process keeps its threads
    monkeypatch.setattr(decode, "torch_resampler_available", lambda: False)
    assert resolve_resampler("auto", in_worker=True) == "pillow"
    with pytest.raises(UsageError, match="torch >= 2.1"):
        resolve_resampler("torch")
