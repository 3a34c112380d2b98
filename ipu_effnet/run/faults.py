"""What the training loop does when something goes wrong: signals, non-finite steps, full disks, bad
checkpoints, unreadable images. Small pieces the flat loop (`loop.train`) calls at fixed places:

    with StopOnSignals():                              # the train command, around the whole recipe
        ...
        if stop_requested(collectives):                # the loop, at every step boundary
            save_or_stop(...); raise Preempted(...)    # a resumable checkpoint at this very step
    bad_steps.observe(out, step, last_checkpoint)      # after each step: NumericalError when it must stop
    preflight(run_dir / "checkpoints", nbytes)         # before the first step: writable, enough space
    path, ckpt = load_resume(run_dir, say)             # the newest checkpoint that loads
    check_data(train_loader.dataset, say)              # between epochs: unreadable images so far

Pre-emption: the first SIGTERM or SIGINT only sets a flag (and puts the previous handlers back, so a
second signal acts at once: SIGTERM terminates, SIGINT raises KeyboardInterrupt); the loop finishes the
step it is in, writes a checkpoint that records the position inside the epoch, and raises `Preempted`,
which the train command turns into exit status 0 and a line saying how to resume. Loader workers are
forked with the handler installed; it ignores signals in any process but the one that installed it.

Non-finite steps: under fp16 loss scaling (torch's GradScaler, CUDA) a step whose gradients overflow is
skipped and the scale lowered, which is how loss scaling finds its scale; only `train.max_bad_steps`
such steps in a row stop the run. Without loss scaling (fp32, bf16, the IPU backend) a non-finite loss
is not absorbed by anything: the step is not applied (torch) and the run stops at once. Either way
the error names the last good checkpoint and no checkpoint is written from the failing state.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ipu_effnet.errors import RunError, UsageError

__all__ = [
    "BadSteps",
    "NumericalError",
    "Preempted",
    "StopOnSignals",
    "check_data",
    "load_resume",
    "mid_epoch",
    "preflight",
    "remove_failed_run_dir",
    "save_or_stop",
    "stop_requested",
]

_SIGNALS = ("SIGTERM", "SIGINT")
_state: Dict[str, Any] = {"signal": None, "installed": False, "owner": None}


class Preempted(Exception):
    """Raised by the loop after the pre-emption checkpoint is written; the train command exits 0."""

    def __init__(self, signal_name: str, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class NumericalError(RunError):
    """A non-finite loss the run cannot absorb: one line with the step and the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------
# Signals


def _handler(signum: int, frame: Any) -> None:
    if os.getpid() != _state["owner"]:  # a forked loader worker: the main process decides
        return
    name = signal.Signals(signum).name
    _state["signal"] = name
    _restore()  # a second signal acts at once
    print(f"received {name}: writing a checkpoint at the next step boundary, then stopping "
          f"(send it again to stop at once)", file=sys.stderr, flush=True)


def _restore() -> None:
    previous = _state.get("previous") or {}
    for name, handler in previous.items():
        signal.signal(getattr(signal, name), handler)
    _state["previous"] = {}


class StopOnSignals:
    """Install the pre-emption handlers for SIGTERM and SIGINT (main thread only; elsewhere a no-op)."""

    def __enter__(self) -> StopOnSignals:
        _state["signal"] = None
        if threading.current_thread() is threading.main_thread():
            _state["previous"] = {name: signal.getsignal(getattr(signal, name)) for name in _SIGNALS}
            _state["owner"] = os.getpid()
            for name in _SIGNALS:
                signal.signal(getattr(signal, name), _handler)
            _state["installed"] = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if _state["installed"]:
            _restore()
        _state["installed"] = False
        _state["signal"] = None


def stop_requested(collectives: Any = None) -> Optional[str]:
    """The signal that asked the run to stop, or None. With several processes (`collectives`: the run's
    host collectives, backends/host_collectives.py), any process's signal stops all of them at the same
    step: one all-reduce per step, only while the handlers are installed."""
    name = _state["signal"]
    if collectives is None or collectives.size <= 1 or not _state["installed"]:
        return name
    stops = collectives.all_reduce_sum({"stop": 1.0 if name else 0.0})["stop"]
    return name or ("SIGTERM" if stops > 0 else None)


# ----------------------------------------------------------------------------------------------------
# Non-finite steps


@dataclass
class BadSteps:
    """Counts non-finite steps; `observe` raises NumericalError when the run must stop.

    tolerant: loss scaling absorbs overflowing steps (fp16 with a GradScaler); limit: how many in a
    row it may skip."""

    limit: int = 20
    tolerant: bool = False
    precision: str = "32.32"
    consecutive: int = 0
    skipped: int = 0

    def observe(self, out: Mapping[str, Any], step: int, last_checkpoint: Optional[Path]) -> None:
        loss = float(out.get("loss", 0.0))
        bad = bool(out.get("skipped", not math.isfinite(loss)))
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        resume = (f"the last good checkpoint is {last_checkpoint} (resume with train --resume)"
                  if last_checkpoint is not None else "no checkpoint was written yet")
        if not self.tolerant:
            raise NumericalError(f"step {step}: the loss is {loss} in precision {self.precision}, with no loss "
                                 f"scaling to absorb it; the step was not applied and the run stops; {resume}. "
                                 "Lower train.lr, check the data, or try precision 32.32")
        if self.consecutive >= self.limit:
            scale = out.get("scale")
            raise NumericalError(f"step {step}: {self.consecutive} consecutive steps had non-finite gradients "
                                 f"under fp16 loss scaling (train.max_bad_steps = {self.limit}; loss scale now "
                                 f"{scale}); the run stops; {resume}. Lower train.lr or use precision 32.32 or bf16")


