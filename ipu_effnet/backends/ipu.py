"""The IPU backend: the same `TrainingModel` compiled by poptorch, pipelined over IPUs and replicated.

Written against poptorch's documented programming model (SDK 3.4): the loss is computed
inside `forward` and marked with `poptorch.identity_loss`; `poptorch.trainingModel` runs forward,
backward and the optimiser step as one compiled program; the host batch of one call is
micro-batch x device iterations x local replicas x gradient accumulation; `poptorch.BeginBlock(module,
ipu_id=k)` starts pipeline stage k at a module; optimiser changes reach the device through
`setOptimizer`. poptorch and popdist ship only with the Poplar SDK, so they are imported inside functions.

    runner = prepare_ipu(training_model, optimizer, cfg, log=print)
    metrics = runner.step(images, labels)      # {"loss", "correct", "samples"}, like TorchRunner
    loss, logits = runner.evaluate(images, labels)

How the config maps onto poptorch (Graphcore's EfficientNet configs, graphcore/examples vision/cnns/pytorch):

    ipu.replicas                 Options.replicationFactor (popdist.poptorch.Options under poprun)
    ipu.device_iterations        Options.deviceIterations (inference: at least the number of stages)
    train.grad_accum             Options.Training.gradientAccumulation, mean reduction over
                                 accumulation and replicas (accumulationAndReplicationReductionType)
    train.precision              "16.16": half network, half partials; "16.32": half network, float
                                 partials; "32.32": float. The loss (log-softmax) and the Proxy Norm
                                 statistics stay in fp32 either way; optimiser state is fp32.
    ipu.stochastic_rounding      Options.Precision.enableStochasticRounding
    ipu.loss_scaling             the poptorch optimiser's loss_scaling (half precision only);
    ipu.auto_loss_scaling        Options.Training.setAutomaticLossScaling (loss_scaling is the start)
    ipu.available_memory_proportion   Options.setAvailableMemoryProportion({"IPU0": ..., "IPU1": ...})
    ipu.optimizer_state_offchip, ipu.replicated_tensor_sharding
                                 Options.TensorLocations.setOptimizerLocation(TensorLocationSettings)
    ipu.executable_cache         Options.enableExecutableCaching
    ipu.synthetic_data           Options.enableSyntheticData
    ipu.compile_only             Options.useOfflineIpuTarget (Mk2): compile, write the cache, stop
    ipu.ipu_model                Options.useIpuModel(True); also chosen, with a log line, when poptorch
                                 finds no IPU hardware
    train.seed                   Options.randomSeed
    ipu.pipeline_splits          poptorch.BeginBlock(module, ipu_id=k) at split k-1 (stage k on IPU k)
    ipu.recompute                poptorch.recomputationCheckpoint on each named module's output

Every check a person can act on (precision, batch rule, pipeline depth, module paths, replica counts)
runs in `validate_ipu_config` before anything is compiled, and raises `UsageError`.

Mixup and cutmix coefficients are drawn on the host (their sampling does not compile for the IPU) and
passed in as inputs: per-sample mixup coefficients split with the images; one cutmix box per micro-batch,
shaped (micro-batches, 4) so that poptorch hands each micro-batch its own (1, 4) row.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ipu_effnet.backends.runner import Runner
from ipu_effnet.errors import UsageError
from ipu_effnet.pipeline.splits import resolve_module_paths, stage_starts

__all__ = [
    "IPU_PRECISIONS",
    "IpuLayout",
    "IpuRunner",
    "build_options",
    "create_data_loader",
    "import_poptorch",
    "import_popdist",
    "prepare_ipu",
    "prepare_model",
    "poprun_instance",
    "select_traceable_proxy_norm",
    "to_poptorch_optimizer",
    "validate_ipu_config",
]

# train.precision -> (network dtype, partials dtype). bf16 has no IPU equivalent.
IPU_PRECISIONS: Dict[str, Tuple[torch.dtype, torch.dtype]] = {
    "32.32": (torch.float32, torch.float32),
    "16.32": (torch.float16, torch.float32),
    "16.16": (torch.float16, torch.float16),
}

MK2_IPU_VERSION = 2  # the offline compilation target for compile_only (GC200, IPU-POD)
# Poplar engine options Graphcore's CNN training sets: replicas keep bitwise-identical weights
# (stochastic rounding and other worker state are made deterministic across replicas).
ENGINE_OPTIONS = {"target.deterministicWorkers": "portable"}


def import_poptorch() -> Any:
    """poptorch, or UsageError saying how to get it (it ships only with the Poplar SDK)."""
    try:
        import poptorch
    except ImportError:
        from ipu_effnet.backends import POPTORCH_MISSING

        raise UsageError(POPTORCH_MISSING) from None
    return poptorch


def import_popdist() -> Any:
    """popdist when this process was started by poprun (popdist.isPopdistEnvSet()), else None."""
    try:
        import popdist
        import popdist.poptorch  # noqa: F401  (the Options subclass used under poprun)
    except ImportError:
        if any(k.startswith("POPDIST_") for k in os.environ):
            raise UsageError("started by poprun (POPDIST_* is set) but popdist does not import: "
                             "pip install the popdist wheel of the Poplar SDK") from None
        return None
    if not popdist.isPopdistEnvSet():
        return None
    if not getattr(popdist, "ipu_effnet_initialised", False):  # once per process, first: Graphcore calls
        popdist.init()                                           # it before horovod and any popdist Options
        popdist.ipu_effnet_initialised = True
    return popdist


def poprun_instance() -> Tuple[int, int]:
    """(instance index, number of instances) under poprun, else (0, 1): this process's data shard, and
    whether it is the instance that logs and writes checkpoints (index 0)."""
    popdist = import_popdist()
    if popdist is None:
        return 0, 1
    return int(popdist.getInstanceIndex()), int(popdist.getNumInstances())


# ----------------------------------------------------------------------------------------------------
# Validation: before any compilation, without poptorch


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


def _phase_layouts(cfg: Any, instances: int) -> List[Tuple[str, IpuLayout]]:
    """(phase name, layout) for each training phase of the recipe: 'train', and 'finetune' for halfres."""
    ipu, train = cfg.ipu, cfg.train
    phases = [("train", IpuLayout(train.micro_batch, train.grad_accum, ipu.device_iterations, ipu.replicas,
                                  ipu.ipus_per_replica, instances))]
    if cfg.recipe == "halfres":
        ft = cfg.finetune
        phases.append(("finetune", IpuLayout(ft.micro_batch or train.micro_batch, ft.grad_accum or train.grad_accum,
                                             ipu.device_iterations, ipu.replicas, ipu.ipus_per_replica, instances)))
    return phases


def validate_ipu_config(cfg: Any, model: Optional[nn.Module] = None, instances: int = 1,
                        num_samples: Optional[int] = None, phase: str = "train") -> IpuLayout:
    """Check everything about `cfg` that the IPU backend needs, before any compilation; return the layout
    of `phase` ('train', or 'finetune' for a halfres recipe).

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
    layouts = dict(_phase_layouts(cfg, instances))
    if phase not in layouts:
        raise ValueError(f"phase {phase!r}: the recipe {cfg.recipe!r} has {', '.join(layouts)}")
    for name, layout in layouts.items():
        key = "train" if name == "train" else "finetune"
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
    return layouts[phase]


