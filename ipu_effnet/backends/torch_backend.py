"""The PyTorch backend: CPU or CUDA, optionally DistributedDataParallel under torchrun.

One precision path: the forward runs under `autocast` when the precision asks for reduced precision
and under a null context otherwise, so fp32 and mixed precision share every line (a lesson from
torchvision's reference script, which once stepped the optimiser twice through separate branches).
Gradient accumulation splits the host batch into micro-batches; under DDP only the last micro-batch
synchronises gradients.

Non-finite steps are never applied. With fp16 the GradScaler skips a step whose gradients overflow and
lowers its scale (`skipped`, `scale` in the step's result); otherwise a step with a non-finite loss
(under DDP: non-finite all-reduced gradients, the same on every rank) is not applied either. What the
run then does is `run/faults.py`'s policy.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from ipu_effnet.backends.runner import Reduce, Runner
from ipu_effnet.training.evaluation import evaluate
from ipu_effnet.training.precision import autocast_dtype


class TorchRunner(Runner):
    """Runs training steps of a TrainingModel (or its DDP wrapper) with an optimiser; evaluates it on the
    host (backends/runner.py has the interface)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1,
                 precision: str = "32.32", device: Optional[torch.device] = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.grad_accum = int(grad_accum)
        self.device = device or torch.device("cpu")
        self.precision = precision
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.cuda.amp.GradScaler() if self.amp_dtype == torch.float16 else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Union[float, bool]]:
        if images.shape[0] % self.grad_accum:
            raise ValueError(f"host batch of {images.shape[0]} is not a multiple of grad_accum {self.grad_accum}")
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        loss_sum = 0.0
        correct = 0
        for i, (x, y) in enumerate(zip(images.chunk(self.grad_accum), labels.chunk(self.grad_accum))):
            last = i == self.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.ddp) else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, logits = self.model(x, y)
                scaled = loss / self.grad_accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss_sum += float(loss.detach()) * x.shape[0]
            correct += int((logits.detach().argmax(1) == y).sum())
        out: Dict[str, Union[float, bool]] = {}
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())
            self.scaler.step(self.optimizer)  # skipped by the scaler itself when a gradient is inf or NaN
            self.scaler.update()
            out["scale"] = float(self.scaler.get_scale())
            skipped = out["scale"] < scale  # update() lowers the scale exactly when the step was skipped
        else:
            skipped = not _grads_finite(self.optimizer) if self.ddp else not math.isfinite(loss_sum)
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = images.shape[0]
        out.update({"loss": loss_sum / n, "correct": correct, "samples": n, "skipped": bool(skipped)})
        return out


    def evaluate_loader(self, loader: Any, reduce: Optional[Reduce] = None,
                        batches: Optional[int] = None) -> Dict[str, float]:
        """Validation of the TrainingModel itself (not its DDP wrapper) over this process's loader; `reduce`
        sums the counts over processes. `batches` is for devices that run in lockstep; unused here."""
        model = self.model.module if self.ddp else self.model
        return evaluate(model, loader, self.device, self.precision, reduce=reduce)


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