# ----------------------------------------------------------------------------------------------------
# Disk


def preflight(directory: Path, nbytes: int) -> None:
    """Before the first step: `directory` can be created and written (a small file written, fsync'ed and
    removed) and its file system has room for about `nbytes` (one checkpoint and its temporary copy).
    UsageError otherwise: nothing has been trained yet."""
    directory = Path(directory)
    probe = directory / f".preflight-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UsageError(f"run directory {directory} is not writable ({_os_error(exc)}); choose another --out "
                         "or logging.out_dir, or free space there") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise UsageError(f"run directory {directory}: {free / 2**20:.1f} MiB free, a checkpoint needs about "
                         f"{nbytes / 2**20:.1f} MiB (written next to the previous one before it replaces it); "
                         "free space or choose another --out")


def checkpoint_bytes(model: Any, averagers: int = 1) -> int:
    """About the size of one checkpoint: the model's state, two optimiser buffers per weight (RMSprop's
    and momentum; an upper bound for SGD) and one copy per averager, plus a MiB for the rest."""
    state = model.state_dict()
    weights = sum(v.numel() * v.element_size() for v in state.values())
    return int(weights * (3 + averagers)) + 2**20


def save_or_stop(path: Path, state: Mapping[str, Any], keep: Optional[int], previous: Optional[Path]) -> Path:
    """save_checkpoint, with a failed write (disk full, quota, I/O error) turned into a RunError that
    names the previous checkpoint, which the atomic write left intact."""
    from ipu_effnet.training.checkpoint import save_checkpoint

    try:
        return save_checkpoint(path, state, keep=keep)
    except OSError as exc:
        kept = f"the previous checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint"
        raise RunError(f"cannot write checkpoint {path} ({_os_error(exc)}); {kept}; free space, then continue "
                       f"with train --resume {_run_dir_of(path)}") from None


def _run_dir_of(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _os_error(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{code}: {text}" if code else text


def remove_failed_run_dir(run_dir: Path, existed: bool) -> None:
    """After a UsageError: remove a run directory this command created and that holds no checkpoint,
    so that a mistyped config leaves nothing behind."""
    run_dir = Path(run_dir)
    if existed or not run_dir.is_dir() or any(run_dir.rglob("ckpt-*.pt")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Checkpoints on resume


def load_resume(run_dir: Path, say: Callable[[str], None] = print) -> Tuple[Path, Dict[str, Any]]:
    """The newest checkpoint of `run_dir` that loads, and its contents. A truncated or corrupt one is
    reported and the one before it used; one that weights_only loading refuses (it carries objects
    other than plain data, e.g. pickled code) stops the resume: someone must look at that run."""
    import warnings

    from ipu_effnet.training.checkpoint import (
        CHECKPOINT_DIR,
        CheckpointError,
        UnsafeCheckpointError,
        list_checkpoints,
        load_checkpoint,
    )

    run_dir = Path(run_dir)
    directory = run_dir / CHECKPOINT_DIR if (run_dir / CHECKPOINT_DIR).is_dir() else run_dir
    candidates = list_checkpoints(directory)
    if not candidates:
        raise UsageError(f"--resume {run_dir}: no checkpoint found in {run_dir / CHECKPOINT_DIR}")
    for path in reversed(candidates):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return path, load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            say(f"warning: {exc}; trying the previous checkpoint")
    raise UsageError(f"--resume {run_dir}: none of the {len(candidates)} checkpoints in {directory} loads")


@dataclass
class MidEpoch:
    """Where inside an epoch a checkpoint was written (a pre-emption checkpoint), for the resumed run."""

    epoch_step: int = 0  # steps of the epoch already done: the resumed run skips that many batches
    epoch_sums: Dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "samples": 0.0})
    train_time: float = 0.0
    train_images: int = 0


def mid_epoch(ckpt: Optional[Mapping[str, Any]]) -> MidEpoch:
    extra = (ckpt or {}).get("extra") or {}
    saved = extra.get("mid_epoch")
    if not saved:
        return MidEpoch()
    return MidEpoch(int(saved["epoch_step"]), {k: float(v) for k, v in saved["epoch_sums"].items()},
                    float(saved["train_time"]), int(saved["train_images"]))


def mid_epoch_extra(epoch_step: int, epoch_sums: Mapping[str, float], train_time: float,
                    train_images: int) -> Dict[str, Any]:
    return {"mid_epoch": {"epoch_step": int(epoch_step), "epoch_sums": {k: float(v) for k, v in epoch_sums.items()},
                          "train_time": float(train_time), "train_images": int(train_images)}}


# ----------------------------------------------------------------------------------------------------
# Data


def check_data(dataset: Any, say: Callable[[str], None] = print, stop: bool = True) -> int:
    """Between epochs: name the images found unreadable since the last call and, with `stop`, raise
    DataError when more than data.max_corrupt_fraction of the split is; returns the count. Datasets
    without `unreadable` (generated, digits) have none."""
    unreadable = getattr(dataset, "unreadable", None)
    if unreadable is None:
        return 0
    count = unreadable.collect()
    news = unreadable.news()
    if news:
        say(f"warning: {news}")
    if stop:
        unreadable.check()
    return count