# ----------------------------------------------------------------------------------------------------
# Options


def _amp_per_ipu(cfg: Any) -> Dict[str, float]:
    amp = list(cfg.ipu.available_memory_proportion)
    if len(amp) == 1:
        amp = amp * cfg.ipu.ipus_per_replica
    return {f"IPU{i}": float(v) for i, v in enumerate(amp)}


def build_options(cfg: Any, poptorch: Any, popdist: Any = None, train: bool = True,
                  log: Optional[Callable[[str], None]] = None) -> Any:
    """poptorch.Options (popdist.poptorch.Options under poprun) for training or inference from `cfg`."""
    say = log or (lambda _msg: None)
    ipu = cfg.ipu
    instances = popdist.getNumInstances() if popdist is not None else 1
    layout = validate_ipu_config(cfg, instances=instances)
    if popdist is not None:
        total = popdist.getNumTotalReplicas()
        if total != ipu.replicas:
            raise UsageError(f"ipu.replicas = {ipu.replicas} but poprun started {total} replicas "
                             f"(--num-replicas); make them agree")
        per_replica = popdist.getNumIpusPerReplica()
        if per_replica != ipu.ipus_per_replica:
            raise UsageError(f"ipu.ipus_per_replica = {ipu.ipus_per_replica} but poprun gives "
                             f"--ipus-per-replica={per_replica}; make them agree")
        opts = popdist.poptorch.Options(ipus_per_replica=ipu.ipus_per_replica)  # sets the local replicas
    else:
        opts = poptorch.Options()
        opts.replicationFactor(ipu.replicas)

    opts.randomSeed(int(cfg.train.seed))
    if train:
        opts.deviceIterations(ipu.device_iterations)
        opts.Training.gradientAccumulation(cfg.train.grad_accum)
        opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
        if ipu.auto_loss_scaling:
            opts.Training.setAutomaticLossScaling(True)
        if ipu.optimizer_state_offchip or ipu.replicated_tensor_sharding:
            where = poptorch.TensorLocationSettings()
            if ipu.optimizer_state_offchip:
                where.useOnChipStorage(False)
            if ipu.replicated_tensor_sharding:
                where.useReplicatedTensorSharding(True)
            opts.TensorLocations.setOptimizerLocation(where)
    else:
        opts.deviceIterations(layout.inference_device_iterations)
    # every micro-batch's loss and logits come back, so accuracy counts every sample
    opts.outputMode(poptorch.OutputMode.All)

    _, partials = IPU_PRECISIONS[cfg.train.precision]
    opts.Precision.setPartialsType(partials)
    opts.Precision.enableStochasticRounding(bool(ipu.stochastic_rounding))
    opts.setAvailableMemoryProportion(_amp_per_ipu(cfg))
    if ipu.ipus_per_replica > 1:
        opts.setExecutionStrategy(poptorch.PipelinedExecution())
    if ipu.executable_cache:
        opts.enableExecutableCaching(str(ipu.executable_cache))
    if ipu.synthetic_data:
        opts.enableSyntheticData(True)

    set_engine_options()
    if ipu.compile_only:
        opts.useOfflineIpuTarget(MK2_IPU_VERSION)
    else:
        needed = ipu.ipus_per_replica * layout.local_replicas
        use_model = bool(ipu.ipu_model)
        if not use_model and needed & (needed - 1):
            raise UsageError(f"this instance needs {ipu.ipus_per_replica} IPU(s) per replica x {layout.local_replicas} "
                             f"local replica(s) = {needed} IPUs, but IPUs are acquired in powers of two; change "
                             "ipu.replicas or ipu.ipus_per_replica (or use ipu.ipu_model = true)")
        if not use_model and not poptorch.ipuHardwareIsAvailable(needed):
            use_model = True
            if train:
                say(f"ipu: no IPU hardware with {needed} IPUs found: using the IPU Model (a simulator; slow)")
        if use_model:
            if layout.local_replicas > 1:
                raise UsageError(f"the IPU Model does not support replication: ipu.replicas = {ipu.replicas}; "
                                 "use --set ipu.replicas=1 on the IPU Model")
            opts.useIpuModel(True)
    return opts


