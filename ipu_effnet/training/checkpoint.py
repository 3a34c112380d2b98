"""Checkpoints that survive a crash and rebuild their own model.

A checkpoint is one `torch.save` file holding plain data only (tensors, dicts, lists, tuples, numbers,
strings, None), so that it loads with `torch.load(..., weights_only=True)` on torch 2.0.1 (the Poplar
SDK's) as on current torch, and loading never runs code from the file:

    format, version        "ipu_effnet.checkpoint", 1
    model                  the network's state dict (not the TrainingModel/DDP wrapper's)
    model_args             the network's constructor arguments (`model.model_args`): rebuilds it (nanoGPT)
    optimizer              optimizer.state_dict()
    epoch, step            schedule position: epochs and optimiser steps completed
    averagers              {name: WeightAverager.state_dict()}, e.g. {"epoch": ..., "ema": ...}, each with
                           its recomputed BatchNorm statistics (bn_stats, bn_stats_at) when it has them
    rng                    python, numpy, torch (and CUDA) generator states, as tensors and numbers
    config                 the resolved config as a plain dict
    extra                  anything else the loop wants back (plain data)
    torch_version, ipu_effnet_version

Writes are atomic: the file is written to a temporary name in the same directory, flushed and fsync'ed,
then renamed over the final name with `os.replace`, and the directory is fsync'ed; a crash at any point
leaves either the previous file or the new one, never half of one (a `.tmp-*` file left by a killed
writer is ignored by name, and removed by the next successful save). Files are named
`ckpt-e<epoch>-s<step>.pt`; `latest_checkpoint` picks the newest one that is a complete archive, and
`save_checkpoint(..., keep=N)` deletes all but the N newest. A truncated or corrupt file, or one that
weights_only loading refuses, raises `CheckpointError` (a ValueError) naming the file; a refused one
raises its subclass `UnsafeCheckpointError`, and nothing in it is run.

    state = make_checkpoint(net, optimizer, epoch=3, step=1200, averagers={"epoch": avg}, config=cfg.to_dict())
    save_checkpoint(run_dir / "checkpoints" / checkpoint_name(3, 1200), state, keep=3)
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    epoch, step = restore_checkpoint(ckpt, net, optimizer, averagers={"epoch": avg})
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import pickle
import random
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ipu_effnet.errors import UsageError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "UnsafeCheckpointError",
    "checkpoint_name",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_checkpoint",
    "plain_state",
    "prune_checkpoints",
    "rebuild_model",
    "restore_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "ipu_effnet.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"

_NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")
_TMP_PREFIX = ".tmp-"

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt, or not plain data."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds more than plain data (pickled objects, possibly code): never loaded, and
    a resume does not fall back past it silently."""


# ----------------------------------------------------------------------------------------------------
# Random number generator states as plain data


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and (when initialised) CUDA generator states, as tensors and numbers.
    The 32-bit Mersenne Twister words are stored as int64 tensors: torch 2.0's weights_only loader
    has no use for numpy arrays or arbitrary Python objects."""
    version, words, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(list(words), dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(bit_generator), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `get_rng_state` returned (CUDA only where both the state and CUDA are there)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------------
# Building and restoring the state


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel and TrainingModel wrappers."""
    from ipu_effnet.training.model import TrainingModel

    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, TrainingModel):
            model = model.model
        else:
            return model


def plain_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A state dict with every tensor a plain torch.Tensor: after poptorch.trainingModel a model's
    buffers are a tensor subclass that survives detach(), which a weights_only load refuses."""
    return {name: value.detach().as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value
            for name, value in state.items()}


def make_checkpoint(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *, epoch: float,
                    step: int, averagers: Optional[Mapping[str, Any]] = None,
                    config: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None,
                    include_rng: bool = True) -> Dict[str, Any]:
    """The checkpoint dict (see the module docstring). `model` may be wrapped (DDP, TrainingModel): the
    network's state and `model_args` are stored. `averagers`: objects with `state_dict()`."""
    from ipu_effnet import __version__

    net = unwrap_model(model)
    model_args = getattr(net, "model_args", None)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": plain_state(net.state_dict()),
        "model_args": copy.deepcopy(dict(model_args)) if model_args is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "step": int(step),
        "averagers": {name: avg.state_dict() for name, avg in (averagers or {}).items()},
        "rng": get_rng_state() if include_rng else None,
        "config": copy.deepcopy(dict(config)) if config is not None else None,
        "extra": copy.deepcopy(dict(extra)) if extra is not None else {},
        "torch_version": str(torch.__version__),
        "ipu_effnet_version": str(__version__),
    }


def restore_checkpoint(checkpoint: Mapping[str, Any], model: nn.Module,
                       optimizer: Optional[torch.optim.Optimizer] = None,
                       averagers: Optional[Mapping[str, Any]] = None,
                       restore_rng: bool = True) -> Tuple[float, int]:
    """Load model, optimiser, averager and RNG states from a loaded checkpoint; returns (epoch, step).
    An averager asked for but absent from the checkpoint is an error (a resumed run would silently
    restart its average otherwise)."""
    unwrap_model(model).load_state_dict(checkpoint["model"])
    if optimizer is not None:
        if checkpoint.get("optimizer") is None:
            raise CheckpointError("the checkpoint holds no optimizer state to resume from")
        optimizer.load_state_dict(checkpoint["optimizer"])
    stored = checkpoint.get("averagers") or {}
    for name, averager in (averagers or {}).items():
        if name not in stored:
            raise CheckpointError(f"the checkpoint holds no averager {name!r} (it has: {sorted(stored) or 'none'})")
        averager.load_state_dict(stored[name])
    if restore_rng and checkpoint.get("rng") is not None:
        set_rng_state(checkpoint["rng"])
    return checkpoint["epoch"], int(checkpoint["step"])


