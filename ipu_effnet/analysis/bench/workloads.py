"""The workloads, one factory per mode (`WORKLOADS`): train (`step.py`), infer, data (`data.py`). Each
builds its model or loader, inputs and `step()` once; `measure` (timing.py) times them."""

from __future__ import annotations

from typing import Callable, Dict

from ipu_effnet.analysis.bench.build import (
    autocast,
    build_model,
    device_sync,
    float_images,
    import_poptorch,
    maybe_compile,
    torch_device,
)
from ipu_effnet.analysis.bench.config import BenchConfig
from ipu_effnet.analysis.bench.data import data_workload
from ipu_effnet.analysis.bench.step import ipu_training_workload, training_workload
from ipu_effnet.analysis.bench.timing import Workload


def train_workload(cfg: BenchConfig) -> Workload:
    """The plain training step (`step.training_workload`) of the configuration's network, ours or the
    geffnet peer, so that both run the identical TrainingModel step."""
    model, res = build_model(cfg)
    if cfg.device == "ipu":
        return ipu_training_workload(cfg, model, res)
    return training_workload(cfg, model, res)


def inference_model(model, cfg: BenchConfig):
    """The eval-mode model inference runs: ours with BatchNorm folded into the convolutions and Proxy
    Norm's statistics frozen (`models.fold.inference_copy`, a copy: `model` is left as it is) unless
    fold_bn=False (then `model` itself, in eval mode)."""
    if cfg.fold_bn and cfg.impl == "ours":
        from ipu_effnet.models.fold import inference_copy

        return inference_copy(model)
    return model.eval()


def inference_workload(cfg: BenchConfig, network, res: int) -> Workload:
    """Forward passes of `network` at `res` px over `cfg.batch` random images, eval mode, under
    torch.no_grad(): `inference_model` of it, on cfg.device in cfg's memory format. compare times its
    recipes' networks with this, as `training_workload` times their training step."""
    import torch

    images = float_images(cfg, res)
    params = sum(p.numel() for p in network.parameters())
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = inference_model(network, cfg)
    if cfg.device != "ipu":
        model = model.to(device=torch_device(cfg), memory_format=memory_format)
    info = {"params": params, "params_run": sum(p.numel() for p in model.parameters())}
    if cfg.device == "ipu":
        poptorch = import_poptorch()
        executor = poptorch.inferenceModel(model)
        return Workload(cfg, res, lambda: executor(images), info)
    forward = maybe_compile(model, cfg)

    def step() -> None:
        with torch.no_grad(), autocast(cfg):
            forward(images)

    return Workload(cfg, res, step, info, sync=device_sync(cfg))


def infer_workload(cfg: BenchConfig) -> Workload:
    """Forward only, eval mode, under torch.no_grad() (models.fold.inference_copy unless fold_bn=False)."""
    model, res = build_model(cfg)
    return inference_workload(cfg, model, res)


WORKLOADS: Dict[str, Callable[[BenchConfig], Workload]] = {
    "train": train_workload,
    "infer": infer_workload,
    "data": data_workload,
}


def build_workload(cfg: BenchConfig) -> Workload:
    return WORKLOADS[cfg.validate().mode](cfg)