def set_engine_options(environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Add ENGINE_OPTIONS to POPLAR_ENGINE_OPTIONS (JSON; keys already there win), as Graphcore's
    published commands do; returns the resulting options."""
    import json

    env = os.environ if environ is None else environ
    try:
        current = json.loads(env.get("POPLAR_ENGINE_OPTIONS") or "{}")
    except ValueError:
        raise UsageError(f"POPLAR_ENGINE_OPTIONS = {env['POPLAR_ENGINE_OPTIONS']!r} is not a JSON object") from None
    if not isinstance(current, dict):
        raise UsageError(f"POPLAR_ENGINE_OPTIONS = {env['POPLAR_ENGINE_OPTIONS']!r} is not a JSON object")
    merged = {**ENGINE_OPTIONS, **current}
    env["POPLAR_ENGINE_OPTIONS"] = json.dumps(merged)
    return merged


# ----------------------------------------------------------------------------------------------------
# The model


def select_traceable_proxy_norm(module: nn.Module) -> int:
    """Set impl='reference' (plain autograd ops, no custom autograd.Function) on every ProxyNormAct, as
    poptorch differentiates the traced forward itself. Returns how many modules were changed."""
    from norms.proxy import ProxyNormAct

    count = 0
    for m in module.modules():
        if isinstance(m, ProxyNormAct) and m.impl != "reference":
            m.impl = "reference"
            count += 1
    return count


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _recompute_hook(poptorch: Any):
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return poptorch.recomputationCheckpoint(output)
        return output
    return hook


def prepare_model(training_model: nn.Module, cfg: Any, poptorch: Any) -> nn.Module:
    """Make a TrainingModel ready for poptorch, in place: traceable Proxy Norm, the precision's network
    dtype (Proxy Norm statistics and the loss stay fp32), the loss marked with identity_loss, pipeline
    stages started with BeginBlock and recomputation checkpoints on the named modules' outputs."""
    network = training_model.model
    select_traceable_proxy_norm(network)
    dtype, _ = IPU_PRECISIONS[cfg.train.precision]
    if dtype != torch.float32:
        network.to(dtype)  # ProxyNormAct rebuilds its quantile points in fp32 (norms/proxy.py)
    training_model.mark_loss = functools.partial(poptorch.identity_loss, reduction="none")
    if getattr(training_model, "ipu_stages_marked", False):  # a later stage's program: already annotated
        return training_model
    training_model.ipu_stages_marked = True
    for ipu_id, path, module in stage_starts(network, cfg.ipu.pipeline_splits, "ipu.pipeline_splits"):
        _set_submodule(network, path, poptorch.BeginBlock(module, user_id=path, ipu_id=ipu_id))
    for module in resolve_module_paths(network, cfg.ipu.recompute, "ipu.recompute"):
        module.register_forward_hook(_recompute_hook(poptorch))
    return training_model


class HostMixedStep(nn.Module):
    """The module poptorch compiles for training: TrainingModel with host-drawn mixing coefficients.

    forward(images, labels[, mixup_coeffs][, cutmix_boxes]): which extras are passed is fixed when the
    step is built (poptorch compiles one signature); a cutmix box arrives as this micro-batch's (1, 4) row.
    """

    def __init__(self, training_model: nn.Module, mixup: bool, cutmix: bool) -> None:
        super().__init__()
        self.tm = training_model
        self.mixup = bool(mixup)
        self.cutmix = bool(cutmix)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, *mixing: torch.Tensor):
        coeffs = mixing[0] if self.mixup else None
        box = mixing[-1].reshape(4) if self.cutmix else None
        return self.tm(images, labels, coeffs, box)


