"""The IPU backend's checks and batch layout, before any compilation and without poptorch: how one
training call's images spread over micro-batches, device iterations, replicas and poprun instances, and
every rule about a recipe that a person can act on (precision, batch rule, pipeline depth, module
paths, replica counts), each raising `UsageError`. backends/ipu.py builds the programs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ipu_effnet.errors import UsageError
from ipu_effnet.pipeline.splits import resolve_module_paths, stage_starts

# train.precision -> (network dtype, partials dtype). bf16 has no IPU equivalent.
IPU_PRECISIONS: Dict[str, Tuple[torch.dtype, torch.dtype]] = {
    "32.32": (torch.float32, torch.float32),
    "16.32": (torch.float16, torch.float32),
    "16.16": (torch.float16, torch.float16),
}


@dataclass(frozen=True)
class IpuLayout:
    """How one training step's images are spread over micro-batches, iterations, replicas and instances."""

    micro_batch: int
    grad_accum: int
    device_iterations: int
    replicas: int  # in total, over every poprun instance
    ipus_per_replica: int
    instances: int = 1

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.instances

    @property
    def micro_batches(self) -> int:
        """Micro-batches in one call of the compiled program on this instance."""
        return self.device_iterations * self.grad_accum * self.local_replicas

    @property
    def host_batch(self) -> int:
        """Images per call on this instance: micro-batch x device iterations x local replicas x accumulation."""
        return self.micro_batch * self.micro_batches

    @property
    def global_batch(self) -> int:
        """Images per optimiser step over every replica: micro-batch x accumulation x replicas."""
        return self.micro_batch * self.grad_accum * self.replicas

    @property
    def inference_device_iterations(self) -> int:
        return max(self.device_iterations, self.ipus_per_replica)

    @property
    def eval_host_batch(self) -> int:
        return self.micro_batch * self.inference_device_iterations * self.local_replicas

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x device iterations {self.device_iterations} x replicas "
                f"{self.local_replicas}{' (of ' + str(self.replicas) + ')' if self.instances > 1 else ''} x "
                f"gradient accumulation {self.grad_accum} = {self.host_batch} images per call")


def _section_layouts(cfg: Any, instances: int) -> List[Tuple[str, IpuLayout]]:
    """(section, layout) for the train section and the finetune section (its batch falls back on train's):
    a fine-tune, whether a recipe's second phase or the `finetune` command, is checked before the first
    phase compiles, without asking which recipe this is."""
    ipu, train, ft = cfg.ipu, cfg.train, cfg.finetune
    return [(name, IpuLayout(micro, accum, ipu.device_iterations, ipu.replicas, ipu.ipus_per_replica, instances))
            for name, micro, accum in (("train", train.micro_batch, train.grad_accum),
                                       ("finetune", ft.micro_batch or train.micro_batch,
                                        ft.grad_accum or train.grad_accum))]


def validate_ipu_config(cfg: Any, model: Optional[nn.Module] = None, instances: int = 1,
                        num_samples: Optional[int] = None) -> IpuLayout:
    """Check everything about `cfg` that the IPU backend needs, before any compilation (the train and the
    finetune sections' batches both); return the layout of the train section, the one this config trains.

    model:       the network as built (a `meta` one will do): pipeline splits and recomputation points
                 must name its modules, splits in forward order
    instances:   poprun instances (popdist.getNumInstances()); replicas must divide among them
    num_samples: training images per instance, when known: one call must not need more
    """
    ipu, train = cfg.ipu, cfg.train
    if train.precision not in IPU_PRECISIONS:
        raise UsageError(f"train.precision = {train.precision!r} has no IPU equivalent; use one of "
                         f"{', '.join(map(repr, IPU_PRECISIONS))} (weights.partials)")
    if instances < 1 or ipu.replicas % instances:
        raise UsageError(f"ipu.replicas = {ipu.replicas} does not divide among {instances} poprun instances; "
                         "make --num-replicas a multiple of --num-instances")
    stages = ipu.ipus_per_replica
    if stages > 1 and not ipu.pipeline_splits:
        raise UsageError(f"ipu.ipus_per_replica = {stages} needs ipu.pipeline_splits: {stages - 1} module "
                         "path(s), each the first module of the next stage (e.g. [blocks.3.0])")
    if ipu.pipeline_splits and len(ipu.pipeline_splits) != stages - 1:
        raise UsageError(f"ipu.pipeline_splits = {ipu.pipeline_splits!r} makes {len(ipu.pipeline_splits) + 1} "
                         f"stages but ipu.ipus_per_replica = {stages}")
    if len(ipu.available_memory_proportion) not in (1, stages):
        raise UsageError(f"ipu.available_memory_proportion = {ipu.available_memory_proportion!r} needs one "
                         f"value, or one per IPU ({stages})")
    if ipu.replicated_tensor_sharding and ipu.replicas < 2:
        raise UsageError("ipu.replicated_tensor_sharding = true shards optimiser state across replicas: "
                         f"it needs ipu.replicas >= 2 (got {ipu.replicas})")
    if ipu.compile_only and not ipu.executable_cache:
        raise UsageError("ipu.compile_only = true compiles into the executable cache: set ipu.executable_cache "
                         "(e.g. --set ipu.executable_cache=ipu_cache)")
    if ipu.compile_only and ipu.ipu_model:
        raise UsageError("ipu.compile_only targets an offline Mk2 IPU, which cannot be combined with "
                         "ipu.ipu_model = true; drop one of them")
    layouts = dict(_section_layouts(cfg, instances))
    for key, layout in layouts.items():
        # A pipeline of S stages in training has 2S - 1 forward and backward stages in flight: poptorch
        # needs at least that many micro-batches per optimiser step to fill it.
        depth = 2 * stages - 1
        if stages > 1 and layout.grad_accum < depth:
            raise UsageError(f"{key}.grad_accum = {layout.grad_accum}: a pipeline over ipu.ipus_per_replica = "
                             f"{stages} IPUs needs gradient accumulation >= {depth} (2 x stages - 1); "
                             f"raise {key}.grad_accum and lower {key}.micro_batch to keep the global batch")
        if num_samples is not None and layout.host_batch > num_samples:
            raise UsageError(f"{key}: one IPU call takes {layout.describe()}, but there are only "
                             f"{num_samples} training images per instance; lower {key}.micro_batch, "
                             f"{key}.grad_accum, ipu.device_iterations or ipu.replicas")
    if model is not None:
        stage_starts(model, ipu.pipeline_splits, "ipu.pipeline_splits")
        resolve_module_paths(model, ipu.recompute, "ipu.recompute")
        if cfg.finetune.first_trainable:
            resolve_module_paths(model, [cfg.finetune.first_trainable], "finetune.first_trainable")
    return layouts["train"]


def check_recipes(paths: Sequence[str]) -> List[IpuLayout]:
    """Validate IPU recipes without poptorch: load, build the model on `meta`, check the layout."""
    from ipu_effnet.config import load, model_kwargs
    from ipu_effnet.models import create_model

    layouts = []
    for path in paths:
        cfg = load(path)
        name, kwargs = model_kwargs(cfg)
        with torch.device("meta"):
            model = create_model(name, **kwargs)
        layouts.append(validate_ipu_config(cfg, model))
    return layouts
