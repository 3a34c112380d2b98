"""Throughput measurement: images per second of a training or inference step, A against B in one process.

Speed on a shared CPU drifts by more than the differences worth measuring (Proxy Norm's few per cent),
so a comparison runs both configurations in the same process, alternately (A, B, A, B, ... for
`repeats` rounds), and reports the median of each and the ratio of the medians. Each round runs
`warmup` untimed steps, then `steps` timed ones.

    from ipu_effnet.analysis.bench import BenchConfig, run_bench
    a = BenchConfig(model="efficientnet_b0_g16", norm="layer", res=160, batch=16)
    report = run_bench([a, a.with_overrides("norm=layer+proxy")], repeats=5)
    print(format_report(report))

Layout: a `BenchConfig` says what to run (model, norm, resolution, batch, device, precision, the
implementation: ours or the peer geffnet, ...); a *workload* factory (`WORKLOADS[mode]`: train, infer,
data) builds the model or loader, inputs and a `step()` closure once; `measure` times a workload;
`run_bench` interleaves configurations and then measures each one's peak memory (in a fresh process
on the CPU, see MEMORY_STEPS). The output format (text and --json) is described in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import difflib
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ipu_effnet.errors import UsageError

MODES = ("train", "infer", "data")
DEVICES = ("cpu", "cuda", "ipu")
PRECISIONS = ("fp32", "bf16", "fp16")
IMPLS = ("ours", "geffnet")  # geffnet: the benchmark-only peer (requirements-bench.txt)
GEFFNET_INSTALL = "pip install --no-deps geffnet==1.0.2"  # --no-deps: geffnet declares torchvision

# Fields shown in a configuration's label even at their default value; the rest only when changed.
_ALWAYS_SHOWN = ("norm", "batch", "threads", "channels_last")
_NEVER_SHOWN = ("model", "res", "steps", "warmup", "num_classes", "mode")
_DATA_FIELDS = ("data_path", "preprocess", "workers", "draft", "decoder", "resampler", "data_images", "jpeg_size")
PREPROCESSING = ("train", "eval")  # data mode: TrainTransform (random-resized crop + flip) or EvalTransform
_MODEL_FIELDS = ("norm", "group_size", "expand_ratio", "channels_last", "precision", "impl", "fold_bn",
                 "compile", "proxy_impl", "threads")


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure. res=None means the model's native training resolution;
    threads=None leaves torch's thread count as it is.

    mode "data" times the training data loader instead of the model: RandomResizedCrop to `res`, flip,
    uint8 batches of `batch`, from `data_path` (an ImageNet-style folder with train/<class>/<image>) or,
    without it, from `data_images` generated JPEGs of `jpeg_size` ("WIDTHxHEIGHT") in a temporary folder;
    `draft=False` decodes every JPEG at full size before resizing (the comparison for reduced-scale decoding);
    `decoder` and `resampler` are `data.jpeg_decoder` and `data.resampler` (data/decode.py): "pillow" for
    both, with draft=False, is the plain decode-everything-then-resize baseline. `preprocess="eval"` times
    the evaluation preprocessing instead (resize to res / 0.875, centre crop; always the Pillow resampler).
    """

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
    device: str = "cpu"
    precision: str = "fp32"  # bf16 / fp16: autocast (fp16 on CUDA only); weights and optimiser stay fp32
    impl: str = "ours"
    fold_bn: bool = True  # inference: BatchNorm folded, Proxy Norm's statistics frozen (models/fuse.py)
    compile: bool = False  # torch.compile the model (torch >= 2.0)
    data_path: Optional[str] = None
    preprocess: str = "train"
    workers: int = 0
    draft: bool = True
    decoder: str = "auto"
    resampler: str = "auto"
    data_images: int = 64
    jpeg_size: str = "500x375"

    def validate(self) -> BenchConfig:
        """Cheap checks (no torch import); raises UsageError naming the option."""
        from ipu_effnet.config import JPEG_DECODERS, RESAMPLERS
        from norms import as_norm_spec

        for key, valid in (("mode", MODES), ("device", DEVICES), ("precision", PRECISIONS), ("impl", IMPLS),
                           ("decoder", JPEG_DECODERS), ("resampler", RESAMPLERS), ("preprocess", PREPROCESSING)):
            if getattr(self, key) not in valid:
                raise UsageError(f"{key} {getattr(self, key)!r}: expected one of {', '.join(valid)}")
        try:
            as_norm_spec(self.norm)
        except ValueError as exc:
            raise UsageError(f"norm {self.norm!r}: {exc}") from None
        for key in ("batch", "steps", "num_classes", "data_images"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup", "workers"):
            if getattr(self, key) < 0:
                raise UsageError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.proxy_impl is not None:
            from norms.proxy_ops import IMPLS as PROXY_IMPLS

            if self.proxy_impl not in PROXY_IMPLS:
                raise UsageError(f"proxy_impl {self.proxy_impl!r}: expected one of {', '.join(PROXY_IMPLS)}")
        if self.res is not None and self.res < 32:
            raise UsageError(f"res {self.res}: the resolution must be at least 32 (five stride-2 stages)")
        if self.precision == "fp16" and self.device == "cpu":
            raise UsageError("precision fp16: autocast to float16 needs device cuda (on CPU use bf16)")
        self.jpeg_dims()
        if self.impl == "geffnet":
            if self.norm != "batch" or self.group_size not in (None, 1) or self.expand_ratio is not None \
                    or self.proxy_impl is not None:
                raise UsageError("impl geffnet: geffnet builds only the published models (norm batch, no "
                                 "group_size, expand_ratio or proxy_impl)")
            if not (self.model.startswith("efficientnet_b") and self.model[len("efficientnet_b"):].isdigit()):
                raise UsageError(f"impl geffnet: model {self.model!r} has no geffnet counterpart; "
                                 "expected efficientnet_b0 ... efficientnet_b7")
        return self

    def jpeg_dims(self) -> Tuple[int, int]:
        width, sep, height = self.jpeg_size.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) >= 8 and int(height) >= 8):
            raise UsageError(f"jpeg_size {self.jpeg_size!r}: expected WIDTHxHEIGHT, e.g. 500x375")
        return int(width), int(height)

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
        defaults = BenchConfig()
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if reference is not None:
                if getattr(reference, f.name) != value:
                    parts.append(f"{f.name}={value}")
            elif f.name == "model":
                if self.mode != "data":
                    parts.append(value)
            elif not self._shown(f.name):
                continue
            elif f.name == "channels_last":
                parts.append("channels-last" if value else "nchw")
            elif value is not None and (f.name in _ALWAYS_SHOWN or value != getattr(defaults, f.name)):
                parts.append(f"{f.name}={value}")
        return " ".join(parts) or "(no difference)"


    def _shown(self, name: str) -> bool:
        """Whether a field belongs in this mode's label (data fields in the data mode, model fields otherwise)."""
        if name in _NEVER_SHOWN:
            return False
        if self.mode == "data":
            return name in _DATA_FIELDS or name not in _MODEL_FIELDS
        return name not in _DATA_FIELDS


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


