"""The torch pipeline backend: `ipu.pipeline_splits` drive torch.distributed.pipelining, one rank per stage.

    torchrun --nproc_per_node 2 -m ipu_effnet train --config X --set backend=pipeline
    runner = prepare("pipeline", training_model, optimizer, cfg, device=device)   # under torchrun
    metrics = runner.step(images, labels)       # {"loss", "correct", "samples"}, like TorchRunner

The same split names that start `poptorch.BeginBlock` stages on IPUs (ipu_effnet/pipeline/splits.py)
cut the network into `len(splits) + 1` stages; rank k runs stage k (gloo on CPU, NCCL on CUDA), so the
world size must equal the number of stages: one pipeline, no data parallelism across pipelines. A step
is one `ScheduleGPipe` or `Schedule1F1B` (`distributed.pipeline_schedule`) over `train.grad_accum`
micro-batches, then one optimiser step on every rank. Design (docs/pipeline.md, "The torch pipeline
backend"):

- Stages are built by hand from the module paths, not traced: the network's forward is a fixed
  sequence (stem, blocks, head, pool + flatten, dropout, classifier), so a stage is a slice of it. A
  split at a block (`blocks.3.0`, or its alias `blocks.3.0.conv_pw`) sends one tensor; a split inside
  a block at one of its direct children (`blocks.3.0.conv_dw`, the planner's inner points) also sends
  the block input, which the next stage adds back as the residual. Blocks that a split does not cut run
  their own forward; a cut block (MBConv, Fused-MBConv) runs its children in order, which a test checks
  against the block's forward. Splits deeper than a block's direct children are rejected, naming the
  nearest usable split.
- The first stage normalises the uint8 images (TrainingModel.normalize), mixes them and casts them; the
  last stage's output is the logits, and the schedule's loss_fn is TrainingModel.loss (label smoothing
  included) over the mixed targets, the same functions as in TrainingModel.forward. Mixup and cutmix
  coefficients are drawn on rank 0 from torch's global generator, per micro-batch in TrainingModel's
  order (mixup, then the cutmix box), and broadcast: the first stage mixes the images with them, the last
  stage weighs the targets with them (`mix_targets`). They reach the stages as inputs the schedule splits
  into micro-batches: per-image coefficients, and one box row per micro-batch, as on the IPU.
- Every rank holds the whole TrainingModel and an optimiser over all of it (EfficientNet's weights are
  small next to its activations); only the stage's parameters get gradients, so only they change.
  `sync_weights_to_host()` broadcasts each stage's parameters, buffers and optimiser state from its rank
  to every rank, so after it every rank holds the full trained model: the loop calls it at epoch ends,
  then evaluates the full model, averages weights and (rank 0) writes an ordinary checkpoint, the same
  as the torch backend's (a pipeline run resumes or fine-tunes with either backend).
- Every rank reads the same host batches (the first stage uses the images, the last the labels). The
  last stage computes the loss and top-1 hits and broadcasts them, so every rank reports the same metrics.
- Precision: fp32 or bf16 autocast per stage; fp16 (16.x on CUDA) needs a gradient scaler across stages
  and is rejected.

torch.distributed.pipelining is newer than poptorch's torch 2.0, so it is imported only here, with a
UsageError when it is missing.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ipu_effnet.backends.runner import Reduce, Runner
from ipu_effnet.errors import UsageError
from ipu_effnet.pipeline.splits import stage_starts
from ipu_effnet.training.model import mix_batch, mix_targets

__all__ = [
    "PIPELINING_MISSING",
    "PipelineRunner",
    "Step",
    "StageModule",
    "build_stage_steps",
    "import_pipelining",
    "prepare_pipeline",
    "stage_modules",
]

PIPELINING_MISSING = ("backend 'pipeline' needs torch.distributed.pipelining (torch >= 2.4; this torch is {version}, "
                      "e.g. the SDK's 2.0 for poptorch): use a newer torch, or backend=torch / backend=ipu")
TOP_LEVEL = ("stem", "blocks", "head", "pool", "dropout", "classifier")  # EfficientNet.forward, in order
SPLITTABLE_BLOCKS = ("MBConv", "FusedMBConv")  # forward = direct children in order, drop_path on the residual
KEY = "ipu.pipeline_splits"


def import_pipelining() -> Any:
    """torch.distributed.pipelining, or UsageError saying it needs a newer torch."""
    try:
        pipelining = importlib.import_module("torch.distributed.pipelining")
    except ImportError:
        raise UsageError(PIPELINING_MISSING.format(version=torch.__version__)) from None
    return pipelining


# ----------------------------------------------------------------------------------------------------
# Cutting the network into stages


@dataclass(frozen=True)
class Step:
    """One piece of the forward. kind: `module` (y = module(y)); `enter` (a block starts: keep y as the
    shortcut if the block has a residual); `residual` (y = shortcut + block.drop_path(y)); `pool`
    (y = pool(y).flatten(1)). `block` is the enclosing block's path for the block-level kinds."""

    kind: str
    path: str
    block: Optional[str] = None


