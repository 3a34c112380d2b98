"""Recipes as phases: native, half resolution + fine-tune, progressive resizing (one orchestrator).

    summary = train(cfg, run_dir)                  # cfg.recipe: native | halfres | progressive
    summary = train(cfg, run_dir, resume=True)     # completed phases are kept, an interrupted one resumes

native
    `loop.train_phase` in `run_dir` (config.yaml, metrics.jsonl, summary.json, checkpoints/).
halfres (Masters et al. 2021; docs/reference.md section 5)
    Phase `train`, in `run_dir/train/`: the training recipe at `resolutions.halfres_resolution(cfg)`.
    Phase `finetune`, in `run_dir/finetune/`: from that phase's weight-averaged model (the per-epoch
    exponential average, decay train.weight_avg_decay), `finetune_config(cfg)` for finetune.epochs at
    finetune.resolution (default: native) with evaluation preprocessing for the training images (resize
    + centre crop, no flip, no RandAugment), no mixup or cutmix, the modules before
    finetune.first_trainable frozen with their norms in eval mode (`freeze.py`), SGD without momentum
    or warm-up, cosine decay per step from finetune.lr. Label smoothing stays as in training
    (finetune.label_smoothing overrides it): Graphcore's fine-tuning run reuses the training arguments
    apart from those listed in section 5, and the smoothed loss is the one the model was trained on.
    The final checkpoint is also linked into `run_dir/checkpoints/`, so `evaluate`/`sweep --checkpoint
    RUN_DIR` see the fine-tuned model; `run_dir/summary.json` merges both phases.
progressive (EfficientNetV2 Algorithm 1; docs/reference.md section 2)
    One phase in `run_dir` whose epochs are split evenly over train.progressive_stages stages; stage i
    trains at S_i = S_0 + (S_e - S_0) i / (M - 1), with dropout, RandAugment magnitude and mixup alpha
    interpolated the same way. Weights, optimiser and learning-rate schedule run on across stages.

A phase is complete when its summary.json exists; an interrupted one resumes from its newest checkpoint.
TensorBoard events of every phase go into `run_dir/tensorboard/` (training/tb.py), a later phase's steps
counted on from the earlier one's. With model.init_from, norm.eps and model.padding are first set to
those the weights were trained with (models/importer.py).

Every resolution default (training, fine-tune, half-resolution) is decided in `ipu_effnet/resolutions.py`.

Progressive sizes: intermediate stage sizes are rounded to the nearest multiple of 8 (tensor shapes
that suit vector units and the IPU's tiles, and never more than 4 px from Algorithm 1); the endpoints
are used exactly as configured, so the last stage trains at the resolution the recipe names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ipu_effnet.config import Config, replace, write_resolved
from ipu_effnet.errors import UsageError
from ipu_effnet.resolutions import finetune_resolution, halfres_resolution, train_resolution
from ipu_effnet.run.loop import train_phase
from ipu_effnet.run.phases import PhaseOptions, Stage
from ipu_effnet.training.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_checkpoint,
    rebuild_model,
)
from ipu_effnet.training.tb import TB_DIR

__all__ = [
    "PROGRESSIVE_ROUND",
    "algorithm1",
    "finetune_config",
    "finetune_phase",
    "progressive_stages",
    "train",
]

PROGRESSIVE_ROUND = 8


def algorithm1(start: float, end: float, stages: int) -> List[float]:
    """EfficientNetV2 Algorithm 1: value_i = start + (end - start) * i / (M - 1), i = 0 .. M - 1."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages == 1:
        return [float(end)]
    return [start + (end - start) * i / (stages - 1) for i in range(stages)]


def _round_size(value: float, first: bool, last: bool, exact: float) -> int:
    if first or last:
        return int(round(exact))
    return int(PROGRESSIVE_ROUND * round(value / PROGRESSIVE_ROUND))


def progressive_stages(stages: int, resolution: Sequence[float], dropout: Optional[Sequence[float]] = None,
                       randaugment: Optional[Sequence[float]] = None,
                       mixup: Sequence[float] = (0.0, 0.0)) -> List[Stage]:
    """The stages for given [start, end] endpoints (None: that regulariser is left alone)."""
    sizes = algorithm1(resolution[0], resolution[1], stages)
    drops = algorithm1(dropout[0], dropout[1], stages) if dropout else [None] * stages
    mags = algorithm1(randaugment[0], randaugment[1], stages) if randaugment else [None] * stages
    mixes = algorithm1(mixup[0], mixup[1], stages)
    out = []
    for i in range(stages):
        size = _round_size(sizes[i], i == 0 and stages > 1, i == stages - 1,
                           resolution[0] if i == 0 and stages > 1 else resolution[1])
        out.append(Stage(size, drops[i], mags[i], mixes[i]))
    return out


