"""Data pipeline: image folders, transforms (crop geometry, JPEG draft decoding), generated and digits data,
sharded loaders and their seeding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipu_effnet.config import DataConfig
from ipu_effnet.data import (
    DataError,
    DigitsDataset,
    EvalTransform,
    GeneratedDataset,
    ImageFolderDataset,
    ShardedSampler,
    TrainTransform,
    collate,
    create_dataset,
    create_loader,
    decode_region,
    digits_split,
    eval_crop_box,
    random_resized_crop_box,
    worker_seed,
)

BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


def _save(path: Path, size, colour=(120, 60, 30), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, fmt)
    return path


def _gradient(width: int, height: int) -> Image.Image:
    """R encodes x, G encodes y (0..255 across the image), B constant: positions readable from pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    arr = np.stack([x, y, np.full_like(x, 128)], axis=-1)
    return Image.fromarray(np.round(arr).astype(np.uint8))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    _save(root / "train" / "dog" / "a.jpg", (64, 48))
    _save(root / "train" / "dog" / "b.png", (30, 90), mode="L")
    _save(root / "train" / "ant" / "c.JPEG", (200, 120))
    _save(root / "train" / "ant" / "sub" / "d.png", (40, 40), mode="RGBA")
    _save(root / "train" / "cat" / "e.png", (17, 23), mode="P")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    _save(root / "train" / "cat" / ".hidden.png", (8, 8))
    _save(root / "val" / "dog" / "v1.jpg", (100, 80))
    _save(root / "val" / "cat" / "v2.png", (50, 70))
    return root


# ----------------------------------------------------------------------------------------------------
# imagenet folder


def test_image_folder_classes_from_train_and_val_spelling(folder: Path):
    cfg = DataConfig(dataset="imagenet", path=str(folder))
    train = create_dataset(cfg, "train", 32, train=True)
    assert train.classes == ["ant", "cat", "dog"] and train.num_classes == 3
    assert len(train) == 5  # notes.txt and .hidden.png are skipped; sub/ is walked
    assert sorted(train.targets) == [0, 0, 1, 2, 2]
    # val/ lacks 'ant' but keeps train's indices: cat = 1, dog = 2
    val = create_dataset(cfg, "validation", 40, train=False)
    assert val.split_dir == folder / "val"
    assert val.num_classes == 3
    assert {Path(p).name: label for p, label in val.samples} == {"v1.jpg": 2, "v2.png": 1}
    for ds, res in ((train, 32), (val, 40)):
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, res, res)
            assert label == ds.samples[i][1]
    images, labels = next(iter(create_loader(val, 4, train=False, workers=0, seed=0)))
    assert images.shape == (2, 3, 40, 40) and labels.tolist() == [1, 2]


def test_image_folder_errors_name_the_path(tmp_path: Path, folder: Path):
    def error(path, split="train"):
        with pytest.raises(DataError) as info:
            create_dataset(DataConfig(dataset="imagenet", path=path), split, 32, train=False)
        message = str(info.value)
        assert "\n" not in message and isinstance(info.value, ValueError)
        return message

    assert "does-not-exist" in error(str(tmp_path / "does-not-exist"))
    (tmp_path / "only_train" / "train" / "x").mkdir(parents=True)
    _save(tmp_path / "only_train" / "train" / "x" / "a.png", (8, 8))
    message = error(str(tmp_path / "only_train"), "validation")
    assert "validation" in message and "val" in message and "only_train" in message
    (tmp_path / "empty" / "train" / "x").mkdir(parents=True)
    assert "no images" in error(str(tmp_path / "empty"))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    _save(tmp_path / "flat" / "train" / "a.png", (8, 8))
    assert "no class folders" in error(str(tmp_path / "flat"))
    _save(folder / "val" / "zebra" / "z.png", (8, 8))
    assert "zebra" in error(str(folder), "val")
    assert "data.path" in error(None)
    with pytest.raises(DataError, match="model.num_classes = 5"):
        create_dataset(DataConfig(dataset="imagenet", path=str(tmp_path / "only_train")), "train", 8, True,
                       num_classes=5)


def test_a_folder_of_unreadable_images_raises_data_error(tmp_path: Path):
    # one unreadable file out of one is over any corrupt-fraction limit (tests/test_faults.py: the rest)
    bad = tmp_path / "train" / "x" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="1 of 1 images are unreadable.*broken.jpg"):
        ImageFolderDataset(tmp_path, "train", EvalTransform(16))


