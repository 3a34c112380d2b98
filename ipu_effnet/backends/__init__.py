"""Where a training step runs. One small interface for every backend:

    runner = prepare(training_model, optimizer, ...)     # a backend-specific runner
    metrics = runner.step(images, labels)                 # forward + backward + optimiser step

`images` is the host batch (uint8, micro-batch x gradient accumulation samples); the runner splits it,
accumulates, steps the optimiser once and returns {"loss", "correct", "samples"}. The loss lives
inside `TrainingModel.forward`, so every backend calls the same thing.

Backends: `torch` (CPU/CUDA, DistributedDataParallel under torchrun). `ipu` (poptorch) and `pipeline`
(torch.distributed.pipelining) are the subject of their own issues; asking for them before they exist
is a clear error.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

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
        raise UsageError("backend 'ipu' is not implemented yet (see the IPU backend issue); use backend=torch")
    if name == "pipeline":
        raise UsageError("backend 'pipeline' is not implemented yet (see the pipeline issue); use backend=torch")
    if name != "torch":
        raise UsageError(f"backend = {name!r} is not one of auto, torch, ipu, pipeline")
    return name