# ----------------------------------------------------------------------------------------------------
# Optimisers


def to_poptorch_optimizer(optimizer: torch.optim.Optimizer, poptorch: Any, cfg: Any) -> Any:
    """The poptorch.optim twin of a `create_optimizer` optimiser: the same parameter groups (with their
    weight decay), hyperparameters and lr, plus loss scaling and fp32 optimiser state."""
    from ipu_effnet.training.optim import RMSpropTF

    dtype, _ = IPU_PRECISIONS[cfg.train.precision]
    half = dtype == torch.float16
    loss_scaling = float(cfg.ipu.loss_scaling) if (half or cfg.ipu.auto_loss_scaling) else 1.0
    accum_type = torch.float32  # gradient accumulators stay fp32 at every precision, as Graphcore's
    groups = [{"params": list(g["params"]), "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0)}
              for g in optimizer.param_groups]
    d = optimizer.defaults
    if isinstance(optimizer, RMSpropTF):
        return poptorch.optim.RMSprop(groups, lr=d["lr"], alpha=d["alpha"], eps=d["eps"], weight_decay=0.0,
                                      momentum=d["momentum"], loss_scaling=loss_scaling, accum_type=accum_type,
                                      first_order_momentum_accum_type=torch.float32,
                                      second_order_momentum_accum_type=torch.float32, use_tf_variant=True)
    if isinstance(optimizer, torch.optim.SGD):
        return poptorch.optim.SGD(groups, lr=d["lr"], momentum=d["momentum"], nesterov=d["nesterov"],
                                  weight_decay=0.0, loss_scaling=loss_scaling,
                                  velocity_accum_type=torch.float32)
    if isinstance(optimizer, torch.optim.AdamW):
        # poptorch's AdamW decays by 1e-2 unless told otherwise: every group states its own weight_decay
        return poptorch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=0.0,
                                    loss_scaling=loss_scaling, accum_type=accum_type,
                                    first_order_momentum_accum_type=torch.float32,
                                    second_order_momentum_accum_type=torch.float32)
    raise UsageError(f"the IPU backend has no poptorch twin for {type(optimizer).__name__}; "
                     "use train.optimizer = rmsprop_tf, sgd or adamw")


