"""The training loop: one flat function, with policy (schedule, averaging, checkpoints) in the small
functions it calls (nanoGPT's shape).

    summary = train(cfg, run_dir)                  # writes config.yaml, metrics.jsonl, summary.json,
                                                   # checkpoints/, tensorboard/ (training/tb.py) into run_dir
    summary = train(cfg, run_dir, resume=True)     # continue from run_dir's newest checkpoint

`train` runs a native recipe itself and hands `halfres` and `progressive` to the orchestrator
(`training/recipes.py`, `run_recipe`), which calls back into `train` once per phase with
`PhaseOptions`: the resolution, the stages (progressive resizing: resolution, dropout, RandAugment and
mixup per stage, epochs split evenly, one optimiser and schedule throughout), a network to start from,
frozen layers and evaluation preprocessing for the training images (fine-tuning).

Global batch = micro-batch x gradient accumulation x data-parallel ranks; the loader yields host
batches of micro-batch x accumulation images per rank. Checkpoints are written at epoch ends (every
`train.checkpoint_every` epochs and at the last), by rank 0 only; a resumed run restores the model,
optimiser, averager and RNG states and continues with the next epoch, and on CPU reproduces the
uninterrupted run exactly (the data order and augmentation are functions of the seed and the epoch).
Faults (`training/faults.py`): a SIGTERM/SIGINT checkpoints at the next step boundary, with the position
inside the epoch (the resumed run replays the loader past the steps done, so it continues exactly); a
non-finite step stops the run unless fp16 loss scaling absorbs it; the run directory is write-tested
before the first step; unreadable images are reported and counted between epochs.
At the last epoch, before its checkpoint, the averages' BatchNorm statistics are recomputed for the
averaged weights over `train.bn_recalibration_batches` training micro-batches (`training/bn_stats.py`;
combined over DDP ranks through the host collectives; not on the ipu backend, which says so), so the
weight-averaged evaluation and the checkpoint that fine-tuning starts from hold statistics that fit.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ipu_effnet.backends import resolve_backend
from ipu_effnet.backends.host_collectives import LocalCollectives, poprun_collectives, torch_collectives
from ipu_effnet.backends.torch_backend import TorchRunner, autocast_dtype
from ipu_effnet.config import Config, dump, model_kwargs, write_resolved
from ipu_effnet.data import create_dataset, create_loader
from ipu_effnet.data.randaugment import RandAugment
from ipu_effnet.errors import UsageError
from ipu_effnet.models import create_model, native_resolution
from ipu_effnet.training import faults
from ipu_effnet.training.averaging import WeightAverager, recalibrate_average
from ipu_effnet.training.bn_stats import has_batchnorm
from ipu_effnet.training.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_name,
    make_checkpoint,
    restore_checkpoint,
)
from ipu_effnet.training.freeze import default_first_trainable, freeze_before
from ipu_effnet.training.model import TrainingModel, resolve_channels_last
from ipu_effnet.training.optim import optimizer_from_config, set_lr
from ipu_effnet.training.schedules import schedule_from_config
from ipu_effnet.training.tb import TB_DIR, TensorBoardLog, want_tensorboard


@dataclass
class DistInfo:
    """This process's place in the run: torchrun rank (DDP) or poprun instance, and the host collectives
    between the processes (backends/host_collectives.py)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collectives: Any = field(default_factory=LocalCollectives)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a no-op alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    torch_collectives())


def init_poprun(cfg: Config, log: Callable[[str], None]) -> DistInfo:
    """poprun instances (not torch.distributed ranks): each trains its replicas on its own data shard;
    instance 0 logs and writes checkpoints; metrics and initial weights go through host collectives."""
    from ipu_effnet.backends.ipu import poprun_instance

    instance, instances = poprun_instance()
    return DistInfo(instance, instances, 0, poprun_collectives(cfg.distributed.host_collectives, instance,
                                                                instances, log=log if instance == 0 else None))