def _geffnet_model(cfg: BenchConfig):
    """geffnet's model of the same name, with our variant's dropout and drop-path rates (geffnet's
    defaults are 0 for both), so that both networks do the same work."""
    try:
        import geffnet
    except ImportError:
        raise UsageError(f"impl geffnet needs the benchmark-only peer geffnet, which is not installed: "
                         f"{GEFFNET_INSTALL} (see requirements-bench.txt)") from None
    from ipu_effnet.models.factory import get_model_def

    mdef = get_model_def(cfg.model)
    return geffnet.create_model(cfg.model, num_classes=cfg.num_classes, drop_rate=mdef.drop_rate,
                                drop_connect_rate=0.2)


def _build_model(cfg: BenchConfig):
    import torch

    from ipu_effnet.models import create_model

    torch.manual_seed(0)  # same weights for A and B where their shapes agree
    if cfg.impl == "geffnet":
        model = _geffnet_model(cfg)
    else:
        try:
            model = create_model(cfg.model, num_classes=cfg.num_classes, norm=cfg.norm,
                                 group_size=cfg.group_size, expand_ratio=cfg.expand_ratio)
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
    from ipu_effnet.models.factory import native_resolution

    res = cfg.res or getattr(model, "train_resolution", None) or native_resolution(cfg.model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    device = _torch_device(cfg)
    model = model.to(device=device, memory_format=memory_format)
    images = torch.randn(cfg.batch, 3, res, res).to(device).contiguous(memory_format=memory_format)
    return model, images, res


def _torch_device(cfg: BenchConfig):
    import torch

    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        return torch.device("cuda")
    return torch.device("cpu")  # the IPU path converts a CPU model


def _autocast(cfg: BenchConfig):
    """A context for one step: autocast to bf16/fp16, or nothing for fp32 (and on the IPU, where
    poptorch takes the precision from the model)."""
    import contextlib

    import torch

    if cfg.precision == "fp32" or cfg.device == "ipu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=cfg.device, dtype=dtype)


def _sync(cfg: BenchConfig) -> Callable[[], None]:
    if cfg.device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _maybe_compile(model, cfg: BenchConfig):
    if not cfg.compile:
        return model
    import torch

    if not hasattr(torch, "compile"):
        raise UsageError(f"compile: torch {torch.__version__} has no torch.compile (needs torch >= 2.0)")
    return torch.compile(model)


def _train_workload(cfg: BenchConfig) -> Workload:
    """Forward + cross-entropy + backward + SGD step (momentum 0.9, the recipe's weight-decay groups)."""
    import torch
    import torch.nn.functional as F

    from ipu_effnet.training.param_groups import param_groups

    model, images, res = _build_model(cfg)
    model.train()
    targets = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=torch.Generator().manual_seed(0))
    targets = targets.to(images.device)
    params = sum(p.numel() for p in model.parameters())
    if cfg.device == "ipu":
        return _ipu_train_workload(cfg, model, images, targets, res, params)
    optimiser = torch.optim.SGD(param_groups(model, weight_decay=1e-5), lr=1e-3, momentum=0.9)
    forward = _maybe_compile(model, cfg)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with _autocast(cfg):
            loss = F.cross_entropy(forward(images), targets)
        loss.backward()
        optimiser.step()

    return Workload(cfg, res, step, {"params": params}, sync=_sync(cfg))