def progressive_from_config(cfg: Config) -> List[Stage]:
    t = cfg.train
    native = train_resolution(cfg)
    resolution = t.progressive_resolution or [max(32, 16 * round(native / 32)), native]
    magnitude = t.randaugment_magnitude
    randaugment = t.progressive_randaugment or ([magnitude, magnitude] if magnitude else None)
    mixup = t.progressive_mixup or [t.mixup_alpha, t.mixup_alpha]
    return progressive_stages(t.progressive_stages, resolution, t.progressive_dropout or None, randaugment, mixup)


def finetune_config(cfg: Config, resolution: Optional[int] = None, epochs: Optional[float] = None,
                    lr: Optional[float] = None, first_trainable: Optional[str] = None) -> Config:
    """The config of the fine-tune phase: `cfg` with the train section set as docs/reference.md section 5 says."""
    ft = cfg.finetune
    res = resolution or finetune_resolution(cfg)
    t = cfg.train
    changes = {
        "recipe": "native", "model.resolution": res, "data.eval_resolution": res, "finetune.resolution": res,
        "train.epochs": ft.epochs if epochs is None else epochs, "train.lr": ft.lr if lr is None else lr,
        "train.lr_reference_batch": None, "train.optimizer": "sgd", "train.momentum": 0.0,
        "train.lr_schedule": "cosine", "train.warmup_epochs": 0, "train.mixup_alpha": 0.0, "train.cutmix": False,
        "train.randaugment_magnitude": None, "train.ema_decay": None,
        "train.micro_batch": ft.micro_batch or t.micro_batch, "train.grad_accum": ft.grad_accum or t.grad_accum,
        "train.label_smoothing": t.label_smoothing if ft.label_smoothing is None else ft.label_smoothing,
    }
    if first_trainable is not None:
        changes["finetune.first_trainable"] = first_trainable
    return replace(cfg, changes, source="<finetune phase>")


def finetune_phase(cfg: Config, ckpt: Dict[str, Any], run_dir: Path, averaged: bool = True,
                   log: Callable[[str], None] = print, tensorboard_dir: Optional[Path] = None,
                   step_offset: int = 0, **kwargs: Any) -> Dict[str, Any]:
    """Fine-tune the network of a loaded checkpoint (its weight average when `averaged`) in `run_dir`;
    resumes when run_dir holds checkpoints. kwargs: finetune_config's resolution, epochs, lr, first_trainable.
    tensorboard_dir, step_offset: where its TensorBoard events go (None: run_dir/tensorboard) and what
    its steps count on from (a recipe's training phase)."""
    from ipu_effnet.data import create_dataset, create_loader
    from ipu_effnet.training.evaluation import evaluate

    ft_cfg = finetune_config(cfg, **kwargs)
    resume = latest_checkpoint(run_dir) is not None
    model = rebuild_model(ckpt, averager="epoch" if averaged else None)
    before = None
    before_path = run_dir / "before_finetune.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text(encoding="utf-8"))["val_top1"]
    elif not resume:
        import torch

        res = ft_cfg.model.resolution
        val_set = create_dataset(ft_cfg.data, "validation", res, train=False,
                                 num_classes=ft_cfg.model.num_classes, seed=ft_cfg.train.seed)
        loader = create_loader(val_set, ft_cfg.train.micro_batch, train=False, workers=ft_cfg.data.workers,
                               seed=ft_cfg.train.seed)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        before = evaluate(model.to(device), loader, device, ft_cfg.train.precision)["top1"]
        model.cpu()
        if is_main_process():
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(before_path, {"val_top1": before, "resolution": res, "averaged": averaged})
    phase = PhaseOptions(name="finetune", model=model, freeze=True, first_trainable=ft_cfg.finetune.first_trainable,
                         eval_preprocessing=True, tensorboard_dir=tensorboard_dir, step_offset=step_offset)
    summary = train_phase(ft_cfg, run_dir, phase, resume=resume, log=log)
    if before is not None:
        summary["val_top1_before_finetune"] = before
        if is_main_process():
            _write_json(run_dir / "summary.json", summary)
    return summary


