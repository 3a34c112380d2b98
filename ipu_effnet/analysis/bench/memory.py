"""Peak memory on the CPU, from a fresh Python process per configuration (`run_memory_probe`): the
process's RSS high-water mark after a few steps, and its RSS once the workload is built."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Dict, Optional

from ipu_effnet.analysis.bench.build import set_threads
from ipu_effnet.analysis.bench.config import BenchConfig
from ipu_effnet.analysis.bench.workloads import build_workload
from ipu_effnet.errors import UsageError

# (peak resident set: interpreter, torch, model, optimiser state and the step's activations) and its
# VmRSS once the workload is built (before the first step); their difference is what the steps add.
MEMORY_STEPS = 2


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_kib() -> Optional[int]:
    peak = _status_kib("VmHWM")
    if peak is None:  # no /proc (macOS): ru_maxrss, in KiB on Linux and bytes on macOS
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            peak //= 1024
    return peak


def step_memory(step: Callable[[], None], steps: int = MEMORY_STEPS) -> Dict[str, Any]:
    """In the fresh process, once the workload is built: record RSS, run `steps` steps, record the
    high-water mark (the fields and method every fresh-process measurement reports)."""
    built = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    peak = _peak_rss_kib()
    return {"peak_rss_mb": round(peak / 1024, 1) if peak else None,
            "built_rss_mb": round(built / 1024, 1) if built else None,
            "steps_rss_mb": round((peak - built) / 1024, 1) if peak and built else None,
            "method": f"fresh process, {steps} steps, /proc/self/status VmHWM"}


def memory_probe(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run in the fresh process: build the configuration's workload, then `step_memory`."""
    cfg = BenchConfig(**config).validate()
    set_threads(cfg.threads)
    workload = build_workload(cfg)
    return step_memory(workload.step)


def run_memory_probe(probe: str, payload: Dict[str, Any], what: str, timeout: float = 1800.0) -> Dict[str, Any]:
    """`probe` ("module:function", called with the JSON-able `payload`, returning a JSON-able dict) in a
    fresh Python process (the same interpreter and import path); `what` names it in errors. Other
    measurements (compare's inference from a checkpoint's model) pass their own probe."""
    import json
    import os
    import subprocess
    import sys

    module, _, function = probe.partition(":")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = (f"import json, sys; from {module} import {function}; "
            f"print('MEMORY ' + json.dumps({function}(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise UsageError(f"{what} failed (exit {proc.returncode}): {tail}")


def measure_memory_subprocess(cfg: BenchConfig, timeout: float = 1800.0) -> Dict[str, Any]:
    """memory_probe(cfg) in a fresh Python process (the same interpreter and import path)."""
    return run_memory_probe("ipu_effnet.analysis.bench.memory:memory_probe", asdict(cfg),
                            f"bench memory probe for {cfg.label()}", timeout)
