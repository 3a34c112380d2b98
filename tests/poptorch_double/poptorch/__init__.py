"""Test double of poptorch 3.4 (see ../README.md). Records calls in `CALLS`; runs models eagerly on the CPU.

What it models, because real poptorch fails there and an eager CPU run would not:

- device ownership: an attached program holds its IPUs (local replicas x IPUs per replica). A call on a
  detached program re-attaches it; attaching (or compiling, which attaches) fails with "Failed to
  acquire N IPU(s)" when other attached programs leave too few IPUs. The pool has as many IPUs as the
  first program to attach needs (a poprun partition sized for the run) unless `reset(ipus=...)` says
  otherwise. The IPU Model (`Options.useIpuModel(True)`) never fails to attach, as with real poptorch.
- separate device weights: a program works on its own copy of the parameters and buffers, taken from
  the host at attach and `copyWeightsToDevice`; the host model sees the training program's copy only
  after `copyWeightsToHost`, a `detachFromDevice` or `destroy()`. (Real poptorch also copies back
  implicitly when a wrapped tensor is touched on the host; the double does not, so a missing sync
  shows up as stale weights.)
- `Options.randomSeed(s)` calls `torch.manual_seed(s)`; each program has its own device RNG (it drives
  dropout and stochastic depth in the double), readable and settable through `executor.rng_state` once
  compiled.
- the input signature (argument count, dtypes, shapes) and the module graph (structure, dropout rates)
  freeze at the first call or `compile()`; a later call that differs raises.
- `useOfflineIpuTarget`: calling the executor or attaching raises; `compile()` works and, with
  `enableExecutableCaching`, writes an executable file into the cache directory.
- after `trainingModel`, parameters are a `torch.nn.Parameter` subclass and buffers a `torch.Tensor`
  subclass whose `detach()` keeps the subclass (poptorch's PoptorchParameter / PoptorchBuffer);
  `destroy()` unwraps them; wrapping a wrapped model again raises.
- each training micro-batch's forward must mark exactly one loss with `identity_loss`; a second
  `BeginBlock` on one module raises.
"""

import enum
import hashlib
import os
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.utils.data

from . import optim  # noqa: F401  (poptorch.optim.RMSprop / SGD / AdamW)

__version__ = "3.4.0+double"

CALLS: List[Tuple[Any, ...]] = []  # ("BeginBlock", user_id, ipu_id), ("recomputationCheckpoint", shape), ...
STAGE_TRACE: List[int] = []  # ipu ids in the order their BeginBlock modules ran
HARDWARE_AVAILABLE = {"value": True}
_POOL: Dict[str, Any] = {"size": None, "holders": set()}  # IPUs of this process and who holds them
_LOSSES = {"count": 0}  # identity_loss calls during the current micro-batch
PROGRAMS: List["_Executor"] = []  # every trainingModel / inferenceModel made since the last reset()
# POPTORCH_DOUBLE_TRACE=DIR: each process appends "training" / "inference" per program call to
# DIR/<pid>.log (tests across processes compare how many calls each instance made)
TRACE_ENV = "POPTORCH_DOUBLE_TRACE"


def reset(hardware: bool = True, ipus: Optional[int] = None) -> None:
    """Forget every call and program. hardware: whether IPUs are attached (else only the IPU Model
    works); ipus: IPUs in the pool (None: as many as the first program to attach needs)."""
    CALLS.clear()
    STAGE_TRACE.clear()
    HARDWARE_AVAILABLE["value"] = hardware
    _POOL["size"] = ipus
    _POOL["holders"] = set()
    PROGRAMS.clear()


def attached_programs() -> List["_Executor"]:
    """The programs that hold IPUs now (tests assert on this)."""
    return list(_POOL["holders"])


class ReductionType(enum.Enum):
    Sum = 0
    Mean = 1
    NoReduction = 2


class OutputMode(enum.Enum):
    Final = 0
    All = 1
    Sum = 2
    EveryN = 3
    Default = 4


