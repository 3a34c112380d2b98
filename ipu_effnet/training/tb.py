"""TensorBoard event files for a run (`logging.tensorboard`; on when the tensorboard package imports).

Each phase of a run writes into `<run>/tensorboard/` (one TensorBoard run per recipe: a half-resolution
recipe's fine-tune phase writes into the recipe's directory too, its steps counted on from the last
step of the training phase, so the recipe's curves run on across both phases), from the main process
only (rank 0 under torchrun, instance 0 under poprun). So `tensorboard --logdir OUT` on a `compare` or
`quickstart` output shows one run per recipe, `runs/<recipe>/tensorboard`, side by side.

Tags, at the step of metrics.jsonl's record (plus the phase's step offset):

    train/loss, train/top1, train/lr, train/images_per_sec     every logging.log_every steps ("step" records)
    train/loss_scale                                           the same steps, where there is a loss scale
    val/top1, val/top5, val/loss                               every epoch ("epoch" records: val_*)
    epoch/train_loss, epoch/train_top1, epoch/images_per_sec  every epoch (train_loss, train_top1, images_per_sec)
    epoch/resolution                                           every epoch: the training resolution
    config/<phase>/text_summary                                text: the phase's resolved config (YAML)

Each phase writes a purge marker at the step after the one it starts from (its checkpoint's when
resumed), so readers drop what an interrupted run logged after that and the curves have no doubled stretch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ipu_effnet.errors import UsageError

__all__ = ["EXTRAS_HINT", "TensorBoardLog", "tensorboard_available", "want_tensorboard"]

TB_DIR = "tensorboard"
EXTRAS_HINT = "pip install -r requirements-extras.txt (or pip install tensorboard)"

STEP_TAGS = {"loss": "train/loss", "top1": "train/top1", "lr": "train/lr", "images_per_sec": "train/images_per_sec"}
EPOCH_TAGS = {"val_top1": "val/top1", "val_top5": "val/top5", "val_loss": "val/loss",
              "train_loss": "epoch/train_loss", "train_top1": "epoch/train_top1",
              "images_per_sec": "epoch/images_per_sec"}


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


_said_missing = []


def want_tensorboard(setting: Optional[bool], log: Optional[Callable[[str], None]] = None) -> bool:
    """logging.tensorboard: False off, True on (an error naming the install when the package is missing),
    None on exactly when the package imports (when it does not, `log` hears so once per process)."""
    if setting is False:
        return False
    if tensorboard_available():
        return True
    if setting:
        raise UsageError(f"logging.tensorboard = true but the tensorboard package is not installed: {EXTRAS_HINT}")
    if log is not None and not _said_missing:
        _said_missing.append(True)
        log(f"note: no TensorBoard event files (the tensorboard package is not installed: {EXTRAS_HINT})")
    return False


class TensorBoardLog:
    """The loop's TensorBoard writer; every method is a no-op when disabled."""

    def __init__(self, log_dir: os.PathLike, enabled: bool, step_offset: int = 0,
                 purge_step: Optional[int] = None) -> None:
        self.log_dir = Path(log_dir)
        self.offset = int(step_offset)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if purge_step is None else self.offset + int(purge_step)  # readers drop steps >= this
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=30)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def config(self, phase: str, text: str) -> None:
        if self.writer is not None:  # indented: TensorBoard renders text as Markdown, this as code
            self.writer.add_text(f"config/{phase}", "\n".join("    " + line for line in text.splitlines()),
                                 global_step=self.offset)

    def step(self, record: Dict[str, Any], loss_scale: Optional[float] = None) -> None:
        if self.writer is None:
            return
        step = self.offset + int(record["step"])
        for key, tag in STEP_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), step)
        if loss_scale is not None:
            self.writer.add_scalar("train/loss_scale", float(loss_scale), step)

    def epoch(self, record: Dict[str, Any], resolution: Optional[int] = None) -> None:
        if self.writer is None:
            return
        step = self.offset + int(record["step"])
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), step)
        if resolution is not None:
            self.writer.add_scalar("epoch/resolution", float(resolution), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
