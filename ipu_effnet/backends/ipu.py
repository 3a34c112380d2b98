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
runs in `validate_ipu_config` (backends/ipu_layout.py) before anything is compiled, and raises `UsageError`.

Mixup and cutmix coefficients are drawn on the host (their sampling does not compile for the IPU) and
passed in as inputs: per-sample mixup coefficients split with the images; one cutmix box per micro-batch,
shaped (micro-batches, 4) so that poptorch hands each micro-batch its own (1, 4) row.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ipu_effnet.backends.ipu_layout import IPU_PRECISIONS, IpuLayout, check_recipes, validate_ipu_config
from ipu_effnet.backends.ipu_runner import IpuRunner, create_data_loader
from ipu_effnet.errors import UsageError
from ipu_effnet.pipeline.splits import resolve_module_paths, stage_starts

__all__ = [
    "IPU_PRECISIONS",
    "IpuLayout",
    "IpuRunner",
    "check_recipes",
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


def prepare_ipu(training_model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                log: Optional[Callable[[str], None]] = None, num_samples: Optional[int] = None) -> IpuRunner:
    """Validate, build options, convert the model, wrap it with poptorch.trainingModel; nothing compiles
    until the first step (or `runner.compile`)."""
    say = log or (lambda _msg: None)
    poptorch = import_poptorch()
    popdist = import_popdist()
    instances = popdist.getNumInstances() if popdist is not None else 1
    instance = popdist.getInstanceIndex() if popdist is not None else 0
    layout = validate_ipu_config(cfg, training_model.model, instances=instances, num_samples=num_samples)
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
