"""Resolution sweep: a checkpoint's top-1, top-5 and loss at a list of test resolutions, over the whole
validation set (docs/reference.md section 5: a model trained at one resolution tests best at a larger one,
FixRes's "train-test resolution discrepancy"; half-resolution training plus fine-tuning moves that optimum
back to the native resolution).

    rows = sweep_checkpoint("runs/quickstart/runs/g16-gn-native")      # default resolutions
    write_sweep(rows, out_dir, train_resolution=32)                     # sweep.csv, sweep.png

Default resolutions: 0.5x to 1.5x the training resolution in steps of 32 px (multiples of 32, at least
32), the training resolution itself always included. Below 128 px, steps of 32 would leave one or two
points, so small models step by 8 px (multiples of 8, at least 16).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ipu_effnet.errors import UsageError
from ipu_effnet.run.run_dirs import read_summary, resolve_checkpoint

SWEEP_FIELDS = ("resolution", "top1", "top5", "loss", "images")


def default_resolutions(train_resolution: int, step: Optional[int] = None) -> List[int]:
    """0.5x to 1.5x `train_resolution` in multiples of `step` (default 32, or 8 below 128 px), inside
    the range, never below `step` (32 px, or 16 px with steps of 8); the training resolution included."""
    if step is None:
        step = 32 if train_resolution >= 128 else 8
    floor_res = 32 if step >= 32 else 16
    lo = max(floor_res, step * math.ceil(0.5 * train_resolution / step))
    hi = max(lo, step * math.floor(1.5 * train_resolution / step))
    return sorted(set(range(lo, hi + 1, step)) | {int(train_resolution)})


def parse_resolutions(text: str) -> List[int]:
    """`128,160,192` -> [128, 160, 192] (sorted, unique); raises UsageError on anything else."""
    out = set()
    for item in str(text).replace(" ", "").split(","):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"--res {text!r}: {item!r} is not a whole number of pixels (e.g. --res 128,160,192)") from None
        if value < 8:
            raise UsageError(f"--res {text!r}: {value} px is too small (at least 8)")
        out.add(value)
    if not out:
        raise UsageError(f"--res {text!r}: no resolution given (e.g. --res 128,160,192)")
    return sorted(out)


def run_resolutions(cfg: Any, summary: Optional[Dict[str, Any]] = None) -> Tuple[int, int]:
    """(training resolution, native test resolution) of a run, from its summary.json where there is one
    (`resolution`, `eval_resolution`), else its config. A half-res recipe trains at its half resolution
    (`resolutions.halfres_resolution`) and tests at finetune.resolution (default: native)."""
    from ipu_effnet.models import native_resolution
    from ipu_effnet.resolutions import train_resolution

    summary = summary or {}
    if cfg.recipe == "halfres":
        from ipu_effnet.resolutions import halfres_resolution

        train_res = int(summary.get("resolution") or halfres_resolution(cfg))
        test_res = int(summary.get("finetune_resolution") or summary.get("eval_resolution")
                       or cfg.finetune.resolution or native_resolution(cfg.model.name))
        return train_res, test_res
    train_res = int(summary.get("resolution") or train_resolution(cfg))
    test_res = int(summary.get("eval_resolution") or cfg.data.eval_resolution or train_res)
    return train_res, test_res


def checkpoint_resolutions(ckpt: Dict[str, Any], run_dir: Optional[Path] = None) -> Tuple[int, int]:
    """`run_resolutions` of a checkpoint's stored config (and its run's summary.json when given)."""
    from ipu_effnet.config import Config

    cfg = Config.from_dict(ckpt["config"], source="<checkpoint>")
    return run_resolutions(cfg, read_summary(run_dir) if run_dir is not None else {})


def sweep_checkpoint(checkpoint: os.PathLike, resolutions: Optional[Sequence[int]] = None,
                     averaged: bool = False, overrides: Sequence[str] = (), batch: Optional[int] = None,
                     progress: bool = True, log: Callable[[str], None] = lambda _msg: None,
                     info: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Evaluate `checkpoint` (a file or a run directory) at each resolution over the whole validation set
    its stored config names (`overrides` change that config, e.g. data.path). Rows: resolution, top1,
    top5 (fractions), loss, images. `info`, when given, receives checkpoint, train_resolution,
    test_resolution and resolutions."""
    import torch

    from ipu_effnet.config import Config, apply_overrides
    from ipu_effnet.console import progress_bar as tqdm  # tqdm on a terminal, plain lines in a log
    from ipu_effnet.data import create_dataset, create_loader
    from ipu_effnet.training.checkpoint import load_checkpoint, rebuild_model
    from ipu_effnet.training.evaluation import evaluate, inference_model

    given = Path(checkpoint)
    path = resolve_checkpoint(given)
    ckpt = load_checkpoint(path)
    if ckpt.get("config") is None:
        raise UsageError(f"{path}: the checkpoint holds no config, so its data set is unknown")
    cfg = apply_overrides(Config.from_dict(ckpt["config"], source=str(path)), overrides)
    train_res, test_res = checkpoint_resolutions(ckpt, given if given.is_dir() else None)
    res_list = sorted(set(int(r) for r in resolutions)) if resolutions else default_resolutions(train_res)
    model = rebuild_model(ckpt, averager="epoch" if averaged else None)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    network = inference_model(model)
    if info is not None:
        info.update({"checkpoint": str(path), "train_resolution": train_res, "test_resolution": test_res,
                     "resolutions": res_list, "model": ckpt.get("model_args", {}).get("name")})
    log(f"sweep {path}: {len(res_list)} resolutions {res_list[0]}..{res_list[-1]} px "
        f"(trained at {train_res} px){' , averaged weights' if averaged else ''}")
    rows = []
    bar = tqdm(res_list, desc="sweep", unit="res", disable=not progress, leave=False, dynamic_ncols=True)
    for res in bar:
        val_set = create_dataset(cfg.data, "validation", res, train=False, num_classes=model.num_classes,
                                 seed=cfg.train.seed)
        loader = create_loader(val_set, batch or cfg.train.micro_batch, train=False, workers=cfg.data.workers,
                               seed=cfg.train.seed)
        try:
            out = evaluate(network, loader, device, cfg.train.precision)
        except RuntimeError as exc:  # e.g. a resolution too small for the network's strides
            raise UsageError(f"sweep at {res} px failed: {str(exc).splitlines()[0]}") from None
        rows.append({"resolution": res, "top1": out["top1"], "top5": out["top5"], "loss": out["loss"],
                     "images": out["samples"]})
        bar.set_postfix(res=res, top1=f"{out['top1']:.3f}", refresh=False)
    bar.close()
    return rows