# ----------------------------------------------------------------------------------------------------
# The runner


class IpuRunner(Runner):
    """Training steps of a poptorch.trainingModel and validation through a poptorch.inferenceModel over
    the same TrainingModel; the same `step` contract as TorchRunner.

    Device lifecycle (Graphcore's): both programs need the same IPUs, so exactly one is attached at a
    time. `step` detaches the inference program if it holds the IPUs, and the training program then
    re-attaches (uploading the host weights, which detaching it had brought back). `evaluate_loader`
    detaches the training program (its weights come to the host), runs the inference program (attaching
    uploads the host weights; an attached one gets `copyWeightsToDevice`) and detaches it again at the
    end. `release` destroys both programs at a phase's end, so the next phase gets the IPUs.

    The loop sets the learning rate on the host optimiser (`set_lr`); `step` pushes it to the device with
    `setOptimizer` only when it changed since the last push.
    """

    # A compiled program takes one input signature and keeps its graph (dropout rates, mixing inputs):
    # progressive resizing releases the runner at each stage change and prepares a new one.
    compiled_per_stage = True
    bn_recalibration_note = ("train.bn_recalibration_batches: not done on the ipu backend; the averaged model "
                             "keeps its averaged BatchNorm statistics (evaluate/finetune/sweep --averaged warn "
                             "that they are stale)")  # would need a third program: BN in train mode, no optimiser

    def __init__(self, executor: Any, ipu_optimizer: Any, optimizer: torch.optim.Optimizer,
                 training_model: nn.Module, layout: IpuLayout, poptorch: Any,
                 inference_options: Any = None, instance: int = 0, instances: int = 1,
                 cache_dir: Optional[str] = None) -> None:
        self.executor = executor
        self.ipu_optimizer = ipu_optimizer
        self.optimizer = optimizer
        self.training_model = training_model
        self.layout = layout
        self.poptorch = poptorch
        self.inference_options = inference_options
        self.instance = instance  # for data sharding: rank = instance, world_size = instances
        self.instances = instances
        self.cache_dir = cache_dir
        self._pushed_lrs = self._host_lrs()
        self._inference: Any = None
        self._pending_rng: Optional[List[int]] = None  # a device RNG state to set once compiled
        self._released = False

    @property
    def host_batch(self) -> int:
        return self.layout.host_batch

    @property
    def eval_batch(self) -> int:
        return self.layout.eval_host_batch

    def _host_lrs(self) -> List[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def sync_lr(self) -> bool:
        """Push the host optimiser's learning rates to the device if they changed; True if pushed."""
        lrs = self._host_lrs()
        if lrs == self._pushed_lrs:
            return False
        for group, lr in zip(self.ipu_optimizer.param_groups, lrs):
            group["lr"] = lr
        self.executor.setOptimizer(self.ipu_optimizer)
        self._pushed_lrs = lrs
        return True

    def mixing_inputs(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Host-drawn mixup coefficients (one per image) and cutmix boxes (one row per micro-batch)."""
        tm = self.training_model
        extras = []
        if tm.mixup_alpha > 0:
            extras.append(tm.sample_mixup(images.shape[0]))
        if tm.cutmix:
            height, width = images.shape[-2], images.shape[-1]
            extras.append(torch.stack([tm.sample_cutmix_box(height, width) for _ in range(self.layout.micro_batches)]))
        return extras

    def _check_batch(self, images: torch.Tensor, labels: torch.Tensor, expected: int) -> None:
        if images.shape[0] != expected or labels.shape[0] != expected:
            raise ValueError(f"the IPU program takes host batches of exactly {expected} images "
                             f"({self.layout.describe()}); got {images.shape[0]}")

    def _check_live(self) -> None:
        if self._released:
            raise RuntimeError("the IPU programs were released (release()); prepare a new runner")

    @staticmethod
    def _detach(program: Any) -> None:
        if program is not None and program.isAttachedToDevice():
            program.detachFromDevice()  # a training program copies its weights to the host first

    def _compile_training(self, inputs: Sequence[torch.Tensor]) -> None:
        """Compile the training program (attaching it, online) and give it the pending device RNG state."""
        if not self.executor.isCompiled():
            self.executor.compile(*inputs)
            if self._pending_rng is not None:
                self.executor.rng_state = list(self._pending_rng)
                self._pending_rng = None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        self._check_live()
        self._check_batch(images, labels, self.layout.host_batch)
        self._detach(self._inference)  # the training program re-attaches to the IPUs it frees
        self.sync_lr()
        self.training_model.train()  # evaluate() switches the shared model to eval mode
        inputs = (images, labels, *self.mixing_inputs(images))
        self._compile_training(inputs)
        loss, logits = self.executor(*inputs)
        n = int(labels.shape[0])
        correct = int((logits.detach().float().argmax(-1).reshape(-1) == labels.reshape(-1)).sum())
        return {"loss": float(loss.detach().float().mean()), "correct": correct, "samples": n}

    def _inference_program(self) -> Any:
        if self._inference is None:
            self._inference = self.poptorch.inferenceModel(self.training_model.eval(), self.inference_options)
        return self._inference

    def compile(self, images: torch.Tensor, labels: torch.Tensor,
                eval_images: Optional[torch.Tensor] = None, eval_labels: Optional[torch.Tensor] = None) -> None:
        """Compile (and with ipu.executable_cache, cache) the training program, and the inference program
        when given an evaluation batch, without running either (ipu.compile_only: an offline target)."""
        self._check_live()
        self._check_batch(images, labels, self.layout.host_batch)
        self.training_model.train()
        self._compile_training((images, labels, *self.mixing_inputs(images)))
        if eval_images is not None:
            self._check_batch(eval_images, eval_labels, self.layout.eval_host_batch)
            self._detach(self.executor)
            self.training_model.eval()
            self._inference_program().compile(eval_images, eval_labels)
            self._detach(self._inference)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-micro-batch losses, logits) of a batch of eval_batch images, through poptorch.inferenceModel
        over the same TrainingModel, with the training program detached. Leaves the inference program
        attached (evaluate_loader detaches it at the end)."""
        self._check_live()
        self._check_batch(images, labels, self.layout.eval_host_batch)
        self._detach(self.executor)
        return self._inference_program()(images, labels)

    def evaluate_loader(self, loader: Any,
                        reduce: Optional[Callable[[Dict[str, float]], Dict[str, float]]] = None,
                        batches: Optional[int] = None) -> Dict[str, float]:
        """Top-1, top-5 (fractions), mean plain cross entropy and sample count over `loader`'s batches of
        at most eval_batch images (a short last batch is padded, and the padding not counted), like
        `training.evaluation.evaluate`. Picks up the host model's current weights (e.g. swapped-in averages).
        `reduce` sums the counts over poprun instances (each evaluates its own shard); `batches`: run at
        least this many calls, padding with uncounted batches, so that every instance makes as many
        calls as the one with the longest shard (the replicas of one program run in lockstep)."""
        self._check_live()
        self._detach(self.executor)  # the trained weights come to the host
        if self._inference is not None and self._inference.isAttachedToDevice():
            self._inference.copyWeightsToDevice()  # the host weights may have changed since the last call
        sums = {"correct1": 0.0, "correct5": 0.0, "loss": 0.0, "samples": 0.0}
        size = self.layout.eval_host_batch
        calls = 0
        filler: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        for images, labels in loader:
            n = int(labels.shape[0])
            if n > size:
                raise ValueError(f"evaluation batches must hold at most {size} images, got {n}")
            if n < size:  # pad by repeating the first image: the program takes exactly `size`
                pad = size - n
                images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
                labels = torch.cat([labels, labels[:1].expand(pad)])
            filler = (images, labels)
            _, logits = self.evaluate(images, labels)
            calls += 1
            logits, labels = logits.float()[:n], labels[:n]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels[:, None]
            sums["correct1"] += float(hit[:, 0].sum())
            sums["correct5"] += float(hit.any(1).sum())
            sums["loss"] += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            sums["samples"] += n
        while batches is not None and calls < batches and filler is not None:
            self.evaluate(*filler)  # padding: run, not counted
            calls += 1
        self._detach(self._inference)  # the training program re-attaches at the next step
        if reduce is not None:
            sums = reduce(sums)
        total = max(sums["samples"], 1.0)
        return {"top1": sums["correct1"] / total, "top5": sums["correct5"] / total, "loss": sums["loss"] / total,
                "samples": int(sums["samples"])}

    def optimizer_state(self) -> Dict[str, Any]:
        """The poptorch optimiser's state for a checkpoint: its state_dict, which after a step holds the
        device-side state (momentum, RMSprop accumulators) under "ipu_state" and "ipu_param"."""
        return self.ipu_optimizer.state_dict()

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `optimizer_state` returned (a resumed run); poptorch uploads it with the next call."""
        from ipu_effnet.training.checkpoint import CheckpointError

        if "ipu_state" not in state or "ipu_param" not in state:
            raise CheckpointError("the checkpoint's IPU optimiser state has no 'ipu_state' / 'ipu_param': "
                                  "it was not written by the IPU backend")
        self.ipu_optimizer.load_state_dict(dict(state))  # the object the executor holds: no setOptimizer
        self._pushed_lrs = [float(g["lr"]) for g in self.ipu_optimizer.param_groups]  # what the device gets

    def device_rng_state(self) -> Optional[List[int]]:
        """The training program's RNG seed and state (dropout, stochastic depth and stochastic rounding
        on the device), or the state waiting to be set; None before the first compilation."""
        if self.executor.isCompiled():
            return [int(v) for v in self.executor.rng_state]
        return list(self._pending_rng) if self._pending_rng is not None else None

    def set_device_rng_state(self, state: Optional[Sequence[int]]) -> None:
        """Restore `device_rng_state()` (a resumed run): now if compiled, else right after compiling."""
        if state is None:
            return
        if self.executor.isCompiled():
            self.executor.rng_state = [int(v) for v in state]
        else:
            self._pending_rng = [int(v) for v in state]

    def checkpoint_extra(self) -> Dict[str, Any]:
        """What a checkpoint needs besides the host model: the device optimiser state and the device RNG."""
        return {"ipu_optimizer": self.optimizer_state(), "ipu_rng": self.device_rng_state()}

    def restore_extra(self, extra: Mapping[str, Any]) -> None:
        if extra.get("ipu_optimizer") is not None:
            self.load_optimizer_state(extra["ipu_optimizer"])
        self.set_device_rng_state(extra.get("ipu_rng"))

    def sync_weights_to_host(self) -> None:
        """Bring the trained weights back into the host model (before averaging or a checkpoint)."""
        if self.executor.isAttachedToDevice():
            self.executor.copyWeightsToHost()

    def detach(self) -> None:
        for program in (self.executor, self._inference):
            self._detach(program)

    def release(self) -> None:
        """Destroy both programs (weights and optimiser state come to the host first): the IPUs are free
        for the next phase or stage, and the model's tensors are plain again. Idempotent."""
        if self._released:
            return
        if self._inference is not None:
            self._inference.destroy()
        if self.executor.isCompiled():
            self._pending_rng = self.device_rng_state()
        self.executor.destroy()
        self._released = True


def create_data_loader(options: Any, dataset: Any, micro_batch: int, train: bool, workers: int,
                       poptorch: Any) -> Any:
    """poptorch.DataLoader over `dataset`: host batches of micro-batch x the options' combined factor,
    sharded per poprun instance by poptorch, asynchronous and rebatched when there are workers."""
    mode = poptorch.DataLoaderMode.AsyncRebatched if workers > 0 else poptorch.DataLoaderMode.Sync
    return poptorch.DataLoader(options, dataset, batch_size=micro_batch, shuffle=train, drop_last=train,
                               num_workers=workers, persistent_workers=workers > 0, mode=mode)


def prepare_ipu(training_model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                log: Optional[Callable[[str], None]] = None, num_samples: Optional[int] = None,
                phase: str = "train") -> IpuRunner:
    """Validate, build options, convert the model, wrap it with poptorch.trainingModel; nothing compiles
    until the first step (or `runner.compile`)."""
    say = log or (lambda _msg: None)
    poptorch = import_poptorch()
    popdist = import_popdist()
    instances = popdist.getNumInstances() if popdist is not None else 1
    instance = popdist.getInstanceIndex() if popdist is not None else 0
    layout = validate_ipu_config(cfg, training_model.model, instances=instances, num_samples=num_samples,
                                 phase=phase)
    host_rng = torch.get_rng_state()
    train_opts = build_options(cfg, poptorch, popdist, train=True, log=say)
    infer_opts = build_options(cfg, poptorch, popdist, train=False)
    # Options.randomSeed also reseeds torch's host RNG: put back the caller's state (a resumed run's,
    # restored from its checkpoint, or the running one at a stage change)
    torch.set_rng_state(host_rng)
    prepare_model(training_model, cfg, poptorch)
    ipu_optimizer = to_poptorch_optimizer(optimizer, poptorch, cfg)
    step = HostMixedStep(training_model, training_model.mixup_alpha > 0, training_model.cutmix)
    executor = poptorch.trainingModel(step, options=train_opts, optimizer=ipu_optimizer)
    say(f"ipu: {cfg.ipu.ipus_per_replica} IPU(s) per replica, {layout.describe()}; global batch "
        f"{layout.global_batch}; precision {cfg.train.precision}"
        + (f"; poprun instance {instance + 1}/{instances}" if instances > 1 else ""))
    runner = IpuRunner(executor, ipu_optimizer, optimizer, training_model, layout, poptorch,
                       inference_options=infer_opts, instance=instance, instances=instances,
                       cache_dir=str(cfg.ipu.executable_cache) if cfg.ipu.executable_cache else None)
    runner.compile_only = bool(cfg.ipu.compile_only)
    if cfg.train.precision.startswith("16") and not cfg.ipu.auto_loss_scaling:
        # the configured static scale; poptorch's automatic scaling keeps its current value on the device
        runner.static_loss_scale = cfg.ipu.loss_scaling
    return runner


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
