"""`run_bench`: every configuration's workload built first, then timed round by round in turn (A, B, A,
B, ...), then each one's peak memory; and the environment the report records."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

from ipu_effnet.analysis.bench.config import BenchConfig
from ipu_effnet.analysis.bench.memory import MEMORY_STEPS, measure_memory_subprocess
from ipu_effnet.analysis.bench.report import NAMES, BenchReport, ConfigResult
from ipu_effnet.analysis.bench.timing import measure
from ipu_effnet.analysis.bench.workloads import build_workload
from ipu_effnet.errors import UsageError


def environment() -> Dict[str, Any]:
    import os
    import platform

    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def run_bench(configs: Sequence[BenchConfig], repeats: int = 3,
              progress: Optional[Callable[[str], None]] = None, memory: bool = True) -> BenchReport:
    """Measure each configuration `repeats` times, interleaved round by round (A, B, A, B, ...).

    All workloads are built before the first timed step, so a bad option fails early and building
    does not disturb the timings. With `memory`, each configuration's peak memory is measured too: on
    CUDA torch.cuda.max_memory_allocated over its rounds; on the CPU the peak RSS of a fresh process
    running it (`measure_memory_subprocess`, after the timed rounds). The data mode reports none.
    """
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    if not 1 <= len(configs) <= len(NAMES):
        raise UsageError(f"bench compares 1 to {len(NAMES)} configurations, got {len(configs)}")
    workloads = [build_workload(cfg) for cfg in configs]
    results = [ConfigResult(w.config, w.resolution, [], w.info) for w in workloads]
    for round_index in range(repeats):
        for name, w, r in zip(NAMES, workloads, results):
            r.timings.append(measure(w))
            if progress is not None:
                t = r.timings[-1]
                progress(f"round {round_index + 1}/{repeats} {name}: {t.images_per_s:.2f} img/s, "
                         f"{t.images_per_cpu_s:.2f} img/cpu-s")
    env = environment()  # the load average right after the timed rounds
    if memory:
        for name, r in zip(NAMES, results):
            if r.config.mode == "data":
                continue
            if r.config.device == "cuda":
                peak = max(t.peak_bytes or 0 for t in r.timings)
                r.memory = {"peak_allocated_mb": round(peak / 2 ** 20, 1),
                            "method": "torch.cuda.max_memory_allocated over the rounds"}
            elif r.config.device == "cpu":
                if progress is not None:
                    progress(f"memory {name}: a fresh process, {MEMORY_STEPS} steps")
                r.memory = measure_memory_subprocess(r.config)
    return BenchReport(results, repeats, env)