class DataLoaderMode(enum.Enum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class AutoStage(enum.Enum):
    SameAsIpu = 0
    AutoIncrement = 1


class PipelinedExecution:
    def __init__(self, *args: Any) -> None:
        self.args = args


class TensorLocationSettings:
    def __init__(self) -> None:
        self.settings: Dict[str, Any] = {}

    def useOnChipStorage(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.settings["onChip"] = use
        return self

    def useReplicatedTensorSharding(self, use: bool = True) -> "TensorLocationSettings":
        assert isinstance(use, bool)
        self.settings["useReplicatedTensorSharding"] = use
        return self


class _Section:
    def __init__(self, owner: "Options", name: str) -> None:
        self._owner = owner
        self._name = name

    def _set(self, method: str, *args: Any) -> Any:
        self._owner._set(f"{self._name}.{method}", *args)
        return self


class _Training(_Section):
    def gradientAccumulation(self, n: int) -> Any:
        assert isinstance(n, int) and n >= 1
        self._owner.gradient_accumulation = n
        return self._set("gradientAccumulation", n)

    def accumulationAndReplicationReductionType(self, reduction: ReductionType) -> Any:
        if not isinstance(reduction, ReductionType) or reduction == ReductionType.NoReduction:
            raise ValueError("must be poptorch.ReductionType.Mean or Sum")
        self._owner.reduction = reduction
        return self._set("accumulationAndReplicationReductionType", reduction)

    def setAutomaticLossScaling(self, enabled: bool) -> Any:
        assert isinstance(enabled, bool)
        return self._set("setAutomaticLossScaling", enabled)


class _Precision(_Section):
    def setPartialsType(self, dtype: torch.dtype) -> Any:
        assert dtype in (torch.float16, torch.float32)
        return self._set("setPartialsType", dtype)

    def enableStochasticRounding(self, enabled: bool) -> Any:
        assert isinstance(enabled, bool)
        return self._set("enableStochasticRounding", enabled)


class _TensorLocations(_Section):
    def setOptimizerLocation(self, location: TensorLocationSettings) -> Any:
        assert isinstance(location, TensorLocationSettings)
        return self._set("setOptimizerLocation", dict(location.settings))


class Options:
    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}  # method name -> its (last) argument
        self.replication_factor = 1
        self.device_iterations = 1
        self.gradient_accumulation = 1
        self.reduction = ReductionType.Sum
        self.random_seed: Optional[int] = None
        self.Training = _Training(self, "Training")
        self.Precision = _Precision(self, "Precision")
        self.TensorLocations = _TensorLocations(self, "TensorLocations")

    def _set(self, name: str, *args: Any) -> "Options":
        self.values[name] = args[0] if len(args) == 1 else args
        return self

    def replicationFactor(self, n: int) -> "Options":
        assert isinstance(n, int) and n >= 1
        self.replication_factor = n
        return self._set("replicationFactor", n)

    def deviceIterations(self, n: int) -> "Options":
        assert isinstance(n, int) and n >= 1
        self.device_iterations = n
        return self._set("deviceIterations", n)

    def randomSeed(self, seed: int) -> "Options":
        assert isinstance(seed, int)
        torch.manual_seed(seed)  # as poptorch's options.py does: the host RNG is reseeded too
        self.random_seed = seed
        return self._set("randomSeed", seed)

    def outputMode(self, mode: OutputMode) -> "Options":
        assert isinstance(mode, OutputMode)
        return self._set("outputMode", mode)

    def setAvailableMemoryProportion(self, proportions: Dict[str, float]) -> "Options":
        for key, value in proportions.items():
            assert key.startswith("IPU") and 0 < value <= 1, (key, value)
        return self._set("setAvailableMemoryProportion", dict(proportions))

    def setExecutionStrategy(self, strategy: Any) -> "Options":
        assert isinstance(strategy, PipelinedExecution)
        return self._set("setExecutionStrategy", type(strategy).__name__)

    def enableExecutableCaching(self, path: str) -> "Options":
        assert isinstance(path, str)
        return self._set("enableExecutableCaching", path)

    def enableSyntheticData(self, enabled: bool) -> "Options":
        return self._set("enableSyntheticData", enabled)

    def useOfflineIpuTarget(self, ipu_version: int = 2) -> "Options":
        return self._set("useOfflineIpuTarget", ipu_version)

    def useIpuModel(self, use: bool) -> "Options":
        return self._set("useIpuModel", use)

    def setEngineOptions(self, options: Dict[str, str]) -> "Options":
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()), options
        return self._set("setEngineOptions", dict(options))

    @property
    def offline(self) -> bool:
        return "useOfflineIpuTarget" in self.values

    @property
    def ipu_model(self) -> bool:
        return bool(self.values.get("useIpuModel"))


def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    CALLS.append(("ipuHardwareIsAvailable", num_ipus))
    return HARDWARE_AVAILABLE["value"]


def BeginBlock(layer_to_call: torch.nn.Module, user_id: Any = None, ipu_id: Any = None) -> torch.nn.Module:
    if hasattr(layer_to_call, "double_begin_block"):
        raise RuntimeError(f"BeginBlock: the module {user_id!r} already begins a block "
                           f"(ipu {layer_to_call.double_begin_block[1]})")
    CALLS.append(("BeginBlock", user_id, ipu_id))
    layer_to_call.register_forward_pre_hook(lambda _m, _inputs: STAGE_TRACE.append(ipu_id))
    layer_to_call.double_begin_block = (user_id, ipu_id)
    return layer_to_call


