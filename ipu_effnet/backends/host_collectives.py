"""Host-side collectives between the processes of one run.

Gradients never pass through here: under torchrun DistributedDataParallel reduces them, and under poprun
the compiled IPU program reduces them across replicas. What the host still needs (docs/reference.md section 6,
as Graphcore's code does it under poprun with horovod):

- the epoch's training sums and the validation counts added up over processes, so every process logs
  and checkpoints the metrics of the whole data set rather than of its own shard;
- the BatchNorm statistics recomputed for a weight average, summed over processes
  (`all_reduce_sum_tensor`, training/bn_stats.py), so every process ends with the same ones;
- the seed and the initial (or restored) weights taken from process 0, so that every poprun instance
  starts from the same point whatever its own RNG or file system saw.

    comm = poprun_collectives("auto", instance, instances)     # under poprun
    comm = torch_collectives()                                  # under torchrun (default process group)
    totals = comm.all_reduce_sum({"correct": 12.0, "samples": 40.0})
    summed = comm.all_reduce_sum_tensor(torch.ones(3, dtype=torch.float64))
    comm.broadcast_module(model)                                # parameters and buffers, in place
    seed = comm.broadcast_object(seed)

Under poprun, `host_collectives: auto` uses horovod when it imports (it builds only against torch 2.0.x,
that is, in the Poplar SDK's environment) and torch.distributed with gloo otherwise. poprun instances are
MPI processes, not torchrun ranks, so the gloo group is built from popdist's layout: rank = instance
index, world size = number of instances, rendezvous at MASTER_ADDR:MASTER_PORT (127.0.0.1 and 29400 by
default: right when every instance runs on one host; across hosts export MASTER_ADDR, the first host's
address, to every instance, e.g. `poprun --mpi-local-args="-x MASTER_ADDR -x MASTER_PORT"`).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from ipu_effnet.config import HOST_COLLECTIVES
from ipu_effnet.errors import UsageError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29400


class LocalCollectives:
    """One process: every collective is the identity."""

    name = "local"
    rank = 0
    size = 1

    def all_reduce_sum(self, values: Dict[str, float]) -> Dict[str, float]:
        return dict(values)

    def all_reduce_sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def broadcast_module(self, module: nn.Module, root: int = 0) -> None:
        return None

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj


def _module_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer by name, as the tensors themselves (a broadcast writes into them)."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


class TorchCollectives:
    """torch.distributed's default process group (gloo or NCCL), already initialised."""

    name = "torch.distributed"

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def all_reduce_sum(self, values: Dict[str, float]) -> Dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if self._dist.get_backend() == "nccl":
            t = t.cuda()
        self._dist.all_reduce(t)
        return dict(zip(keys, t.cpu().tolist()))

    def all_reduce_sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach().clone()
        if self._dist.get_backend() == "nccl":
            t = t.cuda()
        self._dist.all_reduce(t)
        return t.cpu()

    def broadcast_module(self, module: nn.Module, root: int = 0) -> None:
        with torch.no_grad():
            for _, tensor in sorted(_module_tensors(module).items()):
                self._dist.broadcast(tensor.data, src=root)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=root)
        return box[0]


class HorovodCollectives:
    """horovod.torch (initialised here): Graphcore's choice for host collectives under poprun."""

    name = "horovod"

    def __init__(self, hvd: Any) -> None:
        hvd.init()
        self._hvd = hvd
        self.rank = int(hvd.rank())
        self.size = int(hvd.size())

    def all_reduce_sum(self, values: Dict[str, float]) -> Dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        total = self._hvd.allreduce(t, op=self._hvd.Sum, name="ipu_effnet.metrics")
        return dict(zip(keys, total.tolist()))

    def all_reduce_sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvd.allreduce(tensor.detach().clone(), op=self._hvd.Sum, name="ipu_effnet.tensor")

    def broadcast_module(self, module: nn.Module, root: int = 0) -> None:
        self._hvd.broadcast_parameters(_module_tensors(module), root_rank=root)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root)


def torch_collectives() -> Any:
    """Collectives over torch.distributed's default group when one is initialised, else local ones."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollectives()
    return LocalCollectives()


def shutdown_process_group() -> None:
    """Leave torch.distributed's default group at the end of a run that finished (or stopped at an agreed
    step): wait for every process, then destroy the group. A process that simply exits may take the
    rendezvous store (held by rank 0) away while another still uses it, and gloo's threads then abort
    that process at exit ("terminate called without an active exception"). A no-op alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _import_horovod() -> Optional[Any]:
    try:
        return importlib.import_module("horovod.torch")
    except ImportError:
        return None


def rendezvous(environ: Optional[Dict[str, str]] = None) -> str:
    """The gloo rendezvous address for poprun instances: tcp://MASTER_ADDR:MASTER_PORT."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR
    port = env.get("MASTER_PORT") or str(DEFAULT_MASTER_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"MASTER_PORT = {port!r} is not a TCP port (1-65535)")
    return f"tcp://{addr}:{port}"


def poprun_collectives(kind: str, instance: int, instances: int,
                       log: Optional[Callable[[str], None]] = None) -> Any:
    """Host collectives between `instances` poprun instances, this one being `instance`.

    kind: `auto` (horovod if it imports, else gloo), `horovod` (an error if it does not import) or `gloo`.
    """
    if kind not in HOST_COLLECTIVES:
        raise UsageError(f"distributed.host_collectives = {kind!r} is not one of {', '.join(HOST_COLLECTIVES)}")
    if instances <= 1:
        return LocalCollectives()
    say = log or (lambda _msg: None)
    hvd = _import_horovod() if kind in ("auto", "horovod") else None
    if hvd is not None:
        comm: Any = HorovodCollectives(hvd)
        if (comm.rank, comm.size) != (instance, instances):
            raise UsageError(f"horovod sees rank {comm.rank} of {comm.size} but popdist says instance {instance} "
                             f"of {instances}: start the run with poprun alone (not inside mpirun or horovodrun)")
    elif kind == "horovod":
        raise UsageError("distributed.host_collectives = 'horovod' but horovod does not import: "
                         "pip install horovod==0.28.1 in the Poplar SDK's environment (it needs torch 2.0.x), "
                         "or use host_collectives: gloo")
    else:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=rendezvous(), rank=instance, world_size=instances)
        comm = TorchCollectives()
    say(f"poprun: instance {instance + 1}/{instances}, host collectives through {comm.name}")
    return comm
