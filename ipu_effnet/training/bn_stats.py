"""BatchNorm statistics recomputed for a given set of weights (SWA's `update_bn`), for weight averages.

An average of per-epoch (or per-step) weights is a network nobody trained: the averaged BatchNorm
running means and variances are averages of statistics that belonged to other weights, and do not
describe the activations of the averaged ones (in the quickstart the BN recipe's average scored ~40 %
top-1 with them while its final weights scored ~97 %). `recalibrate_batchnorm` replaces them with the
statistics of the averaged network itself:

1. every BatchNorm module (torch's `_BatchNorm`, which includes `norms.BatchNormAct2d`) that is not in a
   skipped (frozen) subtree gets its running statistics reset and `momentum = None`, so that PyTorch
   keeps the cumulative average over the batches (running_mean = mean of the per-batch means,
   running_var = mean of the per-batch unbiased variances: what training's running average
   estimates, per batch of the size training normalised over);
2. the network runs `num_batches` micro-batches under no_grad with only those BatchNorm modules in
   train mode: everything else is in eval mode, so dropout and stochastic depth are off and the pass is
   deterministic. (During training the statistics were gathered with dropout and drop-path on; dropout
   sits after the last norm and drop-path rescales what it keeps, so the statistics move little, but
   they are not bit-identical to a pass with those on.) Modules in a skipped subtree, the frozen layers
   of a fine-tune, keep their statistics: they did not change during the phase, so their average is exact;
3. over several processes (DDP ranks, each with its own shard) the per-process means and variances are
   combined through the run's host collectives (`all_reduce_sum_tensor`), weighted by batches, so
   every process ends with the statistics one process would have computed over all the batches;
4. momentum, num_batches_tracked and every module's train/eval mode are restored: only running_mean
   and running_var change.

A network without BatchNorm (GroupNorm, LayerNorm, Proxy Norm: batch-independent) is left alone and
runs no forward pass. The training loop calls this through `averaging.recalibrate_average` with the
phase's training loader (see `TrainConfig.bn_recalibration_batches` in config/schema.py for why training
images and the training transform).

    n_images = recalibrate_batchnorm(net, loader, num_batches=100, forward=training_model)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_modules", "has_batchnorm", "recalibrate_batchnorm", "running_stats"]


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def batchnorm_modules(model: nn.Module, skip: Sequence[str] = ()) -> List[Tuple[str, _BatchNorm]]:
    """(name, module) of every BatchNorm that tracks running statistics, outside the `skip` subtrees."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and not _skipped(name, skip)]


def has_batchnorm(model: nn.Module, skip: Sequence[str] = ()) -> bool:
    return bool(batchnorm_modules(model, skip))


def running_stats(model: nn.Module, skip: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """`{"<module>.running_mean": ..., "<module>.running_var": ...}` of the recalibrated modules (copies),
    keyed as in the model's state dict."""
    out: Dict[str, torch.Tensor] = {}
    for name, m in batchnorm_modules(model, skip):
        prefix = f"{name}." if name else ""
        out[prefix + "running_mean"] = m.running_mean.detach().clone()
        out[prefix + "running_var"] = m.running_var.detach().clone()
    return out


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int, *,
                          forward: Optional[Callable[[torch.Tensor], Any]] = None,
                          device: Optional[torch.device] = None, micro_batch: Optional[int] = None,
                          autocast: Optional[torch.dtype] = None, skip: Sequence[str] = (),
                          collectives: Any = None) -> int:
    """Recompute the running statistics of `model`'s BatchNorm modules over up to `num_batches` batches
    (see the module docstring); returns the number of images this process ran (0: nothing to do).

    batches: an iterable of image tensors or (images, labels) pairs (a training loader); each is cut into
    micro-batches of `micro_batch` images (None: as it comes), and each micro-batch counts as one batch.
    forward: what runs a batch (default `model`), e.g. the TrainingModel that normalises uint8 images;
    it is called without labels and, when it is a module, in eval mode. skip: module-name prefixes whose
    BatchNorm keeps its statistics (frozen layers). collectives: the run's host collectives (None: one
    process).
    """
    targets = [m for _, m in batchnorm_modules(model, skip)]
    if not targets or num_batches <= 0:
        return 0
    run = forward if forward is not None else model
    modules = list(model.modules()) + (list(run.modules()) if isinstance(run, nn.Module) else [])
    modes = [(m, m.training) for m in modules]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in targets]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in targets]
    images_seen, done = 0, 0
    try:
        if isinstance(run, nn.Module):
            run.eval()
        model.eval()
        for m in targets:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: 1 / num_batches_tracked per batch
            m.train()
        ctx = torch.autocast(device_type=device.type, dtype=autocast) if autocast is not None and device else None
        for batch in batches:
            images = _images(batch)
            size = micro_batch or images.shape[0]
            for start in range(0, images.shape[0], size):
                if done >= num_batches:
                    break
                chunk = images[start:start + size]
                if chunk.shape[0] < 2:  # one image gives no unbiased variance
                    continue
                if device is not None:
                    chunk = chunk.to(device)
                if ctx is not None:
                    with ctx:
                        run(chunk)
                else:
                    run(chunk)
                done += 1
                images_seen += int(chunk.shape[0])
            if done >= num_batches:
                break
        if collectives is not None and getattr(collectives, "size", 1) > 1:
            _combine(targets, collectives)
        elif done == 0:
            raise ValueError("BatchNorm recalibration saw no batch of two or more images")
    except BaseException:
        for (m, momentum, tracked), (mean, var) in zip(saved, before):  # never leave reset statistics behind
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for m, mode in modes:
            m.training = mode
    for m, momentum, tracked in saved:
        m.momentum = momentum
        m.num_batches_tracked.copy_(tracked)
    return images_seen


def _combine(targets: List[_BatchNorm], collectives: Any) -> None:
    """Batch-weighted average of every process's statistics, written into each module (all processes)."""
    parts = []
    for m in targets:
        n = m.num_batches_tracked.to(torch.float64).reshape(1)
        parts += [n, n * m.running_mean.to(torch.float64), n * m.running_var.to(torch.float64)]
    total = collectives.all_reduce_sum_tensor(torch.cat([p.cpu() for p in parts]))
    offset = 0
    for m in targets:
        c = m.running_mean.numel()
        n = float(total[offset])
        if n <= 0:
            raise ValueError("BatchNorm recalibration saw no batch on any process")
        m.running_mean.copy_((total[offset + 1:offset + 1 + c] / n).to(m.running_mean))
        m.running_var.copy_((total[offset + 1 + c:offset + 1 + 2 * c] / n).to(m.running_var))
        m.num_batches_tracked.fill_(int(n))
        offset += 1 + 2 * c