# ----------------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_is_a_centre_crop_of_the_resized_image():
    width, height, res = 400, 300, 56
    img = _gradient(width, height)
    out = EvalTransform(res)(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, res, res)
    # Shorter side 300 -> round(56 / 0.875) = 64: the crop keeps the central 300 * 56 / 64 = 262.5 source
    # pixels in both directions. Output pixel centres therefore sample source x from 68.75 + 262.5 / 112
    # to 331.25 - 262.5 / 112, and y from 18.75 + ... to 281.25 - ...
    kept = height * res / round(res / 0.875)
    step = kept / res
    x0, y0 = (width - kept) / 2, (height - kept) / 2
    for channel, start, extent in ((0, x0, width), (1, y0, height)):
        first = (start + step / 2 - 0.5) * 255 / (extent - 1)
        last = (start + kept - step / 2 - 0.5) * 255 / (extent - 1)
        profile = out[channel].double().mean(dim=channel)  # R: mean of each column; G: of each row
        tolerance = 0.75 * step * 255 / (extent - 1)  # 3/4 of an output pixel: Resize rounds sizes
        assert abs(profile[0].item() - first) < tolerance
        assert abs(profile[-1].item() - last) < tolerance
        assert torch.all(profile[1:] >= profile[:-1])  # not flipped
    # The same as torchvision's two steps, resize (shorter side 64, longer truncated) then centre crop.
    resized = img.resize((int(64 * width / height), 64), BILINEAR)
    left, top = int(round((resized.width - res) / 2)), int(round((resized.height - res) / 2))
    reference = np.asarray(resized.crop((left, top, left + res, top + res))).transpose(2, 0, 1)
    assert np.abs(out.numpy().astype(int) - reference).max() <= 2


def test_eval_transform_marker_lands_in_the_centre():
    img = Image.new("RGB", (90, 160), (255, 255, 255))  # portrait: the width is the shorter side
    img.paste((0, 0, 0), (40, 75, 50, 85))  # a 10 x 10 black square at the centre
    # Shorter side 90 -> round(32 / 0.875) = 37: the crop keeps rows 80 -+ 90 * 32 / 37 / 2 = 41.1..118.9.
    img.paste((255, 0, 0), (0, 0, 90, 37))  # red bands ending 4 px (under 2 output px) outside the crop
    img.paste((255, 0, 0), (0, 123, 90, 160))
    img.paste((0, 255, 0), (0, 44, 90, 46))  # green lines just inside it
    img.paste((0, 255, 0), (0, 114, 90, 116))
    out = EvalTransform(32)(img).numpy()
    dark = np.argwhere(out.sum(0) < 100)
    assert len(dark) > 0
    assert np.allclose(dark.mean(0), (15.5, 15.5), atol=0.6)
    red = (out[0].astype(int) > 150) & (out[1].astype(int) < 100)
    assert not red.any()  # the bands lie outside the crop
    green = np.argwhere((out[1].astype(int) > 200) & (out[0].astype(int) < 200))[:, 0]
    assert green.min() <= 2 and green.max() >= 29


def test_train_transform_sizes_and_crop_boxes():
    rng = random.Random(0)
    transform = TrainTransform(24)
    for size in ((64, 48), (30, 90), (500, 20), (7, 9), (24, 24)):
        img = Image.new("RGB", size, (10, 200, 30))
        for _ in range(5):
            out = transform(img, rng)
            assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 24, 24)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box((300, 200), rng=rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.08 * 60000 * 0.97 <= w * h <= 60000
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # An extreme aspect ratio defeats all ten attempts: the fallback is the widest centred 4:3 crop.
    assert random_resized_crop_box((300, 10), rng=rng) == (143, 0, 156, 10)
    assert random_resized_crop_box((10, 300), rng=rng) == (0, 143, 10, 156)


def test_train_transform_flips_sometimes():
    img = Image.new("RGB", (40, 40), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 40))  # left red, right blue
    transform = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    rng = random.Random(1)
    flipped = [bool(transform(img, rng)[2, :, 0].float().mean() > 128) for _ in range(64)]
    assert 10 < sum(flipped) < 54


def test_jpeg_draft_decodes_large_images_at_reduced_scale(tmp_path: Path):
    path = tmp_path / "big.jpg"
    _gradient(2000, 1500).save(path, quality=95)
    res = 160
    transform = EvalTransform(res)
    with Image.open(path) as img:
        box = transform.box(img.size)
        decoded, scaled = decode_region(img, box, (res, res))
    assert decoded.size[0] < 2000 and decoded.size[1] < 1500  # 1/8 scale: 250 x 188
    assert min(decoded.size) >= round(res / 0.875)  # the resize target of the shorter side
    assert scaled[2] - scaled[0] >= res and scaled[3] - scaled[1] >= res
    with Image.open(path) as img:
        drafted = transform(img)
    with Image.open(path) as img:
        img.load()  # decoded in full first: draft becomes a no-op
        full = transform(img)
    assert tuple(drafted.shape) == (3, res, res)
    assert (drafted.double() - full.double()).abs().mean() < 2.0

    # Training: the draft keeps at least res source pixels inside the random crop box.
    rng = random.Random(0)
    for _ in range(5):
        box = random_resized_crop_box((2000, 1500), rng=rng)
        with Image.open(path) as img:
            decoded, scaled = decode_region(img, box, (res, res))
        assert scaled[2] - scaled[0] >= res - 1e-6 and scaled[3] - scaled[1] >= res - 1e-6
        assert decoded.size[0] <= 2000
    with Image.open(path) as img:  # a small crop of a big image: no reduction possible
        decoded, scaled = decode_region(img, (0, 0, 200, 200), (res, res))
    assert decoded.size == (2000, 1500) and scaled == (0, 0, 200, 200)
    with Image.open(path) as img:
        out = TrainTransform(res)(img, random.Random(3))
    assert tuple(out.shape) == (3, res, res) and out.dtype == torch.uint8