def _body(block: nn.Module) -> List[str]:
    """A splittable block's children in forward order, drop_path (applied to the residual) left out."""
    return [name for name, _ in block.named_children() if name != "drop_path"]


def _atoms(model: nn.Module) -> List[Step]:
    """The forward as a flat list, at the finest level a split may cut: block children."""
    for name in TOP_LEVEL:
        if not hasattr(model, name):
            raise UsageError(f"backend 'pipeline' needs an EfficientNet-shaped model ({', '.join(TOP_LEVEL)}); "
                             f"{type(model).__name__} has no {name!r}")
    atoms = [Step("module", "stem")]
    for path in model.block_paths():
        block = model.get_submodule(path)
        atoms.append(Step("enter", path, path))
        if type(block).__name__ in SPLITTABLE_BLOCKS:
            atoms.extend(Step("module", f"{path}.{child}", path) for child in _body(block))
        else:
            atoms.append(Step("module", path, path))  # runs whole: no split inside it
        atoms.append(Step("residual", path, path))
    atoms += [Step("module", "head"), Step("pool", "pool"), Step("module", "dropout"), Step("module", "classifier")]
    return atoms


def _split_index(model: nn.Module, atoms: Sequence[Step], split: str) -> int:
    """Index of the atom that starts the stage named by `split`."""
    if split == "stem":
        raise UsageError(f"{KEY}: 'stem' starts the model; the first stage begins there anyway")
    parts = split.split(".")
    if split == "blocks":
        parts = ["blocks", "0", "0"]
    if parts[0] == "blocks" and len(parts) == 2:  # a stage of blocks: its first block
        split = f"{split}.0"
        parts.append("0")
    if parts[0] == "blocks" and len(parts) >= 3:
        block_path = ".".join(parts[:3])
        enter = next(i for i, a in enumerate(atoms) if a.kind == "enter" and a.path == block_path)
        if len(parts) == 3:
            return enter
        block = model.get_submodule(block_path)
        nxt = _next_block(model, block_path)
        if type(block).__name__ not in SPLITTABLE_BLOCKS:
            raise UsageError(f"{KEY}: {split!r} lies inside a {type(block).__name__} block, which backend "
                             f"'pipeline' cannot cut; nearest splits it supports: {block_path}, {nxt}")
        body = _body(block)
        child = parts[3]
        if child not in body:  # drop_path: part of the residual sum
            raise UsageError(f"{KEY}: {split!r} is part of {block_path}'s residual sum; nearest splits backend "
                             f"'pipeline' supports: {block_path}, {nxt}")
        if len(parts) > 4:
            raise UsageError(f"{KEY}: {split!r} lies inside {block_path}.{child}; backend 'pipeline' cuts a block "
                             f"only between its direct children: nearest splits {block_path}.{child}, "
                             f"{_next_child(block_path, body, child, nxt)}")
        if body.index(child) == 0:
            return enter  # nothing of the block runs before its first child: the same as the block split
        return next(i for i, a in enumerate(atoms) if a.kind == "module" and a.path == f"{block_path}.{child}")
    top = parts[0]
    if len(parts) > 1:
        nxt = TOP_LEVEL[TOP_LEVEL.index(top) + 1] if TOP_LEVEL.index(top) + 1 < len(TOP_LEVEL) else None
        near = top if top != "stem" else "blocks.0.0"
        raise UsageError(f"{KEY}: {split!r} lies inside {top}, which backend 'pipeline' does not cut; nearest "
                         f"splits it supports: {near}" + (f", {nxt}" if nxt and nxt != "blocks" else ""))
    return next(i for i, a in enumerate(atoms) if a.path == top)


def _next_block(model: nn.Module, block_path: str) -> str:
    paths = model.block_paths()
    i = paths.index(block_path)
    return paths[i + 1] if i + 1 < len(paths) else "head"


def _next_child(block_path: str, body: List[str], child: str, nxt: str) -> str:
    i = body.index(child)
    return f"{block_path}.{body[i + 1]}" if i + 1 < len(body) else nxt


