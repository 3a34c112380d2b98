"""Throughput measurement: images per second of a training or inference step, A against B in one process.

Speed on a shared CPU drifts by more than the differences worth measuring (Proxy Norm's few per cent),
so a comparison runs both configurations in the same process, alternately (A, B, A, B, ... for
`repeats` rounds), and reports the median of each and the ratio of the medians. Each round runs
`warmup` untimed steps, then `steps` timed ones.

    from ipu_effnet.analysis.bench import BenchConfig, format_report, run_bench
    a = BenchConfig(model="efficientnet_b0_g16", norm="layer", res=160, batch=16)
    report = run_bench([a, a.with_overrides("norm=layer+proxy")], repeats=5)
    print(format_report(report))

Layout, one module per concern:

    config.py     `BenchConfig`: what to run (model, norm, resolution, batch, device, precision, the
                  implementation: ours or the peer geffnet, ...), its checks and the `--vs` syntax
    build.py      the network on its device, inference input, autocast, torch.compile, poptorch, threads
    step.py       the training step: the recipe's TrainingModel driven by TorchRunner.step (`compare`
                  times the same step, `training_workload`)
    workloads.py  a factory per mode (`WORKLOADS[mode]`: train, infer, data) that builds the model or
                  loader, inputs and a `step()` closure once
    data.py       the data mode: the training loader over a folder or generated JPEGs
    timing.py     `Workload` and `measure`, which times one
    memory.py     peak memory on the CPU, in a fresh process per configuration (MEMORY_STEPS)
    runner.py     `run_bench`: configurations interleaved round by round, then each one's peak memory
    report.py     `BenchReport` and `format_report`; the output format (text and --json) is described
                  in docs/PERFORMANCE.md
"""

from __future__ import annotations

from ipu_effnet.analysis.bench.build import set_threads
from ipu_effnet.analysis.bench.config import (
    DEVICES,
    GEFFNET_INSTALL,
    IMPLS,
    MODES,
    PRECISIONS,
    PREPROCESSING,
    BenchConfig,
)
from ipu_effnet.analysis.bench.data import generated_jpeg_folder
from ipu_effnet.analysis.bench.memory import (
    MEMORY_STEPS,
    measure_memory_subprocess,
    memory_probe,
    run_memory_probe,
    step_memory,
)
from ipu_effnet.analysis.bench.report import BenchReport, ConfigResult, format_report
from ipu_effnet.analysis.bench.runner import environment, run_bench
from ipu_effnet.analysis.bench.step import training_workload
from ipu_effnet.analysis.bench.timing import Timing, Workload, measure
from ipu_effnet.analysis.bench.workloads import WORKLOADS, build_workload, inference_workload

__all__ = [
    "DEVICES",
    "GEFFNET_INSTALL",
    "IMPLS",
    "MEMORY_STEPS",
    "MODES",
    "PRECISIONS",
    "PREPROCESSING",
    "WORKLOADS",
    "BenchConfig",
    "BenchReport",
    "ConfigResult",
    "Timing",
    "Workload",
    "build_workload",
    "environment",
    "format_report",
    "generated_jpeg_folder",
    "inference_workload",
    "measure",
    "measure_memory_subprocess",
    "memory_probe",
    "run_bench",
    "run_memory_probe",
    "set_threads",
    "step_memory",
    "training_workload",
]