def test_eval_crop_box_square_image_is_the_centre():
    left, top, right, bottom = eval_crop_box((256, 256), 224)
    assert (left, top, right, bottom) == (16.0, 16.0, 240.0, 240.0)


# ----------------------------------------------------------------------------------------------------
# generated


def test_generated_is_deterministic_and_label_dependent():
    a = GeneratedDataset(200, num_classes=4, resolution=(12, 20), seed=3)
    b = GeneratedDataset(200, num_classes=4, resolution=(12, 20), seed=3)
    image, label = a[17]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 12, 20) and label == 17 % 4
    assert torch.equal(image, b[17][0]) and torch.equal(a[-1][0], b[199][0])
    assert not torch.equal(image, a[21][0])  # same class, different sample
    assert not torch.equal(image, GeneratedDataset(200, 4, (12, 20), seed=4)[17][0])
    val = GeneratedDataset(40, num_classes=4, resolution=(12, 20), seed=3, split="validation")
    assert not torch.equal(val[17][0], image)
    with pytest.raises(IndexError):
        a[200]
    # Learnable: the nearest class mean colour (from train) classifies validation images.
    means = torch.stack([torch.stack([a[i][0].double().mean((1, 2)) for i in range(c, 200, 4)]).mean(0)
                         for c in range(4)])
    correct = sum(int(torch.cdist(val[i][0].double().mean((1, 2))[None], means).argmin()) == val[i][1]
                  for i in range(len(val)))
    assert correct == len(val)


def test_create_dataset_generated_sizes_and_classes():
    cfg = DataConfig(dataset="generated", num_train=10, num_val=3)
    train = create_dataset(cfg, "train", 16, train=True, num_classes=7, seed=1)
    val = create_dataset(cfg, "val", 24, train=False, num_classes=7, seed=1)
    assert (len(train), len(val), train.num_classes) == (10, 3, 7)
    assert tuple(train[0][0].shape) == (3, 16, 16) and tuple(val[2][0].shape) == (3, 24, 24)
    assert create_dataset(DataConfig(dataset="generated"), "train", 8, True).num_classes == 1000


# ----------------------------------------------------------------------------------------------------
# digits


@pytest.mark.slow
def test_digits_split_and_upsampling():
    train_idx, val_idx = digits_split()
    assert len(train_idx) + len(val_idx) == 1797
    assert (len(train_idx), len(val_idx)) == (1497, 300)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert np.array_equal(digits_split()[1], val_idx)  # fixed
    cfg = DataConfig(dataset="digits")
    train = create_dataset(cfg, "train", 32, train=True, num_classes=10)
    val = create_dataset(cfg, "validation", 32, train=False)
    assert (len(train), len(val), train.num_classes, val.num_classes) == (1497, 300, 10, 10)
    assert np.bincount(val.targets).tolist() == [30] * 10
    assert sorted(set(train.targets)) == list(range(10))
    image, label = val[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 32, 32) and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert image.max() > 200 and image.min() == 0  # 0..16 scaled to 0..255, black background
    # Bilinear upsampling: 8x8 -> 32 has more than the 17 grey levels of a nearest-neighbour copy.
    assert len(torch.unique(image)) > 17
    with pytest.raises(DataError, match="model.num_classes = 1000"):
        create_dataset(cfg, "train", 32, train=True, num_classes=1000)
    assert len(create_dataset(DataConfig(dataset="digits", num_val=50), "val", 8, False)) == 50


def test_digits_training_augmentation_translates_without_flipping():
    plain = DigitsDataset("train", 32, train=False)
    augmented = DigitsDataset("train", 32, train=True)
    augmented.reseed(0)
    base = plain[5][0][0].numpy().astype(int)
    shifts = set()
    for _ in range(30):
        out = augmented[5][0][0].numpy().astype(int)
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(out[max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)],
                                     base[max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)])]
        assert matches  # a pure translation by at most res // 16 = 2 pixels
        shifts.add(matches[0])
    assert len(shifts) > 3


