"""The data workload: batches from the training data loader (or with the evaluation preprocessing) over
an ImageNet-style folder or generated JPEGs, so that the input pipeline is timed as the model is."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from ipu_effnet.analysis.bench.config import BenchConfig
from ipu_effnet.analysis.bench.timing import Workload
from ipu_effnet.errors import UsageError

_JPEG_FOLDERS: Dict[Tuple[int, int, int], Any] = {}  # (count, width, height) -> TemporaryDirectory


def generated_jpeg_folder(count: int, width: int, height: int) -> str:
    """An ImageNet-style folder (train/<class>/<n>.JPEG) of `count` JPEGs of width x height, made once per
    process and removed at exit. The pictures are smooth colour fields with noise and edges, quality 90,
    so that their file size (and decoding cost) is near an ImageNet photograph's (~100 kB at 500 x 375)."""
    key = (count, width, height)
    if key not in _JPEG_FOLDERS:
        import os
        import tempfile

        import numpy as np
        from PIL import Image

        folder = tempfile.TemporaryDirectory(prefix="ipu_effnet_bench_jpeg_")
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        for i in range(count):
            class_dir = os.path.join(folder.name, "train", f"class{i % 4}")
            os.makedirs(class_dir, exist_ok=True)
            fx, fy, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
            base = 127 + 100 * np.sin(xs[..., None] * fx + ys[..., None] * fy + phase)
            noise = rng.normal(0, 18, (height, width, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(class_dir, f"{i}.JPEG"), quality=90)
        _JPEG_FOLDERS[key] = folder
    return _JPEG_FOLDERS[key].name


class _Cycle:
    """A dataset repeated `length` times over (so that a round never ends an epoch and respawns workers)."""

    def __init__(self, base: Any, length: int) -> None:
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.base[index % len(self.base)]

    def reseed(self, seed: int) -> None:
        self.base.reseed(seed)


def data_workload(cfg: BenchConfig) -> Workload:
    """Batches from the training loader: decode, RandomResizedCrop to res, flip, collate (uint8)."""
    import os

    from ipu_effnet.data.datasets import ImageFolderDataset
    from ipu_effnet.data.loader import create_loader
    from ipu_effnet.data.transforms import TrainTransform

    res = cfg.res or 224
    if cfg.data_path is not None:
        if not os.path.isdir(cfg.data_path):
            raise UsageError(f"data_path {cfg.data_path!r} is not a folder; expected an ImageNet-style "
                             "folder with train/<class>/<image>")
        root = cfg.data_path
    else:
        root = generated_jpeg_folder(cfg.data_images, *cfg.jpeg_dims())
    from ipu_effnet.data.decode import resolve_resampler
    from ipu_effnet.data.transforms import EvalTransform

    if cfg.preprocess == "eval":
        transform = EvalTransform(res, decoder=cfg.decoder, draft=cfg.draft)
        resampler = "pillow"
    else:
        transform = TrainTransform(res, draft=cfg.draft, decoder=cfg.decoder, resampler=cfg.resampler)
        resampler = resolve_resampler(cfg.resampler, in_worker=cfg.workers > 0 or cfg.threads == 1)
    dataset = ImageFolderDataset(root, "train", transform=transform)
    cycle = _Cycle(dataset, 10 ** 6)
    loader = create_loader(cycle, cfg.batch, train=True, workers=cfg.workers, seed=0,
                           pin_memory=cfg.device == "cuda")
    state: Dict[str, Any] = {}

    def begin() -> None:
        state["it"] = iter(loader)

    def step() -> None:
        next(state["it"])

    def end() -> None:
        state.pop("it", None)  # dropping the iterator shuts its workers down

    info = {"images": len(dataset), "workers": cfg.workers, "data_path": cfg.data_path or "(generated)",
            "decoder": transform.decoder, "resampler": resampler}
    return Workload(cfg, res, step, info, begin=begin, end=end)
