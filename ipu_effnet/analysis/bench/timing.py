"""Timing: a `Workload` (what one configuration runs, built once) and `measure`, which runs its warm-up
steps and then times its steps, in wall-clock and CPU seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ipu_effnet.analysis.bench.build import set_threads
from ipu_effnet.analysis.bench.config import BenchConfig


@dataclass
class Workload:
    """What one configuration runs: `step()` processes one batch of `batch` images. `begin()` and `end()`
    run before and after each round, outside the timing (the data mode starts and stops its loader's
    workers there, so that A's workers never run while B is timed); `sync()` waits for the device."""

    config: BenchConfig
    resolution: int
    step: Callable[[], None]
    info: Dict[str, Any]
    begin: Callable[[], None] = lambda: None
    end: Callable[[], None] = lambda: None
    sync: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Timing:
    """One round of one configuration: images per wall-clock second, and per second of this process's
    CPU time (all threads). On a shared machine the wall figure drops when other jobs take the cores;
    the CPU figure much less, so it is the steadier one for A/B ratios with one thread. (Loader workers
    are other processes: in the data mode with workers > 0 the CPU figure counts the main process only.)"""

    images_per_s: float
    images_per_cpu_s: float
    peak_bytes: Optional[int] = None  # CUDA: torch.cuda.max_memory_allocated over this round


def measure(workload: Workload) -> Timing:
    """Run `warmup` untimed steps, then `steps` timed ones."""
    cfg = workload.config
    set_threads(cfg.threads)
    cuda = cfg.device == "cuda" and cfg.mode != "data"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    workload.begin()
    try:
        for _ in range(cfg.warmup):
            workload.step()
        workload.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(cfg.steps):
            workload.step()
        workload.sync()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        workload.end()
    images = cfg.batch * cfg.steps
    peak = None
    if cuda:
        import torch

        peak = int(torch.cuda.max_memory_allocated())
    return Timing(images / wall, images / max(cpu, 1e-9), peak)


# Peak memory on the CPU. A process's RSS high-water mark (VmHWM) only grows, and freed memory often
# stays with the allocator, so A's peak would hide B's in a shared process. Each configuration is
# therefore built and run for MEMORY_STEPS steps in a fresh Python process, which reports its VmHWM