def _inference_model(model, cfg: BenchConfig):
    """The eval-mode model inference runs: ours with BatchNorm folded into the convolutions and Proxy
    Norm's statistics frozen (`models.fuse.inference_copy`) unless fold_bn=False."""
    model.eval()
    if cfg.fold_bn and cfg.impl == "ours":
        from ipu_effnet.models.fuse import inference_copy

        model = inference_copy(model)
    return model


def _infer_workload(cfg: BenchConfig) -> Workload:
    """Forward only, eval mode, under torch.no_grad() (models.fuse.inference_copy unless fold_bn=False)."""
    import torch

    model, images, res = _build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    model = _inference_model(model, cfg)
    info = {"params": params, "params_run": sum(p.numel() for p in model.parameters())}
    if cfg.device == "ipu":
        poptorch = _import_poptorch()
        executor = poptorch.inferenceModel(model)
        return Workload(cfg, res, lambda: executor(images), info)
    forward = _maybe_compile(model, cfg)

    def step() -> None:
        with torch.no_grad(), _autocast(cfg):
            forward(images)

    return Workload(cfg, res, step, info, sync=_sync(cfg))


def _import_poptorch():
    from ipu_effnet.backends.ipu import import_poptorch

    return import_poptorch()


def _ipu_train_workload(cfg: BenchConfig, model, images, targets, res: int, params: int) -> Workload:
    """poptorch.trainingModel over model + loss (poptorch's default options: one IPU, one device
    iteration), stepped with poptorch's SGD: the throughput poptorch delivers for this configuration."""
    import torch.nn as nn
    import torch.nn.functional as F

    poptorch = _import_poptorch()

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return poptorch.identity_loss(F.cross_entropy(self.model(x), y), reduction="none")

    wrapped = WithLoss()
    optimiser = poptorch.optim.SGD(wrapped.parameters(), lr=1e-3, momentum=0.9)
    executor = poptorch.trainingModel(wrapped, optimizer=optimiser)
    return Workload(cfg, res, lambda: executor(images, targets), {"params": params})


_JPEG_FOLDERS: Dict[Tuple[int, int, int], Any] = {}  # (count, width, height) -> TemporaryDirectory


