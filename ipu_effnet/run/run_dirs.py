"""Run directories as the commands that read them see them: the summary a run wrote, its final
checkpoint, and the checkpoint with its stored config.

    path = resolve_checkpoint("runs/b0")                  # a file as given, or a run's final checkpoint
    path, ckpt, cfg = load_run_checkpoint("runs/b0", ["data.path=..."])
    summary = read_summary("runs/b0")                     # {} when there is none
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

from ipu_effnet.errors import UsageError


def resolve_checkpoint(path: os.PathLike) -> Path:
    """A checkpoint file as given, or a run directory's final checkpoint: the one its summary.json names
    (`checkpoint` key, where a recipe writes it), else the newest in checkpoints/, else the newest found
    anywhere below the directory (a recipe's phases may keep their own checkpoints/)."""
    from ipu_effnet.training.checkpoint import latest_checkpoint

    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path}: no such file or directory")
    summary = read_summary(path)
    named = summary.get("checkpoint") if summary else None
    if named:
        for candidate in (Path(named), path / named, path / "checkpoints" / Path(named).name):
            if candidate.is_file():
                return candidate
    found = latest_checkpoint(path)
    if found is not None:
        return found
    nested = [p for p in path.rglob("*.pt") if p.is_file() and p.parent.name == "checkpoints"]
    if nested:
        return max(nested, key=lambda p: p.stat().st_mtime)
    raise UsageError(f"--checkpoint {path}: no checkpoint in that directory")


def read_summary(run_dir: os.PathLike) -> Dict[str, Any]:
    """run_dir/summary.json as a dict ({} when absent or unreadable)."""
    path = Path(run_dir) / "summary.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_run_checkpoint(checkpoint: str, overrides=()):
    """(path, checkpoint, config) for a checkpoint file or a run directory (its final checkpoint), with
    `--set` overrides applied to the stored config (evaluate, finetune, predict, export)."""
    from ipu_effnet.config import Config, apply_overrides
    from ipu_effnet.training.checkpoint import load_checkpoint

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    if ckpt.get("config") is None:
        raise UsageError(f"{path}: the checkpoint holds no config, so its data set is unknown")
    return path, ckpt, apply_overrides(Config.from_dict(ckpt["config"], source=str(path)), overrides)
