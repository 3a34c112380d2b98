"""The report of a `bench` run: each configuration's rounds (`ConfigResult`), the ratios of B to A
(`BenchReport`), their JSON form and the text `format_report` prints (docs/PERFORMANCE.md, Output)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from ipu_effnet.analysis.bench.config import BenchConfig
from ipu_effnet.analysis.bench.timing import Timing

NAMES = "ABCDEFGH"  # the configurations' names in the report, in the order given


def _sig(value: float, digits: int = 6) -> float:
    """`value` to `digits` significant figures: a fixed number of decimals would leave a ratio of 0.02
    with three figures, and a ratio recomputed from the rounded medians would then disagree with it."""
    return float(f"{value:.{digits}g}")


@dataclass
class ConfigResult:
    config: BenchConfig
    resolution: int
    timings: List[Timing]
    info: Dict[str, Any]
    memory: Optional[Dict[str, Any]] = None

    @property
    def images_per_s(self) -> List[float]:
        return [t.images_per_s for t in self.timings]

    @property
    def images_per_cpu_s(self) -> List[float]:
        return [t.images_per_cpu_s for t in self.timings]

    @property
    def median(self) -> float:
        """Median images per wall-clock second over the rounds."""
        return statistics.median(self.images_per_s)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.images_per_cpu_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of images/s over the rounds: how much to trust a difference."""
        values = self.images_per_s
        return (max(values) - min(values)) / self.median

    def to_dict(self) -> Dict[str, Any]:
        return {"config": asdict(self.config), "resolution": self.resolution,
                "images_per_s": [_sig(v) for v in self.images_per_s], "median": _sig(self.median),
                "min": _sig(min(self.images_per_s)), "max": _sig(max(self.images_per_s)),
                "spread": _sig(self.spread),
                "images_per_cpu_s": [_sig(v) for v in self.images_per_cpu_s],
                "median_cpu": _sig(self.median_cpu), **self.per_worker(), "memory": self.memory, **self.info}

    def per_worker(self) -> Dict[str, Any]:
        """Data mode: median images/s divided by the loader's worker count (1 without workers)."""
        if self.config.mode != "data":
            return {}
        return {"median_per_worker": _sig(self.median / max(self.config.workers, 1))}


@dataclass
class BenchReport:
    results: List[ConfigResult]
    repeats: int
    environment: Dict[str, Any]

    @property
    def ratio(self) -> Optional[float]:
        """Median images/s of B over median images/s of A (None with one configuration)."""
        if len(self.results) < 2:
            return None
        return self.results[1].median / self.results[0].median

    @property
    def ratio_cpu(self) -> Optional[float]:
        """The same ratio from images per CPU-second."""
        if len(self.results) < 2:
            return None
        return self.results[1].median_cpu / self.results[0].median_cpu

    @property
    def paired_ratios(self) -> List[float]:
        """B/A (images/s) within each round, A and B measured back to back."""
        if len(self.results) < 2:
            return []
        a, b = self.results[0].images_per_s, self.results[1].images_per_s
        return [y / x for x, y in zip(a, b)]

    @property
    def paired_median(self) -> Optional[float]:
        """Median of the per-round B/A ratios: robust to load that changes from round to round."""
        return statistics.median(self.paired_ratios) if self.paired_ratios else None

    @property
    def memory_ratio(self) -> Optional[float]:
        """Peak memory of B over A (peak RSS on the CPU, peak allocated on CUDA), when both were measured."""
        if len(self.results) < 2:
            return None
        a, b = (_peak_mb(r.memory) for r in self.results[:2])
        return b / a if a and b else None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"repeats": self.repeats, "environment": self.environment,
                               "results": [r.to_dict() for r in self.results]}
        if self.ratio is not None:
            out["ratio"] = _sig(self.ratio)
            out["ratio_cpu"] = _sig(self.ratio_cpu)
            out["paired_ratios"] = [_sig(r) for r in self.paired_ratios]
            out["paired_median"] = _sig(self.paired_median)
            if self.memory_ratio is not None:
                out["memory_ratio"] = _sig(self.memory_ratio)
        return out



def _peak_mb(memory: Optional[Dict[str, Any]]) -> Optional[float]:
    if not memory:
        return None
    return memory.get("peak_rss_mb") or memory.get("peak_allocated_mb")


def _format_memory(memory: Dict[str, Any]) -> str:
    if "peak_rss_mb" in memory:
        return (f"peak RSS {memory['peak_rss_mb']:.0f} MB ({memory['built_rss_mb']:.0f} MB once built, "
                f"+{memory['steps_rss_mb']:.0f} MB in the steps; {memory['method']})")
    return f"peak allocated {memory['peak_allocated_mb']:.0f} MB ({memory['method']})"


def _change(ratio: float) -> str:
    change = ratio - 1.0
    return f"{abs(change):.1%} {'faster' if change >= 0 else 'slower'}"


def format_report(report: BenchReport) -> str:
    """Human text: one line per configuration, then the ratio B/A."""
    first = report.results[0]
    driver = "poptorch.trainingModel" if first.config.device == "ipu" else "TorchRunner.step"
    what = {"train": f"training step (TrainingModel through {driver}: uint8 batch normalised, forward, "
                     "cross-entropy, backward, SGD)",
            "infer": "inference (forward, eval mode, no grad" + (", BatchNorm folded, Proxy Norm frozen)" if first.config.fold_bn
                                                                 else ")"),
            "data": ("training data loader (decode, random-resized crop, flip, collate)"
                     if first.config.preprocess == "train" else
                     "data loader with evaluation preprocessing (decode, resize, centre crop, collate)")}[first.config.mode]
    what += f"; {first.config.device} {first.config.precision}"
    env = report.environment
    order = ", alternating" if len(report.results) > 1 else ""
    lines = [f"bench: {what}; torch {env['torch']}; {report.repeats} rounds{order}, "
             f"{first.config.warmup} warm-up + {first.config.steps} timed steps each"]
    for name, r in zip(NAMES, report.results):
        if r is first:
            label = f"{r.config.label()} res={r.resolution}"
        else:
            label = f"as A with {r.config.label(first.config)}"
        lines.append(f"  {name} {r.median:8.2f} img/s (min {min(r.images_per_s):.2f}, max {max(r.images_per_s):.2f}, "
                     f"spread {r.spread:.1%}), {r.median_cpu:.2f} img/cpu-s  {label}")
        if r.config.mode == "data":
            lines.append(f"    {r.per_worker()['median_per_worker']:.2f} img/s per worker "
                         f"({r.config.workers} worker(s); 0 = in the main process, counted as one); decoder "
                         f"{r.info.get('decoder')}, resampler {r.info.get('resampler')}, "
                         f"{'reduced-scale decoding' if r.config.draft else 'full-size decoding'}")
        if r.memory:
            lines.append("    " + _format_memory(r.memory))
    if report.ratio is not None:
        paired = ", ".join(f"{x:.3f}" for x in report.paired_ratios)
        lines.append(f"  B/A = {report.ratio:.3f}: B is {_change(report.ratio)} (per round: {paired}; "
                     f"their median {report.paired_median:.3f}); by CPU time {report.ratio_cpu:.3f}")
        mem_ratio = report.memory_ratio
        if mem_ratio is not None:
            lines.append(f"  peak memory B/A = {mem_ratio:.3f}")
    if env.get("load_average") and env.get("cpus") and env["load_average"][0] > env["cpus"]:
        lines.append(f"  note: load average {env['load_average'][0]} on {env['cpus']} CPUs: other jobs share "
                     f"the machine, trust the CPU-time ratio more")
    return "\n".join(lines)