def recomputationCheckpoint(*tensors: torch.Tensor) -> Any:
    CALLS.append(("recomputationCheckpoint", tuple(tuple(t.shape) for t in tensors)))
    return tensors[0] if len(tensors) == 1 else tensors


def identity_loss(x: torch.Tensor, reduction: str) -> torch.Tensor:
    CALLS.append(("identity_loss", reduction, x.dtype))
    _LOSSES["count"] += 1
    if reduction == "none":
        return x
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    raise ValueError(f"reduction {reduction!r}")


# ----------------------------------------------------------------------------------------------------
# Wrapped tensors (poptorch's PoptorchParameter / PoptorchBuffer)


class PoptorchParameter(nn.Parameter):
    __torch_function__ = nn.Parameter.__torch_function__  # torch functions give plain tensors


class PoptorchBuffer(torch.Tensor):
    """torch.Tensor's own __torch_function__: detach(), clone() and friends keep the subclass."""


def _is_wrapped(model: nn.Module) -> bool:
    return any(type(p) is PoptorchParameter for p in model.parameters()) or \
        any(type(b) is PoptorchBuffer for b in model.buffers())


def _wrap(model: nn.Module) -> None:
    for b in model.buffers():
        if type(b) is not torch.Tensor:
            raise RuntimeError("All buffers must be an instance of torch.Tensor")
    for p in model.parameters():
        p.__class__ = PoptorchParameter
    for b in model.buffers():
        b.__class__ = PoptorchBuffer


def _unwrap(model: nn.Module) -> None:
    for p in model.parameters():
        if type(p) is PoptorchParameter:
            p.__class__ = nn.Parameter
    for b in model.buffers():
        if type(b) is PoptorchBuffer:
            b.__class__ = torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Programs


NO_EXECUTABLE_ERR = "Model has not been compiled or has been destroyed."


def _ipus_per_replica(model: nn.Module) -> int:
    ids = [m.double_begin_block[1] for m in model.modules() if hasattr(m, "double_begin_block")]
    return max([int(i) for i in ids if i is not None] + [0]) + 1


def _graph(model: nn.Module) -> Tuple[Any, ...]:
    """What compiling bakes into the program: module structure and dropout rates."""
    return tuple((name, type(m).__name__, getattr(m, "p", None) if isinstance(m, nn.Dropout) else None)
                 for name, m in model.named_modules())


