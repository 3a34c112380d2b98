"""Where a training step runs. One small interface for every backend:

    runner = prepare(training_model, optimizer, ...)     # a backend-specific runner
    metrics = runner.step(images, labels)                 # forward + backward + optimiser step

`images` is the host batch (uint8, micro-batch x gradient accumulation samples); the runner splits it,
accumulates, steps the optimiser once and returns {"loss", "correct", "samples"}. The loss lives
inside `TrainingModel.forward`, so every backend calls the same thing.

Backends: `torch` (CPU/CUDA, DistributedDataParallel under torchrun); `ipu` (poptorch, popdist under
poprun: ipu_effnet/backends/ipu.py, where the host batch is micro-batch x device iterations x local
replicas x gradient accumulation, `runner.host_batch`); `pipeline` (torch.distributed.pipelining under
torchrun, one rank per stage of `ipu.pipeline_splits`, a GPipe or 1F1B schedule over the gradient
accumulation micro-batches: ipu_effnet/backends/pipeline.py, docs/pipeline.md). A pipeline's ranks all
read the same host batches (micro-batch x gradient accumulation) and form one pipeline, not data-parallel
replicas; `runner.sync_weights_to_host()` gives every rank the whole trained model.

    runner = prepare(resolve_backend(cfg.backend, log), training_model, optimizer, cfg, log=log)

The training loop goes through three calls that hide which backend it is (backends/runner.py has the
runner's interface, backends/processes.py the processes):

    info = join(backend, cfg, log)                                  # processes and data shards
    layout = batch_layout(backend, cfg, model, info, num_samples)   # host, evaluation and global batch
    runner = open_runner(backend, training_model, optimizer, cfg, info, device, num_samples, log)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ipu_effnet.backends.processes import DistInfo, join
from ipu_effnet.errors import UsageError

__all__ = ["BatchLayout", "DistInfo", "batch_layout", "join", "open_runner", "poptorch_available", "prepare",
           "resolve_backend"]

POPTORCH_MISSING = ("backend 'ipu' needs poptorch, which ships only with the Poplar SDK: source the SDK's "
                    "enable script, pip install its poptorch wheel, then `pip install -r requirements-ipu.txt` "
                    "(and run with IPU_EFFNET_NO_VENV=1)")


def poptorch_available() -> bool:
    return importlib.util.find_spec("poptorch") is not None


def resolve_backend(name: str, log: Optional[Callable[[str], None]] = None) -> str:
    """The backend to use for config value `name` (auto | torch | ipu | pipeline)."""
    if name == "auto":
        chosen = "ipu" if poptorch_available() else "torch"
        if log is not None:
            log(f"backend auto: poptorch {'found' if chosen == 'ipu' else 'not found'}, using the {chosen} backend")
        name = chosen
    if name == "ipu":
        if not poptorch_available():
            raise UsageError(POPTORCH_MISSING)
        return name
    if name == "pipeline":
        from ipu_effnet.backends.pipeline import import_pipelining

        import_pipelining()  # UsageError on a torch without it (poptorch's 2.0)
        return name
    if name != "torch":
        raise UsageError(f"backend = {name!r} is not one of auto, torch, ipu, pipeline")
    return name


def prepare(backend_name: str, training_model: Any, optimizer: Any, cfg: Any,
            log: Optional[Callable[[str], None]] = None, device: Any = None,
            num_samples: Optional[int] = None) -> Any:
    """A runner with `step(images, labels) -> {"loss", "correct", "samples"}` for a resolved backend name.

    torch: TorchRunner over `training_model` (wrap it in DDP first if needed) on `device`.
    pipeline: PipelineRunner for this rank's stage (needs the torchrun process group; the world size
           must be len(ipu.pipeline_splits) + 1) on `device`.
    ipu:   IpuRunner (poptorch.trainingModel); validates the config first; `num_samples` (training images
           per instance) lets it check that one call's batch fits the data. The loader must then yield
           `runner.host_batch` images per step, sharded over `runner.instances` (rank `runner.instance`).
    """
    if backend_name == "torch":
        from ipu_effnet.backends.torch_backend import TorchRunner

        return TorchRunner(training_model, optimizer, cfg.train.grad_accum, cfg.train.precision, device)
    if backend_name == "ipu":
        from ipu_effnet.backends.ipu import prepare_ipu

        return prepare_ipu(training_model, optimizer, cfg, log=log, num_samples=num_samples)
    if backend_name == "pipeline":
        from ipu_effnet.backends.pipeline import prepare_pipeline

        return prepare_pipeline(training_model, optimizer, cfg, device=device, log=log)
    resolve_backend(backend_name)  # the error for an unknown name
    raise UsageError(f"backend = {backend_name!r}: resolve it with resolve_backend first")


@dataclass(frozen=True)
class BatchLayout:
    """Images per training call on this process (host_batch), per evaluation call, and per optimiser step
    over every process (global_batch)."""

    host_batch: int
    eval_batch: int
    global_batch: int


def batch_layout(backend_name: str, cfg: Any, model: Any, info: DistInfo,
                 num_samples: Optional[int] = None) -> BatchLayout:
    """The phase's batch layout, computed once and checked before any compilation. torch and pipeline:
    micro-batch x accumulation per host batch; ipu: x device iterations x local replicas as well
    (backends/ipu.py, `validate_ipu_config`). `num_samples`: training images per data shard."""
    if backend_name == "ipu":
        from ipu_effnet.backends.ipu import validate_ipu_config

        ipu = validate_ipu_config(cfg, model, instances=info.world_size, num_samples=num_samples)
        return BatchLayout(ipu.host_batch, ipu.eval_host_batch, ipu.global_batch)
    host = cfg.train.micro_batch * cfg.train.grad_accum
    return BatchLayout(host, cfg.train.micro_batch, host * info.world_size)


def open_runner(backend_name: str, training_model: Any, optimizer: Any, cfg: Any, info: DistInfo,
                device: Any = None, num_samples: Optional[int] = None,
                log: Optional[Callable[[str], None]] = None) -> Any:
    """The phase's runner, from the host model as it is now (new, or restored from a checkpoint): torch
    wraps it in DistributedDataParallel with several processes (which broadcasts rank 0's weights); ipu
    first gives every poprun instance instance 0's weights."""
    if backend_name == "torch" and info.world_size > 1:
        import torch.nn as nn

        training_model = nn.parallel.DistributedDataParallel(
            training_model, device_ids=[device.index] if device is not None and device.type == "cuda" else None)
    if backend_name == "ipu":
        info.collectives.broadcast_module(training_model.model)
    return prepare(backend_name, training_model, optimizer, cfg, log=log, device=device, num_samples=num_samples)
