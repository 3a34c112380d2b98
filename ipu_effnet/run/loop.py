"""The training loop of one phase: one flat function over epochs and steps, with the policy
(schedule, averaging, checkpoints, faults) in small functions it calls, and every backend behind the
`Runner` interface (backends/runner.py), so that nothing here names a backend.

    summary = train_phase(cfg, run_dir, PhaseOptions())        # writes config.yaml, metrics.jsonl,
                                                                # summary.json, checkpoints/, tensorboard/
    summary = train_phase(cfg, run_dir, phase, resume=True)    # continue from run_dir's newest checkpoint

Recipes (native, halfres, progressive) are phases put together by `run/recipes.py`, whose `train` is the
public entry point; it calls `train_phase` once per phase with `PhaseOptions` (run/phases.py).

Global batch = micro-batch x gradient accumulation x data shards (x device iterations and replicas on
IPUs: `backends.batch_layout`); the loader yields host batches per shard. Checkpoints are written at
epoch ends (every `train.checkpoint_every` epochs and at the last), by the main process only; a resumed
run restores the model, optimiser, averager and RNG states and continues with the next epoch, and on CPU
reproduces the uninterrupted run exactly (the data order and augmentation are functions of the seed and
the epoch). Faults (`run/faults.py`): a SIGTERM/SIGINT checkpoints at the next step boundary, with the
position inside the epoch (the resumed run replays the loader past the steps done, so it continues
exactly); a non-finite step stops the run unless fp16 loss scaling absorbs it; the run directory is
write-tested before the first step; unreadable images are reported and counted between epochs.
At the last epoch, before its checkpoint, the averages' BatchNorm statistics are recomputed for the
averaged weights over `train.bn_recalibration_batches` training micro-batches (`training/bn_stats.py`;
combined over data shards through the host collectives; where a runner cannot, it says why), so the
weight-averaged evaluation and the checkpoint that fine-tuning starts from hold statistics that fit.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ipu_effnet.backends import DistInfo, batch_layout, join, open_runner, resolve_backend
from ipu_effnet.config import Config, dump, model_kwargs, write_resolved
from ipu_effnet.data import create_dataset, create_loader
from ipu_effnet.errors import UsageError
from ipu_effnet.models import create_model
from ipu_effnet.run import faults
from ipu_effnet.run.phases import PhaseOptions, Stage, apply_stage, phase_stages, stage_index, stage_train_set
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
from ipu_effnet.training.precision import autocast_dtype
from ipu_effnet.training.schedules import schedule_from_config
from ipu_effnet.training.tb import TB_DIR, TensorBoardLog, want_tensorboard


class MetricsLog:
    """metrics.jsonl in the run directory (main process only): one JSON object per line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _silent(_msg: str) -> None:
    return None


def _progress(total: int, desc: str, enabled: bool, interval: float = 60.0):
    from ipu_effnet.console import progress_bar

    # tqdm on a terminal; a plain line every `interval` seconds in a log file
    return progress_bar(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, unit="step",
                        interval=interval)