def all_reduce_sum(values: Dict[str, float], info: DistInfo) -> Dict[str, float]:
    if info.world_size == 1:
        return values
    return info.collectives.all_reduce_sum(values)


def train_resolution(cfg: Config) -> int:
    return cfg.model.resolution or native_resolution(cfg.model.name)


@dataclass
class Stage:
    """One stage of a phase: its training resolution and regularisation (None: leave as built)."""

    resolution: int
    dropout: Optional[float] = None  # the model's `dropout` module rate
    randaugment: Optional[float] = None  # RandAugment magnitude; None or 0: off
    mixup: float = 0.0  # TrainingModel.mixup_alpha


@dataclass
class PhaseOptions:
    """How one phase of a recipe differs from a plain run (recipes.py builds these)."""

    name: str = "train"
    stages: Optional[List[Stage]] = None  # None: one stage at train_resolution(cfg), the config's regularisation
    model: Optional[nn.Module] = None  # the network to start from (e.g. the weight-averaged one); None: a new one
    freeze: bool = False  # freeze the modules before `first_trainable` (fine-tuning)
    first_trainable: Optional[str] = None  # None with freeze: freeze.default_first_trainable
    eval_preprocessing: bool = False  # training images get the evaluation transform (fine-tuning)
    tensorboard_dir: Optional[Path] = None  # None: run_dir/tensorboard (training/tb.py)
    step_offset: int = 0  # added to this phase's steps in TensorBoard (a recipe's later phases)


def stage_index(epoch: int, num_epochs: int, num_stages: int) -> int:
    """The stage an epoch belongs to when `num_epochs` are split evenly over `num_stages`."""
    return min(num_stages - 1, epoch * num_stages // max(num_epochs, 1))


def set_dropout(model: nn.Module, rate: float) -> None:
    """Set the classifier dropout rate: `model.dropout` is nn.Dropout, or nn.Identity when built at 0."""
    if isinstance(model.dropout, nn.Dropout):
        model.dropout.p = float(rate)
    elif rate > 0:
        model.dropout = nn.Dropout(float(rate))  # no parameters: the optimiser is unaffected


def apply_stage(stage: Stage, model: nn.Module, tm: TrainingModel) -> None:
    if stage.dropout is not None:
        set_dropout(model, stage.dropout)
    tm.mixup_alpha = float(stage.mixup)


def stage_train_set(cfg: Config, stage: Stage, eval_preprocessing: bool) -> Any:
    augment = None
    if stage.randaugment and not eval_preprocessing:
        augment = RandAugment(stage.randaugment, cfg.train.randaugment_ops)
    return create_dataset(cfg.data, "train", stage.resolution, train=not eval_preprocessing,
                          num_classes=cfg.model.num_classes, seed=cfg.train.seed, randaugment=augment)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, precision: str = "32.32",
             info: Optional[DistInfo] = None) -> Dict[str, float]:
    """Top-1, top-5 (fractions) and mean cross entropy over every sample of the loader (all ranks)."""
    tm = model if isinstance(model, TrainingModel) else TrainingModel(model)
    was_training = tm.training
    tm.eval()
    amp = autocast_dtype(precision, device)
    ctx = torch.autocast(device_type=device.type, dtype=amp) if amp is not None else None
    sums = {"correct1": 0.0, "correct5": 0.0, "loss": 0.0, "samples": 0.0}
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if ctx is not None:
            with ctx:
                loss, logits = tm(images, labels)
        else:
            loss, logits = tm(images, labels)
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums["correct1"] += float(hit[:, 0].sum())
        sums["correct5"] += float(hit.any(1).sum())
        sums["loss"] += float(loss) * labels.shape[0]
        sums["samples"] += labels.shape[0]
    tm.train(was_training)
    sums = all_reduce_sum(sums, info or DistInfo())
    n = max(sums["samples"], 1.0)
    return {"top1": sums["correct1"] / n, "top5": sums["correct5"] / n, "loss": sums["loss"] / n,
            "samples": int(sums["samples"])}


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0 only): one JSON object per line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _progress(total: int, desc: str, enabled: bool, interval: float = 60.0):
    from ipu_effnet.console import progress_bar

    # tqdm on a terminal; a plain line every `interval` seconds in a log file
    return progress_bar(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, unit="step",
                        interval=interval)