def generated_jpeg_folder(count: int, width: int, height: int) -> str:
    """An ImageNet-style folder (train/<class>/<n>.JPEG) of `count` JPEGs of width x height, made once per
    process and removed at exit. The pictures are smooth colour fields with noise and edges, quality 90,
    so that their file size (and decoding cost) is near an ImageNet photograph's (~100 kB at 500 x 375)."""
    key = (count, width, height)
    if key not in _JPEG_FOLDERS:
        import os
        import tempfile

        import numpy as np
        from PIL import Image

        folder = tempfile.TemporaryDirectory(prefix="ipu_effnet_bench_jpeg_")
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        for i in range(count):
            class_dir = os.path.join(folder.name, "train", f"class{i % 4}")
            os.makedirs(class_dir, exist_ok=True)
            fx, fy, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
            base = 127 + 100 * np.sin(xs[..., None] * fx + ys[..., None] * fy + phase)
            noise = rng.normal(0, 18, (height, width, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(class_dir, f"{i}.JPEG"), quality=90)
        _JPEG_FOLDERS[key] = folder
    return _JPEG_FOLDERS[key].name


class _Cycle:
    """A dataset repeated `length` times over (so that a round never ends an epoch and respawns workers)."""

    def __init__(self, base: Any, length: int) -> None:
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.base[index % len(self.base)]

    def reseed(self, seed: int) -> None:
        self.base.reseed(seed)


def _data_workload(cfg: BenchConfig) -> Workload:
    """Batches from the training loader: decode, RandomResizedCrop to res, flip, collate (uint8)."""
    import os

    from ipu_effnet.data.datasets import ImageFolderDataset
    from ipu_effnet.data.loader import create_loader
    from ipu_effnet.data.transforms import TrainTransform

    res = cfg.res or 224
    if cfg.data_path is not None:
        if not os.path.isdir(cfg.data_path):
            raise UsageError(f"data_path {cfg.data_path!r} is not a folder; expected an ImageNet-style "
                             "folder with train/<class>/<image>")
        root = cfg.data_path
    else:
        root = generated_jpeg_folder(cfg.data_images, *cfg.jpeg_dims())
    from ipu_effnet.data.decode import resolve_resampler
    from ipu_effnet.data.transforms import EvalTransform

    if cfg.preprocess == "eval":
        transform = EvalTransform(res, decoder=cfg.decoder, draft=cfg.draft)
        resampler = "pillow"
    else:
        transform = TrainTransform(res, draft=cfg.draft, decoder=cfg.decoder, resampler=cfg.resampler)
        resampler = resolve_resampler(cfg.resampler, in_worker=cfg.workers > 0 or cfg.threads == 1)
    dataset = ImageFolderDataset(root, "train", transform=transform)
    cycle = _Cycle(dataset, 10 ** 6)
    loader = create_loader(cycle, cfg.batch, train=True, workers=cfg.workers, seed=0,
                           pin_memory=cfg.device == "cuda")
    state: Dict[str, Any] = {}

    def begin() -> None:
        state["it"] = iter(loader)

    def step() -> None:
        next(state["it"])

    def end() -> None:
        state.pop("it", None)  # dropping the iterator shuts its workers down

    info = {"images": len(dataset), "workers": cfg.workers, "data_path": cfg.data_path or "(generated)",
            "decoder": transform.decoder, "resampler": resampler}
    return Workload(cfg, res, step, info, begin=begin, end=end)


WORKLOADS: Dict[str, Callable[[BenchConfig], Workload]] = {
    "train": _train_workload,
    "infer": _infer_workload,
    "data": _data_workload,
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
    the CPU figure much less, so it is the steadier one for A/B ratios with one thread. (Loader workers
    are other processes: in the data mode with workers > 0 the CPU figure counts the main process only.)"""

    images_per_s: float
    images_per_cpu_s: float
    peak_bytes: Optional[int] = None  # CUDA: torch.cuda.max_memory_allocated over this round


def measure(workload: Workload) -> Timing:
    """Run `warmup` untimed steps, then `steps` timed ones."""
    cfg = workload.config
    _set_threads(cfg.threads)
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
    _set_threads(cfg.threads)
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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    return run_memory_probe("ipu_effnet.analysis.bench:memory_probe", asdict(cfg),
                            f"bench memory probe for {cfg.label()}", timeout)


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
    env = environment()  # the load average right after the timed rounds
    if memory:
        for name, r in zip(_NAMES, results):
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


_NAMES = "ABCDEFGH"


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
    what = {"train": "training step (forward + cross-entropy + backward + SGD)",
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
    for name, r in zip(_NAMES, report.results):
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