def write_sweep_csv(rows: Sequence[Dict[str, Any]], path: os.PathLike) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(SWEEP_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({"resolution": r["resolution"], "top1": f"{r['top1']:.6f}", "top5": f"{r['top5']:.6f}",
                             "loss": f"{r['loss']:.6f}", "images": r["images"]})
    return path


def read_sweep_csv(path: os.PathLike) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"resolution": int(r["resolution"]), "top1": float(r["top1"]), "top5": float(r["top5"]),
                 "loss": float(r["loss"]), "images": int(r["images"])} for r in csv.DictReader(f)]


def best_row(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The row with the highest top-1 (ties: the smaller, cheaper resolution)."""
    return max(rows, key=lambda r: (r["top1"], -r["resolution"]))


def write_sweep(rows: Sequence[Dict[str, Any]], out_dir: os.PathLike, train_resolution: Optional[int] = None,
                test_resolution: Optional[int] = None, title: str = "") -> Tuple[Path, Path]:
    """sweep.csv and sweep.png in `out_dir`; returns their paths."""
    from ipu_effnet.analysis.plots import plot_sweep

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_sweep_csv(rows, out_dir / "sweep.csv")
    png_path = plot_sweep(rows, out_dir / "sweep.png", train_resolution=train_resolution,
                          test_resolution=test_resolution, title=title)
    return csv_path, png_path


def format_sweep(rows: Sequence[Dict[str, Any]], train_resolution: Optional[int] = None) -> str:
    lines = ["resolution    top-1    top-5     loss  images"]
    best = best_row(rows)["resolution"] if rows else None
    for r in rows:
        marks = ("  <- trained" if r["resolution"] == train_resolution else "") + \
                ("  <- best" if r["resolution"] == best else "")
        lines.append(f"{r['resolution']:>7} px  {r['top1']:6.2%}  {r['top5']:6.2%}  {r['loss']:7.4f}  "
                     f"{r['images']:>6}{marks}")
    return "\n".join(lines)
