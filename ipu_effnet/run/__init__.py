"""Orchestration: a recipe as phases, the training loop of one phase, and what happens when a run is
interrupted or fails. It sits above `training/` (the model wrapper, optimisers, schedules, averaging,
checkpoints) and `backends/` (where a step runs), and names no backend itself.

    from ipu_effnet.run import train
    summary = train(cfg, run_dir)              # any recipe: native, halfres, progressive
    summary = train(cfg, run_dir, resume=True)

Modules: `recipes` (the recipes as phases, `train`), `phases` (what one phase is), `loop` (one phase's
epochs and steps), `faults` (signals, non-finite steps, disks, bad checkpoints, unreadable images).
"""

from __future__ import annotations

from ipu_effnet.run.recipes import train

__all__ = ["train"]
