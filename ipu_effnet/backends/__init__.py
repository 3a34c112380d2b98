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
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Optional

from ipu_effnet.errors import UsageError

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
            log: Optional[Callable[[str], None]] = None, device: Any = None, num_samples: Optional[int] = None,
            phase: str = "train") -> Any:
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

        return prepare_ipu(training_model, optimizer, cfg, log=log, num_samples=num_samples, phase=phase)
    if backend_name == "pipeline":
        from ipu_effnet.backends.pipeline import prepare_pipeline

        return prepare_pipeline(training_model, optimizer, cfg, device=device, log=log)
    resolve_backend(backend_name)  # the error for an unknown name
    raise UsageError(f"backend = {backend_name!r}: resolve it with resolve_backend first")