class PhaseRun:
    """Everything one phase's loop works with, built once in order by `open` (no backend named)."""

    def __init__(self, cfg: Config, run_dir: Path, phase: PhaseOptions, resume: bool, source: Optional[str],
                 overrides: Any, log: Callable[[str], None]) -> None:
        self.cfg, self.run_dir, self.phase = cfg, run_dir, phase
        self.use_tb = want_tensorboard(cfg.logging.tensorboard, log)  # without the package: stop before any work
        notes: List[str] = []
        self.backend = resolve_backend(cfg.backend, log=notes.append)
        self.info: DistInfo = join(self.backend, cfg, log)
        self.say = log if self.info.is_main else _silent
        for note in notes:
            self.say(note)
        self.device = self.info.device()
        self.ckpt: Optional[Dict[str, Any]] = None
        self.last_checkpoint: Optional[Path] = None
        if resume:  # the newest checkpoint that loads: a truncated newest one is reported and skipped
            self.last_checkpoint, self.ckpt = faults.load_resume(run_dir, self.say)
            self.say(f"resuming from {self.last_checkpoint}")
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                write_resolved(cfg, run_dir, source=source, overrides=overrides)
                for stale in ("metrics.jsonl", "summary.json"):
                    (run_dir / stale).unlink(missing_ok=True)
        torch.manual_seed(self.info.collectives.broadcast_object(cfg.train.seed))  # one seed for every process
        self.stages = phase_stages(cfg, phase)
        self.current: Optional[Stage] = None
        self.bn_note_said = False  # a runner's reason for not recomputing BatchNorm statistics, said once
        self._build_model()
        self._build_data()
        self._build_training()

    def _build_model(self) -> None:
        cfg, phase = self.cfg, self.phase
        self.name, kwargs = model_kwargs(cfg)
        if phase.model is not None:
            self.model = phase.model
        else:
            try:
                self.model = create_model(self.name, **kwargs)
            except ValueError as exc:
                raise UsageError(f"model {self.name!r}: {exc}") from None
            if cfg.model.init_from and self.ckpt is None:  # pretrained weights in (a resumed run has its own)
                from ipu_effnet.models.importer import load_pretrained

                load_pretrained(self.model, cfg.model.init_from, cfg.model.init_format, log=self.say)
        self.frozen: List[str] = []
        self.first_trainable = None
        if phase.freeze:
            self.first_trainable = phase.first_trainable or default_first_trainable(self.model)
            self.frozen = freeze_before(self.model, self.first_trainable)

    def _build_data(self) -> None:
        cfg, shard = self.cfg, self.info.shard
        self.train_set = stage_train_set(cfg, self.stages[0], self.phase.eval_preprocessing)
        self.classes = getattr(self.train_set, "classes", None)
        self.eval_res = cfg.data.eval_resolution or self.stages[-1].resolution
        self.val_set = create_dataset(cfg.data, "validation", self.eval_res, train=False,
                                      num_classes=cfg.model.num_classes, seed=cfg.train.seed)
        self.layout = batch_layout(self.backend, cfg, self.model, self.info,
                                   num_samples=len(self.train_set) // shard[1])
        self.train_loader = self._loader(self.train_set)
        self.val_loader = create_loader(self.val_set, self.layout.eval_batch, train=False, workers=cfg.data.workers,
                                        seed=cfg.train.seed, rank=shard[0], world_size=shard[1])
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = max(1, int(round(cfg.train.epochs * self.steps_per_epoch)))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        # the longest shard's evaluation calls (devices whose replicas run in lockstep make as many)
        self.val_batches = math.ceil(math.ceil(len(self.val_set) / shard[1]) / self.layout.eval_batch)

    def _loader(self, dataset: Any) -> Any:
        shard = self.info.shard
        return create_loader(dataset, self.layout.host_batch, train=True, workers=self.cfg.data.workers,
                             seed=self.cfg.train.seed, rank=shard[0], world_size=shard[1])

    def _build_training(self) -> None:
        cfg, model = self.cfg, self.model
        model.to(self.device)
        self.tm = TrainingModel.from_config(model, cfg.train, channels_last=resolve_channels_last(
            cfg.train, self.backend)).to(self.device)
        self.optimizer = optimizer_from_config(model, cfg.train)
        self.schedule = schedule_from_config(cfg.train, global_batch=self.layout.global_batch,
                                             reference_batch=cfg.train.lr_reference_batch)
        self.averager = WeightAverager(cfg.train.weight_avg_decay, interval="epoch")
        self.averagers = {"epoch": self.averager}
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = self.averagers["ema"] = WeightAverager(cfg.train.ema_decay, interval="step")
        self.start_epoch, self.step = 0, 0
        if self.ckpt is not None:
            epoch_done, self.step = restore_checkpoint(self.ckpt, model, self.optimizer, self.averagers)
            self.start_epoch = int(epoch_done)
        # the first stage's regularisation before any program is built (a compiled program keeps its graph)
        apply_stage(self.stages[stage_index(self.start_epoch, self.num_epochs, len(self.stages))], model, self.tm)
        self.runner = self._open_runner()  # after the restore: the restored weights go to the device
        if self.ckpt is not None:  # device-side optimiser and RNG state
            self.runner.restore_extra(self.ckpt.get("extra") or {})

    def _open_runner(self) -> Any:
        return open_runner(self.backend, self.tm, self.optimizer, self.cfg, self.info, device=self.device,
                           num_samples=len(self.train_set) // self.info.shard[1], log=self.say)

    # ---- what the loop calls -----------------------------------------------------------------------

    def enter_stage(self, epoch: int) -> Stage:
        """The epoch's stage; at a change (progressive resizing) a new loader, and a new runner where a
        compiled program keeps its shapes (its optimiser and RNG state carried into the next)."""
        stage = self.stages[stage_index(epoch, self.num_epochs, len(self.stages))]
        if stage is self.current:
            return stage
        if self.current is not None or len(self.stages) > 1:
            self.train_loader = self._loader(stage_train_set(self.cfg, stage, self.phase.eval_preprocessing))
            self.say(f"stage {self.stages.index(stage) + 1}/{len(self.stages)}: {stage.resolution} px, dropout "
                     f"{stage.dropout}, RandAugment {stage.randaugment}, mixup {stage.mixup}")
        if self.current is not None and self.runner.compiled_per_stage:
            carried = self.runner.checkpoint_extra()
            self.runner.release()
            apply_stage(stage, self.model, self.tm)
            self.runner = self._open_runner()
            self.runner.restore_extra(carried)
        apply_stage(stage, self.model, self.tm)
        self.current = stage
        return stage

    def evaluate(self) -> Dict[str, float]:
        return self.runner.evaluate_loader(self.val_loader, reduce=self.info.all_reduce_sum, batches=self.val_batches)

    def save(self, epoch_mark: float, extra: Dict[str, Any]) -> Path:
        """Write a checkpoint at epoch `epoch_mark` and the current step (main process); the previous one
        stays if the write fails. It also holds what the runner keeps on its device (optimiser, RNG)."""
        extra = dict(extra, **self.runner.checkpoint_extra())
        if self.classes is not None:  # class names of the training data (predict names its answers with them)
            extra = dict(extra, classes=list(self.classes))
        state = make_checkpoint(self.model, self.optimizer, epoch=epoch_mark, step=self.step,
                                averagers=self.averagers, config=self.cfg.to_dict(), extra=extra)
        self.last_checkpoint = faults.save_or_stop(
            self.run_dir / CHECKPOINT_DIR / checkpoint_name(epoch_mark, self.step), state,
            self.cfg.train.keep_checkpoints, self.last_checkpoint)
        return self.last_checkpoint

    def recalibrate_averages(self) -> None:
        """BatchNorm statistics for each average as it is now (averaging.recalibrate_average), over the last
        stage's training loader; a no-op without BatchNorm (outside frozen layers), when off, or when current."""
        batches = self.cfg.train.bn_recalibration_batches
        if batches <= 0 or not has_batchnorm(self.model, self.frozen):
            return
        note = self.runner.bn_recalibration_note
        if note is not None:
            if not self.bn_note_said:
                self.say(note)
                self.bn_note_said = True
            return
        loader = self.train_loader
        if self.current is not self.stages[-1] and len(self.stages) > 1:  # resumed after the last epoch
            loader = self._loader(stage_train_set(self.cfg, self.stages[-1], self.phase.eval_preprocessing))
        for key, avg in self.averagers.items():
            if avg.num_updates == 0 or avg.bn_stats_current:
                continue
            recalibrate_average(avg, self.model, loader, batches, skip=self.frozen, forward=self.tm,
                                device=self.device, micro_batch=self.cfg.train.micro_batch,
                                autocast=autocast_dtype(self.cfg.train.precision, self.device),
                                collectives=self.info.collectives if self.info.world_size > 1 else None)
            self.say(f"{key} average: BatchNorm statistics recomputed over {avg.bn_stats_images} training images")

    def describe(self) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.params = params
        if self.frozen:
            self.say(f"{self.phase.name}: {params - self.trainable:,} parameters frozen in {self.frozen[0]} ... "
                     f"{self.frozen[-1]}; {self.trainable:,} train")
        sizes = " -> ".join(str(s.resolution) for s in self.stages)
        self.say(f"{self.phase.name}: {self.name} ({self.cfg.norm.label}), {params:,} params, {sizes} px; "
                 f"{len(self.train_set)} training images, global batch {self.layout.global_batch} "
                 f"({self.cfg.train.micro_batch} x {self.cfg.train.grad_accum} x {self.info.shard[1]}), "
                 f"{self.total_steps} steps on {self.device}")


def compile_only(ph: PhaseRun) -> Dict[str, Any]:
    """ipu.compile_only: compile the training and inference programs for the first batches' shapes into
    ipu.executable_cache, release them and return a summary naming the cache (nothing is trained)."""
    runner = ph.runner
    images, labels = next(iter(ph.train_loader))
    eval_images, eval_labels = next(iter(ph.val_loader))
    pad = runner.eval_batch - int(eval_labels.shape[0])
    if pad > 0:
        eval_images = torch.cat([eval_images, eval_images[:1].expand(pad, *eval_images.shape[1:])])
        eval_labels = torch.cat([eval_labels, eval_labels[:1].expand(pad)])
    runner.compile(images, labels, eval_images, eval_labels)
    runner.release()
    cache = str(Path(ph.cfg.ipu.executable_cache).resolve())
    ph.say(f"compile only: training and inference programs compiled into {cache}; nothing trained")
    summary = {"recipe": ph.cfg.recipe, "compile_only": True, "executable_cache": cache}
    if ph.run_dir.is_dir():
        with open(ph.run_dir / "summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def train_phase(cfg: Config, run_dir: os.PathLike, phase: PhaseOptions, resume: bool = False,
                source: Optional[str] = None, overrides: Any = (),
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train one phase as `cfg` and `phase` say; return the summary also written to summary.json."""
    ph = PhaseRun(cfg, Path(run_dir), phase, resume, source, overrides, log)
    if ph.runner.compile_only:  # compile both programs for the first batches' shapes, stop
        return compile_only(ph)
    ph.describe()
    info, say, runner = ph.info, ph.say, ph.runner
    metrics = MetricsLog(ph.run_dir / "metrics.jsonl", info.is_main)
    # readers drop events after the step this phase starts from (left by an interrupted run)
    tb = TensorBoardLog(phase.tensorboard_dir or ph.run_dir / TB_DIR, ph.use_tb and info.is_main, phase.step_offset,
                        purge_step=ph.step + 1)
    if ph.ckpt is None:
        tb.config(phase.name, dump(cfg))
    log_every = max(1, cfg.logging.log_every)
    wall_start = time.perf_counter()
    val: Dict[str, float] = {}
    if info.is_main:  # before any step: the run directory takes a checkpoint
        faults.preflight(ph.run_dir / CHECKPOINT_DIR, faults.checkpoint_bytes(ph.model, len(ph.averagers)))
    resume_at = faults.mid_epoch(ph.ckpt)  # a pre-emption checkpoint's position inside its epoch
    bad_steps = faults.BadSteps(cfg.train.max_bad_steps, tolerant=runner.tolerates_bad_steps,
                                precision=cfg.train.precision)
    train_time, train_images = resume_at.train_time, resume_at.train_images
    steps_per_epoch, num_epochs = ph.steps_per_epoch, ph.num_epochs
    for epoch in range(ph.start_epoch, num_epochs):
        stage = ph.enter_stage(epoch)
        runner = ph.runner  # a new one at a stage change where programs are compiled per stage
        ph.train_loader.set_epoch(epoch)
        bar = _progress(min(steps_per_epoch, ph.total_steps - ph.step), f"epoch {epoch + 1}/{num_epochs}",
                        cfg.logging.progress and info.is_main, cfg.logging.progress_interval)
        done = resume_at.epoch_step if epoch == ph.start_epoch else 0  # steps of this epoch done before a stop
        epoch_sums = dict(resume_at.epoch_sums) if done else {"loss": 0.0, "correct": 0.0, "samples": 0.0}
        tick = time.perf_counter()
        for images, labels in itertools.islice(ph.train_loader, done, None):
            if ph.step >= ph.total_steps:
                break
            lr = ph.schedule.at_step(ph.step, steps_per_epoch)
            set_lr(ph.optimizer, lr)
            out = runner.step(images, labels)
            ph.step += 1
            done += 1
            bad_steps.observe(out, ph.step, ph.last_checkpoint)
            if ph.ema is not None:  # a per-step EMA needs the whole model on the host every step
                runner.sync_weights_to_host()
                ph.ema.update(ph.model)
            now = time.perf_counter()
            train_time += now - tick
            tick = now
            train_images += out["samples"] * info.shard[1]
            epoch_sums["loss"] += out["loss"] * out["samples"]
            epoch_sums["correct"] += out["correct"]
            epoch_sums["samples"] += out["samples"]
            ips = train_images / train_time if train_time > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", acc=f"{out['correct'] / out['samples']:.3f}",
                            img_s=f"{ips:.1f}", refresh=False)
            if ph.step % log_every == 0:
                record = {"kind": "step", "step": ph.step, "epoch": ph.step / steps_per_epoch, "lr": lr,
                          "loss": out["loss"], "top1": out["correct"] / out["samples"], "images_per_sec": ips}
                metrics.write(record)
                tb.step(record, out.get("scale", runner.static_loss_scale))
            stop = faults.stop_requested(info.collectives)
            if stop:  # pre-emption: a checkpoint at this step that --resume continues from exactly
                bar.close()
                tb.close()
                runner.sync_weights_to_host()
                if info.is_main:
                    ph.save(epoch, faults.mid_epoch_extra(done, epoch_sums, train_time, train_images))
                raise faults.Preempted(stop, ph.step, ph.last_checkpoint)
        bar.close()
        runner.sync_weights_to_host()  # device weights (or every pipeline stage's) into the host model
        ph.averager.update(ph.model)
        sums = info.all_reduce_sum(epoch_sums)
        val = ph.evaluate()
        for dataset in (ph.train_loader.dataset, ph.val_set):  # unreadable images so far: named, counted, limited
            faults.check_data(dataset, say)
        n = max(sums["samples"], 1.0)
        record = {"kind": "epoch", "epoch": epoch + 1, "step": ph.step, "train_loss": sums["loss"] / n,
                  "train_top1": sums["correct"] / n, "val_top1": val["top1"], "val_top5": val["top5"],
                  "val_loss": val["loss"], "images_per_sec": train_images / max(train_time, 1e-9)}
        metrics.write(record)
        tb.epoch(record, stage.resolution)
        say(f"epoch {epoch + 1}/{num_epochs}: train loss {record['train_loss']:.4f}, "
            f"val top-1 {val['top1']:.2%}, top-5 {val['top5']:.2%}, {record['images_per_sec']:.1f} img/s")
        last = epoch + 1 == num_epochs
        if last:  # before the checkpoint, which then carries them (fine-tuning starts from it)
            ph.recalibrate_averages()
        if info.is_main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or last):
            ph.save(epoch + 1, {})
    summary = finish(ph, val, train_time, train_images, wall_start, bad_steps.skipped)
    tb.close()
    return summary


def finish(ph: PhaseRun, val: Dict[str, float], train_time: float, train_images: float, wall_start: float,
           skipped_steps: int) -> Dict[str, Any]:
    """The phase's last evaluations (the model, its averages), the device released, and the summary."""
    if not val:  # resumed after the last epoch: nothing trained, evaluate what is there
        val = ph.evaluate()
    ph.recalibrate_averages()  # a no-op when the last epoch did it
    with ph.averager.swapped_in(ph.model):
        val_avg = ph.evaluate()
    val_ema = None
    if ph.ema is not None:
        with ph.ema.swapped_in(ph.model):
            val_ema = ph.evaluate()
    ph.runner.release()  # the device is free for the next phase
    cfg = ph.cfg
    summary = {
        "recipe": cfg.recipe,
        "phase": ph.phase.name,
        "model": ph.name,
        "norm": cfg.norm.label,
        "params": ph.params,
        "resolution": ph.stages[-1].resolution,
        "eval_resolution": ph.eval_res,
        "epochs": cfg.train.epochs,
        "steps": ph.step,
        "global_batch": ph.layout.global_batch,
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_loss": val["loss"],
        "val_samples": val["samples"],  # over every process's shard
        "val_top1_averaged": val_avg["top1"],
        "val_top1_ema": val_ema["top1"] if val_ema is not None else None,
        # BatchNorm statistics of the averaged model: "recomputed" (over bn_recalibration_images training
        # images, all processes), "averaged" (the averaged running statistics: off, or a runner that cannot
        # recompute them), None (no BatchNorm outside frozen layers)
        "averaged_bn_stats": (None if not has_batchnorm(ph.model, ph.frozen)
                              else "recomputed" if ph.averager.bn_stats_current else "averaged"),
        "bn_recalibration_images": ph.averager.bn_stats_images if ph.averager.bn_stats_current else 0,
        "train_images_per_sec": train_images / train_time if train_time > 0 else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "world_size": ph.info.shard[1],
        "trainable_params": ph.trainable,
        "first_trainable": ph.first_trainable,
        "checkpoint": str(ph.last_checkpoint) if ph.last_checkpoint is not None else None,
        "unreadable_images": sum(faults.check_data(d, ph.say, stop=False)
                                 for d in (ph.train_loader.dataset, ph.val_set)),
        "skipped_steps": skipped_steps,
    }
    if ph.info.is_main:
        with open(ph.run_dir / "summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        ph.say(f"done: val top-1 {val['top1']:.2%} (weight-averaged {val_avg['top1']:.2%}); "
               f"summary in {ph.run_dir / 'summary.json'}")
    return summary
