"""The processes of one run, as each backend starts them, and how the data is shared among them.

    info = join("torch", cfg, log)      # torchrun: the DDP process group (a no-op alone)
    info = join("ipu", cfg, log)        # poprun: instances, host collectives between them
    info = join("pipeline", cfg, log)   # torchrun: one rank per pipeline stage, all reading the same data

`info.rank` / `info.is_main` say which process speaks and writes the run's files; `info.shard` is
(this process's data shard, number of shards); `info.collectives` sum metrics and broadcast seeds and
weights between the processes that hold data shards (backends/host_collectives.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ipu_effnet.backends.host_collectives import LocalCollectives, poprun_collectives, torch_collectives


@dataclass
class DistInfo:
    """This process's place in the run (see the module docstring)."""

    rank: int = 0
    world_size: int = 1  # processes that hold a data shard each
    local_rank: int = 0
    collectives: Any = field(default_factory=LocalCollectives)
    shard_rank: Optional[int] = None  # None: rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Tuple[int, int]:
        return (self.rank if self.shard_rank is None else self.shard_rank), self.world_size

    def all_reduce_sum(self, values: Dict[str, float]) -> Dict[str, float]:
        """Counts summed over the data shards (evaluation, stop requests); the values themselves alone."""
        return values if self.world_size == 1 else self.collectives.all_reduce_sum(values)

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a no-op alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    torch_collectives())


def init_poprun(cfg: Any, log: Callable[[str], None]) -> DistInfo:
    """poprun instances (not torch.distributed ranks): each trains its replicas on its own data shard;
    instance 0 logs and writes checkpoints; metrics and initial weights go through host collectives."""
    from ipu_effnet.backends.ipu import poprun_instance

    instance, instances = poprun_instance()
    return DistInfo(instance, instances, 0, poprun_collectives(cfg.distributed.host_collectives, instance,
                                                                instances, log=log if instance == 0 else None))


def join(backend: str, cfg: Any, log: Callable[[str], None]) -> DistInfo:
    """This process's DistInfo for a resolved backend name."""
    if backend == "ipu":
        return init_poprun(cfg, log)
    info = init_distributed(cfg.distributed.backend)
    if backend == "pipeline":  # every rank is one stage of one pipeline: all read the same batches
        return DistInfo(rank=info.rank, world_size=1, local_rank=info.local_rank, shard_rank=0)
    return info
