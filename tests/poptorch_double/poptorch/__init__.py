"""Test double of poptorch (see ../README.md). Records calls in `CALLS`; runs models eagerly on the CPU."""

import enum
from typing import Any, Dict, List, Tuple

import torch
import torch.utils.data

from . import optim  # noqa: F401  (poptorch.optim.RMSprop / SGD / AdamW)

__version__ = "3.4.0+double"

CALLS: List[Tuple[Any, ...]] = []  # ("BeginBlock", user_id, ipu_id), ("recomputationCheckpoint", shape), ...
STAGE_TRACE: List[int] = []  # ipu ids in the order their BeginBlock modules ran
HARDWARE_AVAILABLE = {"value": True}


def reset(hardware: bool = True) -> None:
    CALLS.clear()
    STAGE_TRACE.clear()
    HARDWARE_AVAILABLE["value"] = hardware


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


def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    CALLS.append(("ipuHardwareIsAvailable", num_ipus))
    return HARDWARE_AVAILABLE["value"]


def BeginBlock(layer_to_call: torch.nn.Module, user_id: Any = None, ipu_id: Any = None) -> torch.nn.Module:
    CALLS.append(("BeginBlock", user_id, ipu_id))
    layer_to_call.register_forward_pre_hook(lambda _m, _inputs: STAGE_TRACE.append(ipu_id))
    layer_to_call.double_begin_block = (user_id, ipu_id)
    return layer_to_call


def recomputationCheckpoint(*tensors: torch.Tensor) -> Any:
    CALLS.append(("recomputationCheckpoint", tuple(tuple(t.shape) for t in tensors)))
    return tensors[0] if len(tensors) == 1 else tensors


def identity_loss(x: torch.Tensor, reduction: str) -> torch.Tensor:
    CALLS.append(("identity_loss", reduction, x.dtype))
    if reduction == "none":
        return x
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    raise ValueError(f"reduction {reduction!r}")


class _Executor:
    """What trainingModel / inferenceModel return: runs the model on micro-batches of the host batch."""

    def __init__(self, model: torch.nn.Module, options: Options, optimizer: Any, training: bool) -> None:
        self.model = model
        self.options = options if options is not None else Options()
        self.optimizer = optimizer
        self.training = training
        self.calls: List[Tuple[Any, ...]] = []
        self.set_optimizer_calls: List[List[float]] = []
        self.attached = False
        self.compiled = False
        self._device_lrs = self._lrs(optimizer) if optimizer is not None else []

    @staticmethod
    def _lrs(optimizer: Any) -> List[float]:
        return [float(g["lr"]) for g in optimizer.param_groups]

    def _split(self, args: Tuple[torch.Tensor, ...], pieces: int) -> List[Tuple[torch.Tensor, ...]]:
        for a in args:
            if a.shape[0] % pieces:
                raise RuntimeError(f"input of {a.shape[0]} rows does not split into {pieces} micro-batches")
        return list(zip(*[a.chunk(pieces) for a in args]))

    def compile(self, *args: torch.Tensor) -> None:
        self.calls.append(("compile", tuple(tuple(a.shape) for a in args)))
        self.compiled = True
        self.attached = True

    def setOptimizer(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._device_lrs = self._lrs(optimizer)
        self.set_optimizer_calls.append(list(self._device_lrs))

    def copyWeightsToHost(self) -> None:
        self.calls.append(("copyWeightsToHost",))

    def copyWeightsToDevice(self) -> None:
        self.calls.append(("copyWeightsToDevice",))

    def isAttachedToDevice(self) -> bool:
        return self.attached

    def detachFromDevice(self) -> None:
        assert self.attached, "not attached"
        self.attached = False

    def attachToDevice(self) -> None:
        self.attached = True

    def __call__(self, *args: torch.Tensor) -> Any:
        self.compiled = self.attached = True
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
            for it in range(o.device_iterations):
                self.optimizer.zero_grad()
                for m in micro[it * per_iteration:(it + 1) * per_iteration]:
                    result = self.model(*m)  # the loss alone, or (loss, other outputs...)
                    loss = result[0] if isinstance(result, tuple) else result
                    scale = 1.0 / per_iteration if o.reduction == ReductionType.Mean else 1.0
                    (loss.float() * scale).backward()
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
    return _Executor(model, options, optimizer, training=True)


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