def compile_only(runner: Any, train_loader: Any, val_loader: Any, cfg: Config, run_dir: Path,
                 say: Callable[[str], None]) -> Dict[str, Any]:
    """ipu.compile_only: compile the training and inference programs for the first batches' shapes into
    ipu.executable_cache, release them and return a summary naming the cache (nothing is trained)."""
    images, labels = next(iter(train_loader))
    eval_images, eval_labels = next(iter(val_loader))
    pad = runner.eval_batch - int(eval_labels.shape[0])
    if pad > 0:
        eval_images = torch.cat([eval_images, eval_images[:1].expand(pad, *eval_images.shape[1:])])
        eval_labels = torch.cat([eval_labels, eval_labels[:1].expand(pad)])
    runner.compile(images, labels, eval_images, eval_labels)
    runner.release()
    cache = str(Path(cfg.ipu.executable_cache).resolve())
    say(f"compile only: training and inference programs compiled into {cache}; nothing trained")
    summary = {"recipe": cfg.recipe, "compile_only": True, "executable_cache": cache}
    if run_dir.is_dir():
        with open(run_dir / "summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def train(cfg: Config, run_dir: os.PathLike, resume: bool = False, source: Optional[str] = None,
          overrides: Any = (), log: Callable[[str], None] = print,
          phase: Optional[PhaseOptions] = None) -> Dict[str, Any]:
    """Train as `cfg` says and return the summary also written to summary.json. Without `phase`, a recipe
    other than native goes to `recipes.run_recipe`; with it, this runs that one phase in `run_dir`."""
    if phase is None:
        if cfg.recipe != "native":
            from ipu_effnet.training.recipes import run_recipe

            return run_recipe(cfg, run_dir, resume=resume, source=source, overrides=overrides, log=log)
        phase = PhaseOptions()
    run_dir = Path(run_dir)
    use_tb = want_tensorboard(cfg.logging.tensorboard, log)  # true without the package: stop before any work
    info = init_distributed(cfg.distributed.backend)
    say = log if info.is_main else (lambda _msg: None)
    backend = resolve_backend(cfg.backend, log=say)
    if backend == "ipu":
        info = init_poprun(cfg, log)
        say = log if info.is_main else (lambda _msg: None)
    shard = (info.rank, info.world_size)  # this process's share of the data
    if backend == "pipeline":  # every rank is one stage of one pipeline: all read the same batches
        shard, info = (0, 1), DistInfo(rank=info.rank, world_size=1, local_rank=info.local_rank)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    ckpt = None
    resumed_from: Optional[Path] = None
    if resume:  # the newest checkpoint that loads: a truncated newest one is reported and skipped
        resumed_from, ckpt = faults.load_resume(run_dir, say)
        say(f"resuming from {resumed_from}")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_resolved(cfg, run_dir, source=source, overrides=overrides)
            for stale in ("metrics.jsonl", "summary.json"):
                (run_dir / stale).unlink(missing_ok=True)

    torch.manual_seed(info.collectives.broadcast_object(cfg.train.seed))  # one seed for every process
    stages = phase.stages or [Stage(train_resolution(cfg), None, cfg.train.randaugment_magnitude,
                                    cfg.train.mixup_alpha)]
    res = stages[-1].resolution
    eval_res = cfg.data.eval_resolution or res
    name, kwargs = model_kwargs(cfg)
    if phase.model is not None:
        model = phase.model
    else:
        try:
            model = create_model(name, **kwargs)
        except ValueError as exc:
            raise UsageError(f"model {name!r}: {exc}") from None
        if cfg.model.init_from and ckpt is None:  # pretrained weights in (a resumed run has its own)
            from ipu_effnet.models.importer import load_pretrained

            load_pretrained(model, cfg.model.init_from, cfg.model.init_format, log=say)
    frozen: List[str] = []
    first_trainable = None
    if phase.freeze:
        first_trainable = phase.first_trainable or default_first_trainable(model)
        frozen = freeze_before(model, first_trainable)
    train_set = stage_train_set(cfg, stages[0], phase.eval_preprocessing)
    classes = getattr(train_set, "classes", None)
    val_set = create_dataset(cfg.data, "validation", eval_res, train=False, num_classes=cfg.model.num_classes,
                             seed=cfg.train.seed)
    host_batch, eval_batch = cfg.train.micro_batch * cfg.train.grad_accum, cfg.train.micro_batch
    global_batch = host_batch * shard[1]
    if backend == "ipu":  # the combined batch rule, checked before any compilation
        from ipu_effnet.backends.ipu import validate_ipu_config

        layout = validate_ipu_config(cfg, model, instances=shard[1], num_samples=len(train_set) // shard[1])
        host_batch, eval_batch, global_batch = layout.host_batch, layout.eval_host_batch, layout.global_batch
    train_loader = create_loader(train_set, host_batch, train=True, workers=cfg.data.workers,
                                 seed=cfg.train.seed, rank=shard[0], world_size=shard[1])
    val_loader = create_loader(val_set, eval_batch, train=False, workers=cfg.data.workers,
                               seed=cfg.train.seed, rank=shard[0], world_size=shard[1])
    steps_per_epoch = len(train_loader)
    total_steps = max(1, int(round(cfg.train.epochs * steps_per_epoch)))
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    model.to(device)
    tm = TrainingModel.from_config(model, cfg.train, channels_last=resolve_channels_last(cfg.train, backend)).to(device)
    optimizer = optimizer_from_config(model, cfg.train)
    schedule = schedule_from_config(cfg.train, global_batch=global_batch, reference_batch=cfg.train.lr_reference_batch)
    averager = WeightAverager(cfg.train.weight_avg_decay, interval="epoch")
    averagers = {"epoch": averager}
    ema = None
    if cfg.train.ema_decay is not None:
        ema = averagers["ema"] = WeightAverager(cfg.train.ema_decay, interval="step")
    net: nn.Module = tm
    if info.world_size > 1 and backend == "torch":
        net = nn.parallel.DistributedDataParallel(tm, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, step = 0, 0
    if ckpt is not None:
        epoch_done, step = restore_checkpoint(ckpt, model, optimizer, averagers)
        start_epoch = int(epoch_done)
    # the first stage's regularisation before any program is built (a compiled program keeps its graph)
    apply_stage(stages[stage_index(start_epoch, num_epochs, len(stages))], model, tm)

    def prepare_runner() -> Any:
        from ipu_effnet.backends import prepare

        return prepare(backend, tm, optimizer, cfg, log=say, device=device, num_samples=len(train_set) // shard[1])

    if backend != "torch":  # after the restore, so the restored weights are what goes to the device / stages
        if backend == "ipu":
            info.collectives.broadcast_module(model)  # every instance starts from instance 0's weights
        runner = prepare_runner()
        if ckpt is not None and hasattr(runner, "restore_extra"):  # device optimiser state and RNG
            runner.restore_extra(ckpt.get("extra") or {})
    else:
        runner = TorchRunner(net, optimizer, cfg.train.grad_accum, cfg.train.precision, device)
    if backend == "ipu" and cfg.ipu.compile_only:  # compile both programs for the first batches' shapes, stop
        return compile_only(runner, train_loader, val_loader, cfg, run_dir, say)
    val_batches = math.ceil(math.ceil(len(val_set) / shard[1]) / eval_batch)  # the longest shard's calls

    def run_eval() -> Dict[str, float]:
        if backend == "ipu":
            return runner.evaluate_loader(val_loader, reduce=info.collectives.all_reduce_sum, batches=val_batches)
        return evaluate(tm, val_loader, device, cfg.train.precision, info)

    bn_batches = cfg.train.bn_recalibration_batches
    bn_recalibrate = bn_batches > 0 and has_batchnorm(model, frozen)
    bn_skip_said = []

    def recalibrate_averages() -> None:
        """BatchNorm statistics for each average as it is now (averaging.recalibrate_average), over the last
        stage's training loader; a no-op without BatchNorm (outside frozen layers), when off, or when current."""
        if not bn_recalibrate:
            return
        if backend == "ipu":  # would need a third poptorch program (BN in train mode, no optimiser); not yet
            if not bn_skip_said:
                say("train.bn_recalibration_batches: not done on the ipu backend; the averaged model keeps its "
                    "averaged BatchNorm statistics (evaluate/finetune/sweep --averaged warn that they are stale)")
                bn_skip_said.append(True)
            return
        loader = train_loader
        if current is not stages[-1] and len(stages) > 1:  # resumed after the last epoch: the last stage's
            loader = create_loader(stage_train_set(cfg, stages[-1], phase.eval_preprocessing), host_batch,
                                   train=True, workers=cfg.data.workers, seed=cfg.train.seed,
                                   rank=shard[0], world_size=shard[1])
        for key, avg in averagers.items():
            if avg.num_updates == 0 or avg.bn_stats_current:
                continue
            recalibrate_average(avg, model, loader, bn_batches, skip=frozen, forward=tm, device=device,
                                micro_batch=cfg.train.micro_batch,
                                autocast=autocast_dtype(cfg.train.precision, device),
                                collectives=info.collectives if info.world_size > 1 else None)
            say(f"{key} average: BatchNorm statistics recomputed over {avg.bn_stats_images} training images")

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if frozen:
        say(f"{phase.name}: {params - trainable:,} parameters frozen in {frozen[0]} ... {frozen[-1]}; "
            f"{trainable:,} train")
    sizes = " -> ".join(str(s.resolution) for s in stages)
    say(f"{phase.name}: {name} ({cfg.norm.kind}{'+proxy' if cfg.norm.proxy else ''}), {params:,} params, {sizes} px; "
        f"{len(train_set)} training images, global batch {global_batch} "
        f"({cfg.train.micro_batch} x {cfg.train.grad_accum} x {shard[1]}), {total_steps} steps on {device}")

    metrics = MetricsLog(run_dir / "metrics.jsonl", info.is_main)
    # readers drop events after the step this phase starts from (left by an interrupted run)
    tb = TensorBoardLog(phase.tensorboard_dir or run_dir / TB_DIR, use_tb and info.is_main, phase.step_offset,
                        purge_step=step + 1)
    if ckpt is None:
        tb.config(phase.name, dump(cfg))
    log_every = max(1, cfg.logging.log_every)
    wall_start = time.perf_counter()
    val: Dict[str, float] = {}
    current: Optional[Stage] = None
    last_checkpoint: Optional[Path] = resumed_from
    if info.is_main:  # before any step: the run directory takes a checkpoint
        faults.preflight(run_dir / CHECKPOINT_DIR, faults.checkpoint_bytes(model, len(averagers)))
    resume_at = faults.mid_epoch(ckpt)  # a pre-emption checkpoint's position inside its epoch
    # the loss scale for TensorBoard: the GradScaler's in each step's result (fp16 on CUDA); on IPUs with
    # fp16 the configured static one (poptorch's automatic scaling keeps its current value on the device)
    loss_scale = (cfg.ipu.loss_scaling if backend == "ipu" and cfg.train.precision.startswith("16")
                  and not cfg.ipu.auto_loss_scaling else None)
    bad_steps = faults.BadSteps(cfg.train.max_bad_steps, tolerant=getattr(runner, "scaler", None) is not None,
                                precision=cfg.train.precision)
    train_time, train_images = resume_at.train_time, resume_at.train_images

    def save(epoch_mark: float, extra: Dict[str, Any]) -> Path:
        """Write a checkpoint at epoch `epoch_mark` and the current step (rank 0); the previous one
        stays if the write fails. On the IPU backend it also holds the device-side optimiser and RNG state."""
        if hasattr(runner, "checkpoint_extra"):
            extra = dict(extra, **runner.checkpoint_extra())
        if classes is not None:  # class names of the training data (predict names its answers with them)
            extra = dict(extra, classes=list(classes))
        state = make_checkpoint(model, optimizer, epoch=epoch_mark, step=step, averagers=averagers,
                                config=cfg.to_dict(), extra=extra)
        return faults.save_or_stop(run_dir / CHECKPOINT_DIR / checkpoint_name(epoch_mark, step), state,
                                   cfg.train.keep_checkpoints, last_checkpoint)
    for epoch in range(start_epoch, num_epochs):
        stage = stages[stage_index(epoch, num_epochs, len(stages))]
        if stage is not current:  # progressive resizing: new resolution and regularisation
            if current is not None or len(stages) > 1:
                train_loader = create_loader(stage_train_set(cfg, stage, phase.eval_preprocessing), host_batch,
                                             train=True, workers=cfg.data.workers, seed=cfg.train.seed,
                                             rank=shard[0], world_size=shard[1])
                say(f"stage {stages.index(stage) + 1}/{len(stages)}: {stage.resolution} px, dropout "
                    f"{stage.dropout}, RandAugment {stage.randaugment}, mixup {stage.mixup}")
            if current is not None and getattr(runner, "compiled_per_stage", False):
                # one program per stage (a compiled program keeps its input shapes and graph): the old
                # one is destroyed, its optimiser and RNG state carried into the next
                carried = runner.checkpoint_extra()
                runner.release()
                apply_stage(stage, model, tm)
                runner = prepare_runner()
                runner.restore_extra(carried)
            apply_stage(stage, model, tm)
            current = stage
        train_loader.set_epoch(epoch)
        bar = _progress(min(steps_per_epoch, total_steps - step), f"epoch {epoch + 1}/{num_epochs}",
                        cfg.logging.progress and info.is_main, cfg.logging.progress_interval)
        done = resume_at.epoch_step if epoch == start_epoch else 0  # steps of this epoch done before a stop
        epoch_sums = dict(resume_at.epoch_sums) if done else {"loss": 0.0, "correct": 0.0, "samples": 0.0}
        tick = time.perf_counter()
        for images, labels in itertools.islice(train_loader, done, None):
            if step >= total_steps:
                break
            lr = schedule.at_step(step, steps_per_epoch)
            set_lr(optimizer, lr)
            out = runner.step(images, labels)
            step += 1
            done += 1
            bad_steps.observe(out, step, last_checkpoint)
            if ema is not None:
                if backend != "torch":  # a per-step EMA needs the whole model on the host every step (slow)
                    runner.sync_weights_to_host()
                ema.update(model)
            now = time.perf_counter()
            train_time += now - tick
            tick = now
            train_images += out["samples"] * shard[1]
            epoch_sums["loss"] += out["loss"] * out["samples"]
            epoch_sums["correct"] += out["correct"]
            epoch_sums["samples"] += out["samples"]
            ips = train_images / train_time if train_time > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", acc=f"{out['correct'] / out['samples']:.3f}",
                            img_s=f"{ips:.1f}", refresh=False)
            if step % log_every == 0:
                step_record = {"kind": "step", "step": step, "epoch": step / steps_per_epoch, "lr": lr,
                               "loss": out["loss"], "top1": out["correct"] / out["samples"],
                               "images_per_sec": ips}
                metrics.write(step_record)
                tb.step(step_record, out.get("scale", loss_scale))
            stop = faults.stop_requested(info.collectives)
            if stop:  # pre-emption: a checkpoint at this step that --resume continues from exactly
                bar.close()
                tb.close()
                if backend != "torch":
                    runner.sync_weights_to_host()
                if info.is_main:
                    last_checkpoint = save(epoch, faults.mid_epoch_extra(done, epoch_sums, train_time, train_images))
                raise faults.Preempted(stop, step, last_checkpoint)
        bar.close()
        if backend != "torch":  # IPU: weights to the host; pipeline: every stage's weights to every rank
            runner.sync_weights_to_host()
        averager.update(model)
        sums = all_reduce_sum(epoch_sums, info)
        val = run_eval()
        for dataset in (train_loader.dataset, val_set):  # unreadable images so far: named, counted, limited
            faults.check_data(dataset, say)
        n = max(sums["samples"], 1.0)
        record = {"kind": "epoch", "epoch": epoch + 1, "step": step, "train_loss": sums["loss"] / n,
                  "train_top1": sums["correct"] / n, "val_top1": val["top1"], "val_top5": val["top5"],
                  "val_loss": val["loss"], "images_per_sec": train_images / max(train_time, 1e-9)}
        metrics.write(record)
        tb.epoch(record, stage.resolution)
        say(f"epoch {epoch + 1}/{num_epochs}: train loss {record['train_loss']:.4f}, "
            f"val top-1 {val['top1']:.2%}, top-5 {val['top5']:.2%}, {record['images_per_sec']:.1f} img/s")
        last = epoch + 1 == num_epochs
        if last:  # before the checkpoint, which then carries them (fine-tuning starts from it)
            recalibrate_averages()
        if info.is_main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or last):
            last_checkpoint = save(epoch + 1, {})

    if not val:  # resumed after the last epoch: nothing trained, evaluate what is there
        val = run_eval()
    recalibrate_averages()  # a no-op when the last epoch did it
    with averager.swapped_in(model):
        val_avg = run_eval()
    val_ema = None
    if ema is not None:
        with ema.swapped_in(model):
            val_ema = run_eval()
    if hasattr(runner, "release"):  # the IPUs are free for the next phase
        runner.release()
    summary = {
        "recipe": cfg.recipe,
        "phase": phase.name,
        "model": name,
        "norm": cfg.norm.kind + ("+proxy" if cfg.norm.proxy else ""),
        "params": params,
        "resolution": res,
        "eval_resolution": eval_res,
        "epochs": cfg.train.epochs,
        "steps": step,
        "global_batch": global_batch,
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_loss": val["loss"],
        "val_samples": val["samples"],  # over every process's shard
        "val_top1_averaged": val_avg["top1"],
        "val_top1_ema": val_ema["top1"] if val_ema is not None else None,
        # BatchNorm statistics of the averaged model: "recomputed" (over bn_recalibration_images training
        # images, all processes), "averaged" (the averaged running statistics: off, or the ipu backend),
        # None (no BatchNorm outside frozen layers)
        "averaged_bn_stats": (None if not has_batchnorm(model, frozen)
                              else "recomputed" if averager.bn_stats_current else "averaged"),
        "bn_recalibration_images": averager.bn_stats_images if averager.bn_stats_current else 0,
        "train_images_per_sec": train_images / train_time if train_time > 0 else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "world_size": shard[1],
        "trainable_params": trainable,
        "first_trainable": first_trainable,
        "checkpoint": str(last_checkpoint) if last_checkpoint is not None else None,
        "unreadable_images": sum(faults.check_data(d, say, stop=False) for d in (train_loader.dataset, val_set)),
        "skipped_steps": bad_steps.skipped,
    }
    tb.close()
    if info.is_main:
        with open(run_dir / "summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        say(f"done: val top-1 {val['top1']:.2%} (weight-averaged {val_avg['top1']:.2%}); "
            f"summary in {run_dir / 'summary.json'}")
    return summary