def init_numerics(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """`cfg` with norm.eps and model.padding set to those of model.init_from's format (a no-op without
    model.init_from); says what it set (models/importer.py reads the weights)."""
    from ipu_effnet.models.importer import weights_numerics

    path = cfg.model.init_from
    if not path:
        return cfg
    fmt, numerics, how = weights_numerics(path, cfg.model.init_format)
    changes: Dict[str, Any] = {}
    said = []
    if numerics.eps is not None:
        said.append(f"norm.eps={numerics.eps:g}")
        if cfg.norm.eps != numerics.eps:
            changes["norm.eps"] = numerics.eps
    if numerics.padding is not None:
        said.append(f"model.padding={numerics.padding}")
        if cfg.model.padding != numerics.padding:
            changes["model.padding"] = numerics.padding
    if said:
        changed = f" (changed from norm.eps={cfg.norm.eps:g}, model.padding={cfg.model.padding})" if changes else ""
        log(f"init-from {path}: {fmt} format ({how}); the numerics its weights were trained with: "
            f"{', '.join(said)}{changed}")
    changes["model.init_format"] = fmt
    return replace(cfg, changes, source=f"--init-from {path}")


def _silent(_msg: str) -> None:
    return None


def is_main_process() -> bool:
    """Rank 0 under torchrun and instance 0 under poprun: the process that logs and writes run files."""
    from ipu_effnet.console import process_rank

    return process_rank() == 0


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _done(phase_dir: Path) -> Optional[Dict[str, Any]]:
    path = phase_dir / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _link_final(checkpoint: str, run_dir: Path) -> str:
    """Hard-link (or copy) the recipe's final checkpoint into run_dir/checkpoints/."""
    src = Path(checkpoint)
    dst_dir = run_dir / CHECKPOINT_DIR
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return str(dst)


def train(cfg: Config, run_dir: os.PathLike, resume: bool = False, source: Optional[str] = None,
          overrides: Any = (), log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run `cfg.recipe` in phases (see the module docstring); returns the summary in run_dir/summary.json."""
    run_dir = Path(run_dir)
    if cfg.model.init_from and not resume:  # norm.eps and model.padding of the weights (models/importer.py)
        cfg = init_numerics(cfg, log if is_main_process() else _silent)
    if cfg.recipe == "native":
        return train_phase(cfg, run_dir, PhaseOptions(), resume=resume, source=source, overrides=overrides, log=log)
    main_process = is_main_process()
    if not main_process:  # the phases still run on every process; one of them speaks and writes
        log = _silent
    if cfg.recipe == "progressive":
        stages = progressive_from_config(cfg)
        resume = resume and latest_checkpoint(run_dir) is not None
        summary = train_phase(cfg, run_dir, PhaseOptions(name="progressive", stages=stages), resume=resume,
                              source=source, overrides=overrides, log=log)
        summary["stage_resolutions"] = [s.resolution for s in stages]
        if main_process:
            _write_json(run_dir / "summary.json", summary)
        return summary
    if cfg.recipe != "halfres":
        raise UsageError(f"recipe = {cfg.recipe!r} is not one of 'native', 'halfres', 'progressive'")

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and main_process:
        write_resolved(cfg, run_dir, source=source, overrides=overrides)
        (run_dir / "summary.json").unlink(missing_ok=True)
    train_dir, ft_dir = run_dir / "train", run_dir / "finetune"
    half = halfres_resolution(cfg)
    main_cfg = replace(cfg, {"recipe": "native", "model.resolution": half}, source="<halfres phase>")
    main = _done(train_dir) if resume else None
    if main is None:
        log(f"halfres: phase 1/2, training at {half} px in {train_dir}")
        main = train_phase(main_cfg, train_dir, PhaseOptions(name="train", tensorboard_dir=run_dir / TB_DIR),
                           resume=resume and latest_checkpoint(train_dir) is not None, source=source,
                           overrides=overrides, log=log)
        if main.get("compile_only"):  # ipu.compile_only: phase 1's programs are compiled; nothing to fine-tune
            return main
    ft = _done(ft_dir) if resume else None
    if ft is None:
        ckpt = load_checkpoint(latest_checkpoint(train_dir))
        log(f"halfres: phase 2/2, fine-tuning the weight-averaged model in {ft_dir}")
        ft = finetune_phase(cfg, ckpt, ft_dir, averaged=True, log=log, tensorboard_dir=run_dir / TB_DIR,
                            step_offset=int(main["steps"]))
    summary = dict(main)
    summary.update({
        "recipe": "halfres",
        "phase": "finetune",
        "finetune_resolution": ft["resolution"],
        "eval_resolution": ft["eval_resolution"],
        "val_top1": ft["val_top1"],
        "val_top5": ft["val_top5"],
        "val_loss": ft["val_loss"],
        "val_top1_averaged": ft["val_top1_averaged"],
        "val_top1_before_finetune": ft.get("val_top1_before_finetune"),
        "val_top1_train_resolution": main["val_top1"],
        "finetune_images_per_sec": ft["train_images_per_sec"],
        "finetune_steps": ft["steps"],
        "first_trainable": ft["first_trainable"],
        "trainable_params": ft["trainable_params"],
        "wall_seconds": main["wall_seconds"] + ft["wall_seconds"],
        "checkpoint": _link_final(ft["checkpoint"], run_dir) if ft.get("checkpoint") and main_process else None,
        "phases": {"train": main, "finetune": ft},
    })
    if main_process:
        _write_json(run_dir / "summary.json", summary)
    before = summary["val_top1_before_finetune"]
    log(f"halfres done: top-1 {summary['val_top1']:.2%} at {summary['finetune_resolution']} px after fine-tuning"
        + (f" ({before:.2%} before)" if before is not None else ""))
    return summary