# ----------------------------------------------------------------------------------------------------
# loaders


class _Index(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), i % 256, dtype=torch.uint8), i


class _Random(_Index):
    def __getitem__(self, i: int):
        return torch.randint(0, 2**30, (1,)), i


def _labels(loader) -> list:
    return [label for _, labels in loader for label in labels.tolist()]


def test_training_shards_are_disjoint_and_equal():
    shards = [_labels(create_loader(_Index(23), 2, train=True, workers=0, seed=5, rank=r, world_size=2))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 10  # 11 per rank, the last partial batch dropped
    assert not set(shards[0]) & set(shards[1])
    samplers = [ShardedSampler(23, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(samplers[0]) == len(samplers[1]) == 11
    assert not set(samplers[0]) & set(samplers[1])
    assert len(set(samplers[0]) | set(samplers[1])) == 22


def test_evaluation_shards_cover_every_sample_once_and_keep_partial_batches():
    loaders = [create_loader(_Index(10), 3, train=False, workers=0, seed=0, rank=r, world_size=3)
               for r in range(3)]
    seen = [_labels(loader) for loader in loaders]
    assert sorted(i for shard in seen for i in shard) == list(range(10))
    assert seen[0] == [0, 3, 6, 9]  # dataset order, a last batch of 1 kept
    assert [len(loader) for loader in loaders] == [2, 1, 1]
    batch_sizes = [len(labels) for _, labels in create_loader(_Index(10), 4, train=False, workers=0, seed=0)]
    assert batch_sizes == [4, 4, 2]


def test_shuffle_depends_on_seed_and_epoch_only():
    def order(seed, epoch, workers=0):
        loader = create_loader(_Index(40), 4, train=True, workers=workers, seed=seed)
        loader.set_epoch(epoch)
        return _labels(loader)

    assert order(0, 3) == order(0, 3) == order(0, 3, workers=2)
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    assert sorted(order(0, 3)) == list(range(40))
    loader = create_loader(_Index(40), 4, train=True, workers=0, seed=0)
    state = torch.get_rng_state()
    first, second = _labels(loader), _labels(loader)  # no set_epoch: the second pass advances
    assert first == order(0, 0) and second == order(0, 1) and loader.epoch == 1
    assert torch.equal(state, torch.get_rng_state())  # the global generator is not consumed


def test_workers_get_distinct_reproducible_seeds():
    def draws(rank=0, epoch=0):
        loader = create_loader(_Random(8), 2, train=False, workers=2, seed=7, rank=rank)
        loader.set_epoch(epoch)
        return [images[:, 0].tolist() for images, _ in loader]

    batches = draws()
    # Batches alternate between the workers: 0 and 2 come from worker 0, 1 and 3 from worker 1.
    assert batches[0][0] != batches[1][0]
    torch.manual_seed(worker_seed(7, 0, 0, 1))
    assert batches[1] == torch.randint(0, 2**30, (2,)).tolist()
    assert draws() == batches
    assert draws(epoch=1)[0] != batches[0]
    other_rank = create_loader(_Random(8), 2, train=False, workers=2, seed=7, rank=1, world_size=2)
    assert next(iter(other_rank))[0][0, 0] != batches[0][0]
    assert len({worker_seed(0, r, e, w) for r in range(3) for e in range(3) for w in range(3)}) == 27


def test_augmentation_stream_is_seeded_per_epoch_in_process(folder: Path):
    dataset = create_dataset(DataConfig(dataset="imagenet", path=str(folder)), "train", 16, train=True)

    def epoch_images(epoch, global_seed=0):
        loader = create_loader(dataset, 1, train=True, workers=0, seed=0)
        loader.set_epoch(epoch)
        random.seed(global_seed)  # the global stream must not matter
        return [(int(labels[0]), images) for images, labels in loader]

    a, b = epoch_images(2, global_seed=1), epoch_images(2, global_seed=2)
    assert all(la == lb and torch.equal(ia, ib) for (la, ia), (lb, ib) in zip(a, b))
    assert any(not torch.equal(ia, ib) for (_, ia), (_, ib) in zip(a, epoch_images(3)))


def test_loader_errors_and_collate():
    with pytest.raises(DataError, match="fewer than one batch"):
        create_loader(_Index(5), 4, train=True, workers=0, seed=0, world_size=2)
    with pytest.raises(DataError, match="rank"):
        create_loader(_Index(5), 1, train=False, workers=0, seed=0, rank=2, world_size=2)
    images, labels = collate([(torch.zeros(3, 4, 4, dtype=torch.uint8), 1),
                              (torch.ones(3, 4, 4, dtype=torch.uint8), 2)])
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="shapes"):
        collate([(torch.zeros(3, 4, 4), 1), (torch.zeros(3, 5, 4), 2)])
