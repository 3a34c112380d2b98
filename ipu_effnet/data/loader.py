"""Loaders: seeded per-epoch shuffling, per-rank shards, distinct worker seeds, exact evaluation.

Training: every rank draws the same permutation from (seed, epoch), trims it to a multiple of
world_size and takes every world_size-th index from its rank on, so the ranks' shards are disjoint and
equally long (the same number of steps everywhere); the last partial batch is dropped. Evaluation: no
shuffle, no padding, no dropping: rank r takes indices r, r + world_size, ..., so the ranks together
cover every image exactly once (metrics summed over ranks are exact) and a rank's last batch may be
smaller. Under DDP, evaluate with the unwrapped module: the ranks may run different numbers of batches.

Call `loader.set_epoch(epoch)` before each pass (to resume, pass the epoch being resumed); a pass that
follows another without set_epoch advances the epoch by one, so a forgotten call never repeats an order.

Randomness: worker w of rank r in epoch e seeds Python's `random`, NumPy's global generator, torch and
the dataset's own augmentation stream (`dataset.reseed`) from `worker_seed(seed, r, e, w)`, a SeedSequence
hash of the four numbers (plain addition would give rank 0's worker 1 the seed of rank 1's worker 0).
With workers = 0 the dataset's stream is seeded the same way (worker 0) at the start of each pass. The
loader owns the torch.Generator that DataLoader draws its base seed from, so iterating a loader never
consumes the training process's global random state: a run resumed at an epoch boundary sees the same
batches and the same augmentation as the uninterrupted run.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from ipu_effnet.data.datasets import DataError

__all__ = [
    "Loader",
    "ShardedSampler",
    "WorkerInit",
    "collate",
    "create_loader",
    "worker_seed",
]

_SHUFFLE_TAG = 0x5348  # keeps the shuffle stream apart from the worker-seed stream for the same seed
_WORKER_TAG = 0x574B


def worker_seed(seed: int, rank: int, epoch: int, worker_id: int) -> int:
    """A 63-bit seed for one (seed, rank, epoch, worker) tuple; distinct tuples give unrelated seeds."""
    state = np.random.SeedSequence([_WORKER_TAG, seed, rank, epoch, worker_id]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def collate(batch: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[(uint8 C x H x W, label), ...] -> (uint8 N x C x H x W, int64 N). In a worker the images are
    stacked straight into shared memory (torch's default_collate), saving a copy on the way back."""
    if not batch:
        raise ValueError("collate: empty batch")
    images = [item[0] for item in batch]
    shape = images[0].shape
    for image in images:
        if image.shape != shape:
            raise ValueError(f"collate: cannot batch images of shapes {tuple(shape)} and {tuple(image.shape)}; "
                             "the dataset's transform must produce one size")
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return default_collate(images), labels


class ShardedSampler(Sampler):
    """Indices of one rank's share of range(num_samples), in a per-epoch seeded order.

    shuffle: a permutation drawn from (seed, epoch), identical on every rank; otherwise 0, 1, 2, ...
    equal_shards: trim the order to a multiple of world_size first, so every rank gets
    num_samples // world_size indices (training); otherwise the shards differ by at most one and
    together hold every index exactly once (evaluation).
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 equal_shards: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank = {rank}, world_size = {world_size}; expected 0 <= rank < world_size")
        if seed < 0:
            raise DataError(f"seed = {seed}; expected a seed >= 0")
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.equal_shards = bool(equal_shards)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> List[int]:
        if self.shuffle:
            order = np.random.default_rng([_SHUFFLE_TAG, self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.equal_shards:
            order = order[: self.num_samples - self.num_samples % self.world_size]
        return order[self.rank:: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        if self.equal_shards:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))


class WorkerInit:
    """DataLoader's worker_init_fn: seeds random, numpy, torch and the dataset from worker_seed()."""

    def __init__(self, seed: int, rank: int = 0, epoch: int = 0) -> None:
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = int(epoch)  # the loader updates it before each pass starts its workers

    def __call__(self, worker_id: int) -> None:
        s = worker_seed(self.seed, self.rank, self.epoch, worker_id)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        info = get_worker_info()
        if info is not None:
            _reseed(info.dataset, s)


def _reseed(dataset: Any, seed: int) -> None:
    reseed = getattr(dataset, "reseed", None)
    if callable(reseed):
        reseed(seed)


class Loader(DataLoader):
    """A DataLoader over a ShardedSampler with `set_epoch` and per-(rank, epoch, worker) seeding."""

    def __init__(self, dataset: Dataset, sampler: ShardedSampler, batch_size: int, drop_last: bool,
                 workers: int, seed: int, rank: int = 0, pin_memory: bool = False) -> None:
        worker_init = WorkerInit(seed, rank)
        generator = torch.Generator()
        generator.manual_seed(seed)  # DataLoader's base seed comes from here, not from the global generator
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                         collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                         worker_init_fn=worker_init if workers > 0 else None, generator=generator,
                         persistent_workers=False)  # fresh workers each pass pick up the new epoch
        self._worker_init = worker_init
        self._shard_sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = sampler.world_size
        self._epoch_set = True  # epoch 0 counts as set for the first pass

    @property
    def epoch(self) -> int:
        return self._shard_sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order and augmentation the next pass uses."""
        self._shard_sampler.set_epoch(epoch)
        self._epoch_set = True

    def __iter__(self) -> Any:
        if not self._epoch_set:
            self._shard_sampler.set_epoch(self._shard_sampler.epoch + 1)
        self._epoch_set = False
        self._worker_init.epoch = self.epoch
        if self.num_workers == 0:
            _reseed(self.dataset, worker_seed(self.seed, self.rank, self.epoch, 0))
        return super().__iter__()


def create_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, seed: int, rank: int = 0,
                  world_size: int = 1, drop_last: Optional[bool] = None, pin_memory: Optional[bool] = None) -> Loader:
    """Batches of (uint8 N x C x H x W, int64 N) from this rank's shard of `dataset`.

    train: shuffle per epoch, equal shards on every rank, drop the last partial batch (unless
    drop_last=False); otherwise dataset order, disjoint shards covering every sample once, and the last
    partial batch kept. workers: DataLoader worker processes (0: load in this process). pin_memory:
    page-locked batches, so that the backend's non_blocking copies to a GPU overlap the step; None:
    when CUDA is available (docs/PERFORMANCE.md).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if batch_size < 1:
        raise DataError(f"batch_size = {batch_size}; expected >= 1")
    if workers < 0:
        raise DataError(f"data.workers = {workers}; expected >= 0")
    n = len(dataset)  # type: ignore[arg-type]
    sampler = ShardedSampler(n, shuffle=train, seed=seed, rank=rank, world_size=world_size, equal_shards=train)
    drop_last = bool(train) if drop_last is None else bool(drop_last)
    if train and drop_last and len(sampler) < batch_size:
        raise DataError(f"the training data has {n} images, {len(sampler)} per rank over {world_size} "
                        f"rank(s): fewer than one batch of {batch_size}; expected at least "
                        f"{batch_size * world_size} images (or a smaller micro-batch)")
    return Loader(dataset, sampler, batch_size, drop_last, workers, seed, rank, pin_memory)
