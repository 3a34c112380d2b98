"""The training step that `bench` and `compare` time: the recipe's own step, not a stand-in for it.

`TrainingModel` (training/model.py: uint8 images normalised on the device, mixing where the recipe asks
for it, the loss computed inside `forward`) driven by `TorchRunner.step` (backends/torch_backend.py:
autocast, gradient accumulation, loss scaling for fp16, the optimiser step, gradients zeroed), on one
fixed synthetic host batch: uint8 images and integer labels, moved to the device by the runner at every
step as a loader's batches are. `training_workload` builds it for one configuration:

- `train=None`, bench's plain step: no label smoothing or mixing, SGD (lr 1e-3, momentum 0.9, weight
  decay 1e-5 on the recipe's weight-decay groups), no accumulation, the configuration's precision
  (`PRECISIONS`) and channels-last setting;
- `train=` a `config.TrainConfig`, a recipe's step (`compare.measure_training`): its loss and mixing
  (`TrainingModel.from_config`), its optimiser (`optimizer_from_config`), its accumulation and precision.

On the IPU (`ipu_training_workload`) the same plain TrainingModel, its loss marked with
`poptorch.identity_loss`, runs as `poptorch.trainingModel` with poptorch's SGD.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from ipu_effnet.analysis.bench.build import device_sync, import_poptorch, maybe_compile, torch_device
from ipu_effnet.analysis.bench.config import BenchConfig
from ipu_effnet.analysis.bench.timing import Workload

# bench's --precision as the recipe's train.precision (TorchRunner's names): autocast to bf16, or to fp16
# with a GradScaler (CUDA only); the weights and the optimiser stay fp32 in every case.
PRECISIONS = {"fp32": "32.32", "bf16": "bf16", "fp16": "16.32"}
PLAIN_SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-5}


def synthetic_batch(batch: int, res: int, num_classes: int) -> Tuple[Any, Any]:
    """A fixed host batch: uint8 `batch` x 3 x res x res images (what the loader delivers) and labels,
    both from a seeded generator, so that A and B see the same numbers."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return images, labels


def training_workload(cfg: BenchConfig, network: Any, res: int, train: Optional[Any] = None) -> Workload:
    """One training step of `network` at `res` px over `cfg.batch` images (with `train`, a multiple of
    train.grad_accum), on cfg.device, torch.compile'd with cfg.compile. The network is trained in place."""
    import torch

    from ipu_effnet.backends.torch_backend import TorchRunner
    from ipu_effnet.training.model import TrainingModel

    device = torch_device(cfg)
    network = network.to(device)
    params = sum(p.numel() for p in network.parameters())
    forward = maybe_compile(network, cfg)
    if train is None:
        from ipu_effnet.training.param_groups import param_groups

        model = TrainingModel(forward, channels_last=cfg.channels_last)
        optimiser = torch.optim.SGD(param_groups(network, weight_decay=PLAIN_SGD["weight_decay"]),
                                    lr=PLAIN_SGD["lr"], momentum=PLAIN_SGD["momentum"])
        grad_accum, precision = 1, PRECISIONS[cfg.precision]
    else:
        from ipu_effnet.training.optim import optimizer_from_config

        model = TrainingModel.from_config(forward, train)
        optimiser = optimizer_from_config(network, train)
        grad_accum, precision = train.grad_accum, train.precision
    runner = TorchRunner(model.to(device), optimiser, grad_accum, precision, device)
    images, labels = synthetic_batch(cfg.batch, res, cfg.num_classes)

    def step() -> None:
        runner.step(images, labels)

    return Workload(cfg, res, step, {"params": params}, sync=device_sync(cfg))


def ipu_training_workload(cfg: BenchConfig, network: Any, res: int) -> Workload:
    """The plain step through poptorch: poptorch.trainingModel over TrainingModel (poptorch's default
    options: one IPU, one device iteration) with poptorch's SGD: the throughput poptorch delivers."""
    from ipu_effnet.training.model import TrainingModel

    poptorch = import_poptorch()
    params = sum(p.numel() for p in network.parameters())
    model = TrainingModel(network, channels_last=cfg.channels_last)
    model.mark_loss = functools.partial(poptorch.identity_loss, reduction="none")
    optimiser = poptorch.optim.SGD(model.parameters(), lr=PLAIN_SGD["lr"], momentum=PLAIN_SGD["momentum"])
    executor = poptorch.trainingModel(model, optimizer=optimiser)
    images, labels = synthetic_batch(cfg.batch, res, cfg.num_classes)
    return Workload(cfg, res, lambda: executor(images, labels), {"params": params})