def _signature(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple((a.dtype, tuple(a.shape)) if torch.is_tensor(a) else (type(a).__name__,) for a in args)


class _Executor:
    """What trainingModel / inferenceModel return: runs the model on micro-batches of the host batch."""

    def __init__(self, model: torch.nn.Module, options: Options, optimizer: Any, training: bool) -> None:
        self.model = model
        self.options = options if options is not None else Options()
        self.optimizer = optimizer
        self.training = training
        self.calls: List[Tuple[Any, ...]] = []
        self.set_optimizer_calls: List[List[float]] = []
        self._executable = False
        self._attached = False
        self._signature: Optional[Tuple[Any, ...]] = None
        self._graph: Optional[Tuple[Any, ...]] = None
        self._device: Dict[str, torch.Tensor] = {}  # the device's copy of the weights
        self._dirty_host_weights = False
        self._device_lrs = self._lrs(optimizer) if optimizer is not None else []
        seed = self.options.random_seed if self.options.random_seed is not None else 0
        self._seed = seed
        self._rng = torch.Generator().manual_seed(seed).get_state()
        self.num_ipus = self.options.replication_factor * _ipus_per_replica(model)
        PROGRAMS.append(self)

    # -- state ---------------------------------------------------------------------------------------

    @staticmethod
    def _lrs(optimizer: Any) -> List[float]:
        return [float(g["lr"]) for g in optimizer.param_groups]

    def _host_tensors(self) -> Dict[str, torch.Tensor]:
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def _snapshot(self) -> Dict[str, torch.Tensor]:
        return {name: t.detach().as_subclass(torch.Tensor).clone() for name, t in self._host_tensors().items()}

    @torch.no_grad()
    def _load(self, values: Dict[str, torch.Tensor]) -> None:
        for name, t in self._host_tensors().items():
            if name in values:
                t.copy_(values[name])

    def isCompiled(self) -> bool:
        return self._executable

    def isAttachedToDevice(self) -> bool:
        return self._executable and self._attached

    def _need_compiled(self) -> None:
        if not self._executable:
            raise RuntimeError(NO_EXECUTABLE_ERR)

    def _acquire(self) -> None:
        if self.options.ipu_model:
            self._attached = True
            return
        holders: Set[_Executor] = _POOL["holders"]
        if _POOL["size"] is None:
            _POOL["size"] = self.num_ipus
        in_use = sum(h.num_ipus for h in holders if h is not self)
        if not HARDWARE_AVAILABLE["value"] or in_use + self.num_ipus > _POOL["size"]:
            raise RuntimeError(f"Failed to acquire {self.num_ipus} IPU(s): {in_use} of {_POOL['size']} are "
                               f"held by {len(holders)} other attached program(s)")
        holders.add(self)
        self._attached = True

    def _release(self) -> None:
        _POOL["holders"].discard(self)
        self._attached = False

    def _on_attach(self) -> None:
        self._device = self._snapshot()  # the host's weights go to the device
        self._dirty_host_weights = False

    # -- the API -------------------------------------------------------------------------------------

    def _freeze(self, args: Tuple[Any, ...]) -> None:
        if self._signature is None:
            self._signature = _signature(args)
            self._graph = _graph(self.model)
            return
        got = _signature(args)
        if len(got) != len(self._signature):
            raise RuntimeError(f"Number of positional arguments changed: the program was compiled with "
                               f"{len(self._signature)}, got {len(got)}")
        for i, (want, have) in enumerate(zip(self._signature, got)):
            if want != have:
                raise RuntimeError(f"Argument {i}: the program was compiled for {want}, got {have}")
        if _graph(self.model) != self._graph:
            raise RuntimeError("The model changed (modules or dropout rates) since it was compiled: a "
                               "compiled program keeps the graph it was compiled with")

    def compile(self, *args: torch.Tensor) -> None:
        self._freeze(args)
        if self._executable:
            return  # poptorch logs "Call to compile() ignored"
        self._compile(args)

    def _compile(self, args: Tuple[Any, ...]) -> None:
        self.calls.append(("compile", tuple(tuple(a.shape) for a in args)))
        cache = self.options.values.get("enableExecutableCaching")
        if cache:
            os.makedirs(cache, exist_ok=True)
            key = hashlib.sha1(repr((self.training, self._signature, self._graph)).encode()).hexdigest()[:16]
            with open(os.path.join(cache, f"{key}.popef"), "w", encoding="utf-8") as f:
                f.write("double executable\n")
        self._executable = True
        if not self.options.offline:  # ConnectionType.Always: the device is acquired at compilation
            self._acquire()
            self._on_attach()

    def attachToDevice(self) -> None:
        self._need_compiled()
        assert not self.options.offline, "Trying to attach to an offline device (ConnectionType.Never)"
        if self._attached:
            raise RuntimeError("Device is already attached")
        self._acquire()
        self._on_attach()

    def detachFromDevice(self) -> None:
        self._need_compiled()
        if not self._attached:
            raise RuntimeError("Device is not attached")
        if self.training and self._dirty_host_weights:
            self.copyWeightsToHost()
        self._release()

    def destroy(self) -> None:
        if not self._executable:
            return
        if self._attached:
            if self.training and self._dirty_host_weights:
                self.copyWeightsToHost()
            self._release()
        self._executable = False
        self.calls.append(("destroy",))
        if self.training:
            _unwrap(self.model)

    def copyWeightsToHost(self) -> None:
        self._need_compiled()
        if not self._attached:
            raise RuntimeError("copyWeightsToHost: the device is not attached")
        self.calls.append(("copyWeightsToHost",))
        self._load(self._device)
        self._dirty_host_weights = False

    def copyWeightsToDevice(self) -> None:
        self._need_compiled()
        if not self._attached:
            raise RuntimeError("copyWeightsToDevice: the device is not attached")
        self.calls.append(("copyWeightsToDevice",))
        self._device = self._snapshot()
        self._dirty_host_weights = False

    def setOptimizer(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._device_lrs = self._lrs(optimizer)
        self.set_optimizer_calls.append(list(self._device_lrs))

    @property
    def rng_state(self) -> List[int]:
        self._need_compiled()
        return [self._seed] + [int(v) for v in self._rng.tolist()]

    @rng_state.setter
    def rng_state(self, state: List[int]) -> None:
        self._need_compiled()
        self._seed = int(state[0])
        self._rng = torch.tensor(list(state[1:]), dtype=torch.uint8)

    def _split(self, args: Tuple[torch.Tensor, ...], pieces: int) -> List[Tuple[torch.Tensor, ...]]:
        for a in args:
            if a.shape[0] % pieces:
                raise RuntimeError(f"input of {a.shape[0]} rows does not split into {pieces} micro-batches")
        return list(zip(*[a.chunk(pieces) for a in args]))

    def __call__(self, *args: torch.Tensor) -> Any:
        assert not self.options.offline, ("Trying to run a model on an offline device (ConnectionType.Never): "
                                          "use model.compile(inputs) instead of model(inputs)")
        self._freeze(args)
        if not self._executable:
            self._compile(args)
        if not self._attached:
            self.attachToDevice()
        trace = os.environ.get(TRACE_ENV)
        if trace:
            with open(os.path.join(trace, f"{os.getpid()}.log"), "a", encoding="utf-8") as f:
                f.write("training\n" if self.training else "inference\n")
        host = self._snapshot()
        self._load(self._device)
        wrapped = _is_wrapped(self.model)
        _unwrap(self.model)  # poptorch runs the unwrapped model
        try:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self._rng)
                outputs = self._run(args)
                self._rng = torch.get_rng_state()
            self._device = self._snapshot()
        finally:
            self._load(host)
            if wrapped:
                _wrap(self.model)
        if self.training:
            self._dirty_host_weights = True
        return outputs

    def _run(self, args: Tuple[torch.Tensor, ...]) -> Any:
        o = self.options
        accum = o.gradient_accumulation if self.training else 1
        per_iteration = accum * o.replication_factor
        micro = self._split(args, o.device_iterations * per_iteration)
        outputs = []
        if not self.training:
            self.model.eval()
            with torch.no_grad():
                outputs = [self.model(*m) for m in micro]
        else:
            self.model.train()
            # the device keeps the lr of the last setOptimizer, whatever the host object says now
            host_lrs = self._lrs(self.optimizer)
            for group, lr in zip(self.optimizer.param_groups, self._device_lrs):
                group["lr"] = lr
            scaling = float(getattr(self.optimizer, "poptorch_kwargs", {}).get("loss_scaling", 1.0) or 1.0)
            for it in range(o.device_iterations):
                self.optimizer.zero_grad()
                for m in micro[it * per_iteration:(it + 1) * per_iteration]:
                    _LOSSES["count"] = 0
                    result = self.model(*m)  # the loss alone, or (loss, other outputs...)
                    if _LOSSES["count"] != 1:
                        raise RuntimeError(f"the training model marked {_LOSSES['count']} losses with "
                                           "poptorch.identity_loss; exactly one is needed")
                    loss = result[0] if isinstance(result, tuple) else result
                    scale = 1.0 / per_iteration if o.reduction == ReductionType.Mean else 1.0
                    (loss.float().sum() * scale * scaling).backward()
                    outputs.append(tuple(r.detach() for r in result) if isinstance(result, tuple) else loss.detach())
                self.optimizer.step()
            for group, lr in zip(self.optimizer.param_groups, host_lrs):
                group["lr"] = lr
        if isinstance(outputs[0], tuple):
            losses, logits = zip(*outputs)
            return torch.stack([torch.as_tensor(v).reshape(()) for v in losses]), torch.cat(logits)
        if outputs[0].dim() == 0:  # one loss per micro-batch
            return torch.stack(outputs)
        return torch.cat(outputs)


def trainingModel(model: torch.nn.Module, options: Options = None, optimizer: Any = None) -> _Executor:
    assert optimizer is not None and isinstance(optimizer, optim._Recording), "a poptorch.optim optimiser"
    if _is_wrapped(model):
        raise RuntimeError("Model has already been wrapped in 'poptorch.trainingModel'. Call model.destroy() "
                           "on the model to unwrap before wrapping again.")
    executor = _Executor(model, options, optimizer, training=True)
    _wrap(model)
    return executor


def inferenceModel(model: torch.nn.Module, options: Options = None) -> _Executor:
    return _Executor(model, options, None, training=False)


class DataLoader(torch.utils.data.DataLoader):
    def __init__(self, options: Options, dataset: Any, batch_size: int = 1, shuffle: bool = False,
                 num_workers: int = 0, drop_last: bool = True, persistent_workers: Any = None,
                 mode: DataLoaderMode = DataLoaderMode.Sync, **kwargs: Any) -> None:
        self.poptorch_options = options
        self.mode = mode
        combined = batch_size * options.device_iterations * options.replication_factor * options.gradient_accumulation
        super().__init__(dataset, batch_size=combined, shuffle=shuffle, num_workers=num_workers,
                         drop_last=drop_last, persistent_workers=bool(persistent_workers) and num_workers > 0)