def rebuild_model(checkpoint: Mapping[str, Any], averager: Optional[str] = None) -> nn.Module:
    """The network rebuilt from the checkpoint's `model_args`, with its weights, or with the averaged
    weights of the named averager (e.g. "epoch": the start of fine-tuning) and the BatchNorm statistics
    recomputed for them (`averaging.recalibrate_average`; a warning when the average has BatchNorm
    buffers but no current recomputed statistics)."""
    from ipu_effnet.models import create_model_from_args

    if checkpoint.get("model_args") is None:
        raise CheckpointError("the checkpoint holds no model_args: the model cannot be rebuilt from it")
    model = create_model_from_args(checkpoint["model_args"])
    if averager is None:
        model.load_state_dict(checkpoint["model"])
    else:
        stored = checkpoint.get("averagers") or {}
        if averager not in stored:
            raise CheckpointError(f"the checkpoint holds no averager {averager!r} (it has: {sorted(stored) or 'none'})")
        from ipu_effnet.training.averaging import WeightAverager

        average = WeightAverager()
        average.load_state_dict(stored[averager])
        state = average.averaged_state()
        if not average.bn_stats_current and any(k.endswith("running_mean") for k in state):
            warnings.warn(f"the checkpoint's {averager!r} average holds no recomputed BatchNorm statistics for its "
                          "latest weights (not its final epoch, train.bn_recalibration_batches = 0, the ipu "
                          "backend, or an older checkpoint): its averaged running statistics may not fit the "
                          "averaged weights", stacklevel=2)
        with torch.no_grad():
            model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------------------------------
# Files


def checkpoint_name(epoch: float, step: int) -> str:
    """`ckpt-e0003-s000001200.pt`: completed epochs (whole) and optimiser steps."""
    return f"ckpt-e{int(epoch):04d}-s{int(step):09d}.pt"


def save_checkpoint(path: PathLike, state: Mapping[str, Any], keep: Optional[int] = None) -> Path:
    """Write `state` to `path` atomically; with `keep`, then delete all but the `keep` newest checkpoints
    in the same directory. State that is not plain data raises TypeError before anything is written."""
    path = Path(path)
    _check_plain(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes the file private; a checkpoint is not
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(_TMP_PREFIX + "ckpt-*"):  # left by a writer killed mid-write (SIGKILL)
        with contextlib.suppress(OSError):
            stale.unlink()
    if keep is not None and keep > 0:
        prune_checkpoints(path.parent, keep)
    return path


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with weights_only=True (torch 1.13 and later; without it nothing is loaded).
    Missing, truncated, corrupt (a CRC mismatch included) or non-plain files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    problem = _archive_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({problem})")
    if not _HAS_WEIGHTS_ONLY:  # loading without it would run whatever code the file carries
        raise UnsafeCheckpointError(f"{path}: torch {torch.__version__} has no weights_only loading, and this "
                                    "code does not unpickle files without it; use torch >= 1.13")
    kwargs: Dict[str, Any] = {"map_location": map_location, "weights_only": True}
    try:
        state = torch.load(path, **kwargs)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
        detail = _first_line(named[0] if named else exc)
        raise UnsafeCheckpointError(f"{path}: refused by weights_only loading: it holds objects other than "
                                    f"tensors and plain data ({detail}); nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an ipu_effnet checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r}, this code reads "
                              f"version {CHECKPOINT_VERSION}")
    return state


def list_checkpoints(directory: PathLike) -> List[Path]:
    """Checkpoint files in `directory` (named by `checkpoint_name`), oldest first by (step, epoch)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run: in `run_dir/checkpoints/` if that exists, else in
    `run_dir` itself. Incomplete archives are skipped with a warning; None when there is none."""
    run_dir = Path(run_dir)
    directory = run_dir / CHECKPOINT_DIR if (run_dir / CHECKPOINT_DIR).is_dir() else run_dir
    for path in reversed(list_checkpoints(directory)):
        problem = _archive_problem(path, check_crc=False)
        if problem is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {path} ({problem})", stacklevel=2)
    return None


def prune_checkpoints(directory: PathLike, keep: int) -> List[Path]:
    """Delete all but the `keep` newest checkpoints in `directory`; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = list_checkpoints(directory)[:-keep]
    for p in old:
        with contextlib.suppress(OSError):
            p.unlink()
    return old


# ----------------------------------------------------------------------------------------------------
# Helpers


def _supports_weights_only() -> bool:
    try:
        return "weights_only" in inspect.signature(torch.load).parameters
    except (TypeError, ValueError):
        return False


_HAS_WEIGHTS_ONLY = _supports_weights_only()

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first entry that weights_only loading would refuse. Types are checked
    exactly: a numpy float or a namedtuple is a float or a tuple to isinstance, but not to the loader."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        if kind not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {kind.__name__} is not plain data")
        return
    if kind in _PLAIN:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: dict key {key!r} ({type(key).__name__}) is not a string or an integer")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {kind.__module__}.{kind.__qualname__} is not plain data "
                    f"(tensors, dicts, lists, numbers, strings): a weights_only load would refuse it")


def _archive_problem(path: Path, check_crc: bool = True) -> Optional[str]:
    """None if `path` is a complete torch zip archive (with every member's CRC intact when
    `check_crc`), else what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
                return "no data.pkl in the archive"
            if check_crc:
                bad = zf.testzip()
                if bad is not None:
                    return f"CRC mismatch in {bad}"
    except zipfile.BadZipFile as exc:
        return f"not a complete zip archive: {exc}"
    except (OSError, EOFError, RuntimeError) as exc:
        return _first_line(exc)
    return None


def _first_line(exc: Union[BaseException, str]) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