def build_stage_steps(model: nn.Module, splits: Sequence[str]) -> List[List[Step]]:
    """The steps of each of the `len(splits) + 1` stages. A block that lies wholly inside a stage becomes
    one `module` step (its own forward); a block a split cuts keeps its children as separate steps.
    UsageError for a split that names no module, is out of order, cuts where this backend cannot, or
    leaves a stage empty."""
    stage_starts(model, splits, KEY)  # existence (with the nearest valid paths) and forward order
    atoms = _atoms(model)
    bounds = [0] + [_split_index(model, atoms, s) for s in splits] + [len(atoms)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b <= a:
            raise UsageError(f"{KEY}: {list(splits)!r} leaves stage {k} empty ({splits[k - 1]!r} and "
                             f"{splits[k]!r} start the same point); drop one of them")
    stages = []
    for a, b in zip(bounds, bounds[1:]):
        chunk = atoms[a:b]
        steps: List[Step] = []
        i = 0
        while i < len(chunk):
            atom = chunk[i]
            if atom.kind == "enter":
                end = next((j for j in range(i, len(chunk)) if chunk[j].kind == "residual"
                            and chunk[j].block == atom.block), None)
                if end is not None:  # the whole block is on this stage: its own forward
                    steps.append(Step("module", atom.block, atom.block))
                    i = end + 1
                    continue
            steps.append(atom)
            i += 1
        stages.append(steps)
    return stages


def stage_modules(model: nn.Module, steps: Sequence[Step]) -> List[nn.Module]:
    """The modules whose parameters and buffers a stage owns (looked up now: set_dropout may swap one)."""
    return [model.get_submodule(s.path) for s in steps if s.kind in ("module", "pool")]


class StageModule(nn.Module):
    """One pipeline stage of a TrainingModel's network. Its parameters are the stage's own (what
    PipelineStage scales and the schedule differentiates); the TrainingModel is held by reference.

    forward(images[, mixup_coeffs][, cutmix_box]) on the first stage (uint8, normalised and mixed here; a
    box arrives as this micro-batch's (1, 4) row), forward(y[, shortcut]) on the others; returns y, or
    (y, shortcut) when the stage ends inside a residual block."""

    def __init__(self, training_model: nn.Module, steps: Sequence[Step], first: bool,
                 amp_dtype: Optional[torch.dtype] = None, device_type: str = "cpu", mixup: bool = False,
                 cutmix: bool = False) -> None:
        super().__init__()
        self._tm = (training_model,)  # a tuple: not registered, so parameters() is this stage's only
        self.steps = list(steps)
        self.first = first
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.mixup = mixup  # which mixing inputs the first stage takes (fixed per schedule)
        self.cutmix = cutmix
        self.parts = nn.ModuleList(stage_modules(training_model.model, self.steps))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def forward(self, *inputs: torch.Tensor):
        tm = self._tm[0]
        model = tm.model
        with self.autocast():
            if self.first:
                y = tm.normalize(inputs[0])
                if self.mixup or self.cutmix:
                    coeffs = inputs[1] if self.mixup else None
                    box = inputs[-1].reshape(4) if self.cutmix else None
                    no_labels = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
                    y = mix_batch(y, no_labels, coeffs, box)[0]
                y = y.to(tm.network_dtype())
                if tm.channels_last:
                    y = y.contiguous(memory_format=torch.channels_last)
                shortcut = None
            else:
                y = inputs[0]
                shortcut = inputs[1] if len(inputs) > 1 else None
            for step in self.steps:
                if step.kind == "module":
                    y = model.get_submodule(step.path)(y)
                elif step.kind == "enter":
                    block = model.get_submodule(step.path)
                    shortcut = y if getattr(block, "has_residual", False) else None
                elif step.kind == "residual":
                    if shortcut is not None:
                        y = shortcut + model.get_submodule(step.path).drop_path(y)
                    shortcut = None
                elif step.kind == "pool":
                    y = model.get_submodule(step.path)(y).flatten(1)
        return y if shortcut is None else (y, shortcut)


# ----------------------------------------------------------------------------------------------------
# The runner


def check_pipeline_config(cfg: Any, training_model: nn.Module, world_size: int, amp_dtype: Optional[torch.dtype]
                          ) -> int:
    """Everything a person can fix, before any communication; returns the number of stages."""
    splits = list(cfg.ipu.pipeline_splits)
    stages = len(splits) + 1
    if not splits:
        raise UsageError("backend 'pipeline' needs ipu.pipeline_splits: one module path per stage after the "
                         "first (`python -m ipu_effnet plan --config FILE --ipus N` chooses them)")
    if world_size != stages:
        raise UsageError(f"backend 'pipeline': ipu.pipeline_splits = {splits!r} makes {stages} stages, one rank "
                         f"each, but the world size is {world_size}; run torchrun --nproc_per_node {stages}")
    if amp_dtype == torch.float16:
        raise UsageError(f"train.precision = {cfg.train.precision!r} on CUDA is fp16, which needs loss scaling "
                         "across stages that backend 'pipeline' does not do; use 32.32 or bf16")
    schedule = cfg.distributed.pipeline_schedule
    if schedule == "1f1b" and cfg.train.grad_accum < stages:
        raise UsageError(f"train.grad_accum = {cfg.train.grad_accum}: the 1F1B schedule over {stages} stages needs "
                         f"at least {stages} micro-batches per step; raise train.grad_accum or set "
                         "distributed.pipeline_schedule=gpipe")
    return stages


class PipelineRunner(Runner):
    """Training steps of one pipeline stage (this rank's); the same `step` contract as TorchRunner.
    Validation runs the whole model on every rank, after `sync_weights_to_host` gave each rank every
    stage's weights (backends/runner.py has the interface)."""

    def __init__(self, training_model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                 device: Optional[torch.device] = None, log: Optional[Callable[[str], None]] = None) -> None:
        from ipu_effnet.training.precision import autocast_dtype

        self.pipelining = import_pipelining()
        self.device = device or torch.device("cpu")
        self.precision = cfg.train.precision
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        if not dist.is_available() or not dist.is_initialized():
            raise UsageError("backend 'pipeline' runs one rank per stage: start it with torchrun --nproc_per_node "
                             f"{len(cfg.ipu.pipeline_splits) + 1} (gloo on CPU, NCCL on CUDA)")
        self.num_stages = check_pipeline_config(cfg, training_model, dist.get_world_size(), self.amp_dtype)
        self.rank = dist.get_rank()
        self.training_model = training_model
        self.optimizer = optimizer
        self.grad_accum = int(cfg.train.grad_accum)
        self.schedule_name = cfg.distributed.pipeline_schedule
        self.splits = list(cfg.ipu.pipeline_splits)
        self.stage_steps = build_stage_steps(training_model.model, self.splits)
        self.is_first = self.rank == 0
        self.is_last = self.rank == self.num_stages - 1
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._schedule: Any = None
        self._key: Optional[Tuple[Any, ...]] = None
        self._mixing = (False, False)  # (mixup, cutmix) of the current schedule, for the loss
        self._size = (0, 0)  # image height and width, for the cutmix share in the loss
        if log is not None:
            log(f"pipeline: {self.num_stages} stages over {self.num_stages} ranks, splits {self.splits}; "
                f"{self.schedule_name} schedule over {self.grad_accum} micro-batches per step")

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """loss_fn of the last stage; `target` is one micro-batch of the packed rows (label[, mixup
        coefficient][, cutmix box]) that `step` builds."""
        labels = target[:, 0].long()
        mixup, cutmix = self._mixing
        coeffs = target[:, 1] if mixup else None
        box = target[0, -4:].long() if cutmix else None
        height, width = self._size
        targets, weights = mix_targets(labels, height, width, coeffs, box)
        return self.training_model.loss(logits, targets, weights)

    def schedule(self, shape: Tuple[int, ...], mixup: bool, cutmix: bool) -> Any:
        """The schedule for host batches of `shape` with these mixing inputs; rebuilt when either changes
        (progressive resizing and mixup stages), as the stages infer what they exchange from the first
        micro-batch."""
        key = (shape, mixup, cutmix)
        if self._schedule is None or key != self._key:
            p = self.pipelining
            module = StageModule(self.training_model, self.stage_steps[self.rank], first=self.is_first,
                                 amp_dtype=self.amp_dtype, device_type=self.device.type, mixup=mixup, cutmix=cutmix)
            stage = p.PipelineStage(module, self.rank, self.num_stages, self.device)
            cls = p.Schedule1F1B if self.schedule_name == "1f1b" else p.ScheduleGPipe
            # scale_grads: the gradients are the mean over micro-batches, as TorchRunner's loss / grad_accum
            self._schedule = cls(stage, n_microbatches=self.grad_accum, loss_fn=self._loss, scale_grads=True)
            self._key = key
            self._mixing = (mixup, cutmix)
            self._size = (shape[-2], shape[-1])
        return self._schedule

    def mixing_inputs(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Mixup coefficients (one per image) and cutmix boxes (one row per micro-batch), drawn on rank 0 in
        TrainingModel.forward's order (per micro-batch: mixup, then the box) and broadcast to every rank."""
        tm = self.training_model
        n, mb = images.shape[0], images.shape[0] // self.grad_accum
        extras = []
        if tm.mixup_alpha > 0 or tm.cutmix:
            coeffs = torch.zeros(n, dtype=torch.float32)
            boxes = torch.zeros(self.grad_accum, 4, dtype=torch.int64)
            if self.is_first:
                for i in range(self.grad_accum):
                    if tm.mixup_alpha > 0:
                        coeffs[i * mb:(i + 1) * mb] = tm.sample_mixup(mb)
                    if tm.cutmix:
                        boxes[i] = tm.sample_cutmix_box(images.shape[-2], images.shape[-1])
            if tm.mixup_alpha > 0:
                extras.append(coeffs.to(self.device))
            if tm.cutmix:
                extras.append(boxes.to(self.device))
            for t in extras:
                dist.broadcast(t, src=0)
        return extras

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        if images.shape[0] % self.grad_accum:
            raise ValueError(f"host batch of {images.shape[0]} is not a multiple of grad_accum {self.grad_accum}")
        tm = self.training_model
        tm.train()
        mixup, cutmix = tm.mixup_alpha > 0, tm.cutmix
        schedule = self.schedule(tuple(images.shape), mixup, cutmix)
        extras = self.mixing_inputs(images)
        losses: List[torch.Tensor] = []
        if self.is_first:
            schedule.step(images.to(self.device, non_blocking=True), *extras)
        elif self.is_last:
            labels = labels.to(self.device, non_blocking=True)
            # one row per image: label, mixup coefficient, its micro-batch's box (exact in fp64)
            rows = [labels.double().unsqueeze(1)]
            if mixup:
                rows.append(extras[0].double().unsqueeze(1))
            if cutmix:
                rows.append(extras[-1].double().repeat_interleave(images.shape[0] // self.grad_accum, 0))
            logits = schedule.step(target=torch.cat(rows, 1), losses=losses)
        else:
            schedule.step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.is_last:
            stats[0] = float(torch.stack([loss.detach().float() for loss in losses]).mean())
            stats[1] = float((logits.detach().argmax(1) == labels).sum())
        dist.broadcast(stats, src=self.num_stages - 1)
        return {"loss": float(stats[0]), "correct": int(stats[1]), "samples": int(images.shape[0])}

    def sync_weights_to_host(self) -> None:
        """Give every rank the whole model: each stage's parameters, buffers and optimiser state are
        broadcast from the rank that trains them. Collective: every rank calls it."""
        model = self.training_model.model
        owned = [stage_modules(model, steps) for steps in self.stage_steps]
        with torch.no_grad():
            for k, modules in enumerate(owned):
                for module in modules:
                    for tensor in list(module.parameters()) + list(module.buffers()):
                        dist.broadcast(tensor.data, src=k)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        for k, modules in enumerate(owned):
            payload: List[Any] = [None]
            if self.rank == k:
                payload = [{index[id(p)]: _pack(self.optimizer.state[p]) for m in modules for p in m.parameters()
                            if id(p) in index and p in self.optimizer.state}]
            dist.broadcast_object_list(payload, src=k, device=self.device if self.device.type == "cuda" else None)
            if self.rank != k:
                for i, state in payload[0].items():
                    self.optimizer.state[params[i]] = _unpack(state, params[i].device)

    def evaluate_loader(self, loader: Any, reduce: Optional[Reduce] = None,
                        batches: Optional[int] = None) -> Dict[str, float]:
        """The whole model on this rank's host copy (every rank reads the same batches)."""
        from ipu_effnet.training.evaluation import evaluate

        return evaluate(self.training_model, loader, self.device, self.precision, reduce=reduce)


def _pack(state: Dict[str, Any]) -> Dict[str, Any]:
    """Optimiser state on the CPU for broadcast_object_list; each tensor remembers whether it lived on the
    CPU (torch keeps some step counters there whatever the parameter's device)."""
    return {key: ((v.detach().cpu().clone(), v.device.type == "cpu") if isinstance(v, torch.Tensor) else v)
            for key, v in state.items()}


def _unpack(state: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    out = {}
    for key, v in state.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.Tensor):
            v = v[0] if v[1] else v[0].to(device)
        out[key] = v
    return out


def prepare_pipeline(training_model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                     device: Optional[torch.device] = None,
                     log: Optional[Callable[[str], None]] = None) -> PipelineRunner:
    return PipelineRunner(training_model, optimizer, cfg, device=device, log=log)
