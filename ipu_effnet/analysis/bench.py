"""Throughput measurement: images per second of a training or inference step, A against B in one process.

Speed on a shared CPU drifts by more than the differences worth measuring (Proxy Norm's few per cent),
so a comparison runs both configurations in the same process, alternately (A, B, A, B, ... for
`repeats` rounds), and reports the median of each and the ratio of the medians. Each round runs
`warmup` untimed steps, then `steps` timed ones.

    from ipu_effnet.analysis.bench import BenchConfig, run_bench
    a = BenchConfig(model="efficientnet_b0_g16", norm="layer", res=160, batch=16)
    report = run_bench([a, a.with_overrides("norm=layer+proxy")], repeats=5)
    print(format_report(report))

Layout, so that later measurements slot in: a `BenchConfig` says what to run; a *workload* factory
(`WORKLOADS[mode]`) builds the model, inputs and a `step()` closure once; `measure` times a workload;
`run_bench` interleaves configurations. A new mode (data loader, peers, memory) is a new factory.
"""

from __future__ import annotations

import difflib
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

from ipu_effnet.errors import UsageError

MODES = ("train", "infer")


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure. res=None means the model's native training resolution;
    threads=None leaves torch's thread count as it is."""

    model: str = "efficientnet_b0_g16"
    norm: str = "layer"
    group_size: Optional[int] = None
    expand_ratio: Optional[float] = None
    res: Optional[int] = None
    batch: int = 16
    steps: int = 5
    warmup: int = 2
    threads: Optional[int] = None
    channels_last: bool = False
    mode: str = "train"
    num_classes: int = 1000
    proxy_impl: Optional[str] = None  # Proxy Norm implementation (norms/proxy_ops.py); None: the default

    def validate(self) -> BenchConfig:
        """Cheap checks (no torch import); raises UsageError naming the option."""
        from norms import as_norm_spec

        if self.mode not in MODES:
            raise UsageError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        try:
            as_norm_spec(self.norm)
        except ValueError as exc:
            raise UsageError(f"norm {self.norm!r}: {exc}") from None
        for key in ("batch", "steps", "num_classes"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise UsageError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.proxy_impl is not None:
            from norms.proxy_ops import IMPLS

            if self.proxy_impl not in IMPLS:
                raise UsageError(f"proxy_impl {self.proxy_impl!r}: expected one of {', '.join(IMPLS)}")
        if self.res is not None and self.res < 32:
            raise UsageError(f"res {self.res}: the resolution must be at least 32 (five stride-2 stages)")
        return self

    def with_overrides(self, text: str) -> BenchConfig:
        """A copy with `KEY=VALUE KEY=VALUE ...` applied (the `--vs` syntax; `-` and `_` both work in keys)."""
        changes: Dict[str, Any] = {}
        for item in text.split():
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise UsageError(f"--vs item {item!r}: expected KEY=VALUE")
            changes[key] = _parse_field(key, value)
        if not changes:
            raise UsageError("--vs needs at least one KEY=VALUE")
        return replace(self, **changes).validate()

    def label(self, reference: Optional[BenchConfig] = None) -> str:
        """Short text naming the options; with `reference`, only those that differ from it."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if reference is not None:
                if getattr(reference, f.name) != value:
                    parts.append(f"{f.name}={value}")
            elif f.name == "model":
                parts.append(value)
            elif f.name == "channels_last":
                parts.append("channels-last" if value else "nchw")
            elif value is not None and f.name not in ("res", "steps", "warmup", "num_classes", "mode"):
                parts.append(f"{f.name}={value}")
        return " ".join(parts) or "(no difference)"


def _parse_field(key: str, value: str) -> Any:
    types = {f.name: f.type for f in fields(BenchConfig)}
    if key not in types:
        close = difflib.get_close_matches(key, list(types), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(types)}"
        raise UsageError(f"--vs key {key!r} is not a bench option{hint}")
    kind = str(types[key])  # annotations are strings under `from __future__ import annotations`
    try:
        if value.lower() in ("none", "") and kind.startswith("Optional"):
            return None
        if "bool" in kind:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
        return value
    except ValueError:
        raise UsageError(f"--vs {key}={value!r}: expected {kind}") from None


@dataclass
class Workload:
    """What one configuration runs: `step()` processes one batch of `batch` images."""

    config: BenchConfig
    resolution: int
    step: Callable[[], None]
    info: Dict[str, Any]


def _build_model(cfg: BenchConfig):
    import torch

    from ipu_effnet.models import create_model

    torch.manual_seed(0)  # same weights for A and B where their shapes agree
    try:
        model = create_model(cfg.model, num_classes=cfg.num_classes, norm=cfg.norm, group_size=cfg.group_size,
                             expand_ratio=cfg.expand_ratio)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.proxy_impl is not None:
        from norms.proxy import ProxyNormAct
        from norms.proxy_ops import check_impl

        for module in model.modules():
            if isinstance(module, ProxyNormAct):
                try:
                    module.impl = check_impl(cfg.proxy_impl, module.act)
                except ValueError as exc:
                    raise UsageError(f"proxy_impl {cfg.proxy_impl!r}: {exc}") from None
    res = cfg.res or getattr(model, "train_resolution", None) or getattr(model, "default_resolution", 224)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(cfg.batch, 3, res, res).contiguous(memory_format=memory_format)
    return model, images, res


def _train_workload(cfg: BenchConfig) -> Workload:
    """Forward + cross-entropy + backward + SGD step (momentum 0.9, the recipe's weight-decay groups)."""
    import torch
    import torch.nn.functional as F

    from ipu_effnet.training.param_groups import param_groups

    model, images, res = _build_model(cfg)
    model.train()
    targets = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.SGD(param_groups(model, weight_decay=1e-5), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimiser.step()

    params = sum(p.numel() for p in model.parameters())
    return Workload(cfg, res, step, {"params": params})


def _infer_workload(cfg: BenchConfig) -> Workload:
    """Forward only, eval mode, under torch.no_grad()."""
    import torch

    model, images, res = _build_model(cfg)
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(images)

    params = sum(p.numel() for p in model.parameters())
    return Workload(cfg, res, step, {"params": params})


WORKLOADS: Dict[str, Callable[[BenchConfig], Workload]] = {
    "train": _train_workload,
    "infer": _infer_workload,
}


def build_workload(cfg: BenchConfig) -> Workload:
    return WORKLOADS[cfg.validate().mode](cfg)


def _set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Timing:
    """One round of one configuration: images per wall-clock second, and per second of this process's
    CPU time (all threads). On a shared machine the wall figure drops when other jobs take the cores;
    the CPU figure much less, so it is the steadier one for A/B ratios with one thread."""

    images_per_s: float
    images_per_cpu_s: float


def measure(workload: Workload) -> Timing:
    """Run `warmup` untimed steps, then `steps` timed ones."""
    cfg = workload.config
    _set_threads(cfg.threads)
    for _ in range(cfg.warmup):
        workload.step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(cfg.steps):
        workload.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = cfg.batch * cfg.steps
    return Timing(images / wall, images / max(cpu, 1e-9))


@dataclass
class ConfigResult:
    config: BenchConfig
    resolution: int
    timings: List[Timing]
    info: Dict[str, Any]

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
                "images_per_s": [round(v, 4) for v in self.images_per_s], "median": round(self.median, 4),
                "min": round(min(self.images_per_s), 4), "max": round(max(self.images_per_s), 4),
                "spread": round(self.spread, 4),
                "images_per_cpu_s": [round(v, 4) for v in self.images_per_cpu_s],
                "median_cpu": round(self.median_cpu, 4), **self.info}


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

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"repeats": self.repeats, "environment": self.environment,
                               "results": [r.to_dict() for r in self.results]}
        if self.ratio is not None:
            out["ratio"] = round(self.ratio, 4)
            out["ratio_cpu"] = round(self.ratio_cpu, 4)
            out["paired_ratios"] = [round(r, 4) for r in self.paired_ratios]
        return out


def environment() -> Dict[str, Any]:
    import os
    import platform

    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def run_bench(configs: Sequence[BenchConfig], repeats: int = 3,
              progress: Optional[Callable[[str], None]] = None) -> BenchReport:
    """Measure each configuration `repeats` times, interleaved round by round (A, B, A, B, ...).

    All workloads are built before the first timed step, so a bad option fails early and building
    does not disturb the timings.
    """
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    if not 1 <= len(configs) <= len(_NAMES):
        raise UsageError(f"bench compares 1 to {len(_NAMES)} configurations, got {len(configs)}")
    workloads = [build_workload(cfg) for cfg in configs]
    results = [ConfigResult(w.config, w.resolution, [], w.info) for w in workloads]
    for round_index in range(repeats):
        for name, w, r in zip(_NAMES, workloads, results):
            r.timings.append(measure(w))
            if progress is not None:
                t = r.timings[-1]
                progress(f"round {round_index + 1}/{repeats} {name}: {t.images_per_s:.2f} img/s, "
                         f"{t.images_per_cpu_s:.2f} img/cpu-s")
    return BenchReport(results, repeats, environment())


_NAMES = "ABCDEFGH"


def _change(ratio: float) -> str:
    change = ratio - 1.0
    return f"{abs(change):.1%} {'faster' if change >= 0 else 'slower'}"


def format_report(report: BenchReport) -> str:
    """Human text: one line per configuration, then the ratio B/A."""
    first = report.results[0]
    what = ("training step (forward + cross-entropy + backward + SGD)" if first.config.mode == "train"
            else "inference (forward, eval mode, no grad)")
    env = report.environment
    order = ", alternating" if len(report.results) > 1 else ""
    lines = [f"bench: {what}; torch {env['torch']}; {report.repeats} rounds{order}, "
             f"{first.config.warmup} warm-up + {first.config.steps} timed steps each"]
    for name, r in zip(_NAMES, report.results):
        if r is first:
            label = f"{r.config.label()} res={r.resolution}"
        else:
            label = f"as A with {r.config.label(first.config)}"
        lines.append(f"  {name} {r.median:8.2f} img/s (min {min(r.images_per_s):.2f}, max {max(r.images_per_s):.2f}, "
                     f"spread {r.spread:.1%}), {r.median_cpu:.2f} img/cpu-s  {label}")
    if report.ratio is not None:
        paired = ", ".join(f"{x:.3f}" for x in report.paired_ratios)
        lines.append(f"  B/A = {report.ratio:.3f}: B is {_change(report.ratio)} (per round: {paired}); "
                     f"by CPU time {report.ratio_cpu:.3f}")
    if env.get("load_average") and env.get("cpus") and env["load_average"][0] > env["cpus"]:
        lines.append(f"  note: load average {env['load_average'][0]} on {env['cpus']} CPUs: other jobs share "
                     f"the machine, trust the CPU-time ratio more")
    return "\n".join(lines)
