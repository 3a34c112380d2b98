"""Building what a workload runs: the network (ours or the geffnet peer), its device and memory format,
the inference input, autocast, torch.compile, poptorch, and torch's thread count."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from ipu_effnet.analysis.bench.config import GEFFNET_INSTALL, BenchConfig
from ipu_effnet.errors import UsageError


def geffnet_model(cfg: BenchConfig):
    """geffnet's model of the same name, with our variant's dropout and drop-path rates (geffnet's
    defaults are 0 for both), so that both networks do the same work."""
    try:
        import geffnet
    except ImportError:
        raise UsageError(f"impl geffnet needs the benchmark-only peer geffnet, which is not installed: "
                         f"{GEFFNET_INSTALL} (see requirements-bench.txt)") from None
    from ipu_effnet.models.factory import get_model_def

    mdef = get_model_def(cfg.model)
    return geffnet.create_model(cfg.model, num_classes=cfg.num_classes, drop_rate=mdef.drop_rate,
                                drop_connect_rate=0.2)


def build_model(cfg: BenchConfig) -> Tuple[Any, int]:
    """The configuration's network (seeded weights, Proxy Norm's implementation as asked) on its device
    and in its memory format, and the resolution it runs at."""
    import torch

    from ipu_effnet.models import create_model

    torch.manual_seed(0)  # same weights for A and B where their shapes agree
    if cfg.impl == "geffnet":
        model = geffnet_model(cfg)
    else:
        try:
            model = create_model(cfg.model, num_classes=cfg.num_classes, norm=cfg.norm,
                                 group_size=cfg.group_size, expand_ratio=cfg.expand_ratio)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if cfg.proxy_impl is not None:
        from norms.proxy import ProxyNormAct
        from norms.proxy_ops import check_impl

        for module in model.modules():
            if isinstance(module, ProxyNormAct):
                try:
                    module.impl = check_impl(cfg.proxy_impl, module.act)
                except ValueError as exc:
                    raise UsageError(f"proxy_impl {cfg.proxy_impl!r}: {exc}") from None
    from ipu_effnet.models.factory import native_resolution

    res = cfg.res or getattr(model, "train_resolution", None) or native_resolution(cfg.model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=torch_device(cfg), memory_format=memory_format)
    return model, res


def float_images(cfg: BenchConfig, res: int):
    """The inference input: a random float batch of `batch` x 3 x res x res on the device, in the
    configuration's memory format (the training step takes uint8 host batches instead, `step.py`)."""
    import torch

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.randn(cfg.batch, 3, res, res).to(torch_device(cfg))
    return images.contiguous(memory_format=memory_format)


def torch_device(cfg: BenchConfig):
    import torch

    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        return torch.device("cuda")
    return torch.device("cpu")  # the IPU path converts a CPU model


def autocast(cfg: BenchConfig):
    """A context for one step: autocast to bf16/fp16, or nothing for fp32 (and on the IPU, where
    poptorch takes the precision from the model)."""
    import contextlib

    import torch

    if cfg.precision == "fp32" or cfg.device == "ipu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=cfg.device, dtype=dtype)


def device_sync(cfg: BenchConfig) -> Callable[[], None]:
    if cfg.device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def maybe_compile(model, cfg: BenchConfig):
    if not cfg.compile:
        return model
    import torch

    if not hasattr(torch, "compile"):
        raise UsageError(f"compile: torch {torch.__version__} has no torch.compile (needs torch >= 2.0)")
    return torch.compile(model)


def import_poptorch() -> Any:
    from ipu_effnet.backends import ipu

    return ipu.import_poptorch()


def set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
