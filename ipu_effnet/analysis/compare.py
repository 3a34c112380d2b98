"""Recipe comparison: run several recipes on one data set, sweep each over test resolutions, measure
inference speed and memory on this machine, and write one table and two plots.

    recipes = recipes_from_files(["configs/quickstart/g16-gn-native.yaml", ...])
    result = compare(recipes, "runs/cmp", overrides=["data.dataset=digits"])
    print(format_summary(result))    # format_summary: analysis/report.py

Layout of `out_dir` (the files other than runs/ are written by analysis/report.py):

    runs/<recipe name>/          one run directory per recipe (config.yaml, metrics.jsonl, summary.json,
                                 checkpoints/, sweep.csv, sweep.png)
    compare.md, compare.csv      the table (columns: report.COLUMNS)
    accuracy_vs_resolution.png   every recipe's sweep on one plot
    pareto.png                   top-1 against training and inference images/s, Pareto front drawn
    training_speed.json          every round's training rate of every recipe, with the table's figures
    inference_speed.json         the same for the inference rates

A run with summary.json is complete and is not trained again; one with checkpoints but no summary was
interrupted and is resumed; its sweep is reused while sweep.csv is newer than summary.json. Inference
speed and memory, and the training step's speed, are measured again on every call (inference memory on
the CPU as `bench` measures it: the VmHWM of a fresh process per recipe, `measure_inference_memory`), for all
recipes with the same settings (both speeds with the recipes taking turns, round by round: `take_turns`),
so that one table's numbers come from one machine in one state; "train img/s (run)" is the average the
run itself saw while training.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ipu_effnet.errors import UsageError


@dataclass(frozen=True)
class MatrixNorm:
    """One `--norms` short name of a matrix (`compare --matrix`, `study`): the norm section it sets and
    the label tables and plots print."""

    kind: str
    proxy: bool
    label: str

    @property
    def overrides(self) -> List[str]:
        return [f"norm.kind={self.kind}", f"norm.proxy={str(self.proxy).lower()}"]


MATRIX_NORMS = {
    "bn": MatrixNorm("batch", False, "BN"), "gn": MatrixNorm("group", False, "GN"),
    "ln": MatrixNorm("layer", False, "LN"), "gnpn": MatrixNorm("group", True, "GN+PN"),
    "lnpn": MatrixNorm("layer", True, "LN+PN"), "none": MatrixNorm("none", False, "none"),
}


@dataclass
class Recipe:
    """One row of the comparison: a YAML file (or None: the defaults) plus overrides of its own."""

    name: str
    path: Optional[str]
    overrides: List[str] = field(default_factory=list)


@dataclass
class BenchSettings:
    """The measurements, identical for every recipe of one comparison. Inference: `batch` random images
    at the test resolution, `warmup` untimed and at least `steps` timed forward passes a round, as many more
    as fill `infer_seconds`; its peak memory (`memory`). The training step: `train_warmup` untimed and at
    least `train_steps` timed steps a round at the recipe's own training resolution and micro-batch, as
    many more as fill `train_seconds`. Both measurements take turns over the recipes, at least `rounds`
    rounds, and more, up to `max_rounds`, until every recipe's standard error is at most `target_error`
    (`take_turns`)."""

    batch: int = 16
    steps: int = 5
    warmup: int = 2
    infer_seconds: float = 1.0  # the least timed inference per recipe and round (0: exactly `steps` passes)
    threads: Optional[int] = None
    rounds: int = 10     # the least rounds: fewer give too rough an estimate of the error to stop on
    train_steps: int = 3
    train_warmup: int = 1
    train_seconds: float = 2.0  # the least timed training per recipe and round (0: exactly train_steps steps)
    target_error: float = 0.02  # more rounds until every recipe's standard error is at most this (0: never)
    max_rounds: int = 20  # ...but no more rounds than this
    memory: bool = True  # peak memory of the inference (CPU: one fresh process per recipe, ~2 s each)


@dataclass
class SpeedMeasurement:
    """What one speed measurement (`measure_training_speed`, `measure_inference_speed`; both `take_turns`)
    found, for the table and for the sentence under it."""

    rates: List[float]              # each job's figure, images/s (what `measure_training` returns)
    errors: List[Optional[float]]   # each job's relative standard error (`relative_errors`)
    round_rates: List[List[float]]  # images/s of each job in each round
    seconds: float                  # wall time of the whole measurement, calibration steps included
    target_error: float = 0.0       # the standard error the rounds went on for (0: a fixed number of rounds)
    what: str = "training"          # "training" or "inference"

    @property
    def rounds(self) -> int:
        return len(self.round_rates[0]) if self.round_rates else 0


@dataclass
class CompareResult:
    out_dir: Path
    rows: List[Dict[str, Any]]
    sweeps: Dict[str, List[Dict[str, Any]]]
    trained: List[str]   # recipes trained (or resumed) by this call
    skipped: List[str]   # recipes already complete
    files: Dict[str, Path]
    training_speed: Optional[SpeedMeasurement] = None  # how the "train img/s" column was measured
    inference_speed: Optional[SpeedMeasurement] = None  # how the "infer img/s" column was measured


# ----------------------------------------------------------------------------------------------------
# Recipes


def recipes_from_files(paths: Sequence[str]) -> List[Recipe]:
    """One recipe per YAML file, named after the file (its stem); duplicate names get a suffix."""
    out: List[Recipe] = []
    seen: Dict[str, int] = {}
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"--recipes {p}: no such file")
        name = Path(p).stem
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        out.append(Recipe(name, str(p)))
    return out


def matrix_recipes(base: str, norms: Sequence[str], kinds: Sequence[str]) -> List[Recipe]:
    """The product norms x kinds on top of `base`, e.g. norms (bn, gn, lnpn) x kinds (native, halfres):
    named `<base stem>-<norm>-<kind>`. BatchNorm keeps the base's group size; GN/LN/PN likewise."""
    from ipu_effnet.config import RECIPES

    if not Path(base).is_file():
        raise UsageError(f"--base {base}: no such file")
    out = []
    for norm in norms:
        if norm not in MATRIX_NORMS:
            raise UsageError(f"--norms {norm!r}: expected some of {', '.join(MATRIX_NORMS)}")
        for kind in kinds:
            if kind not in RECIPES:
                raise UsageError(f"--kinds {kind!r}: expected some of {', '.join(RECIPES)}")
            out.append(Recipe(f"{Path(base).stem}-{norm}-{kind}", base,
                              MATRIX_NORMS[norm].overrides + [f"recipe={kind}"]))
    return out


def train_recipe(cfg: Any, run_dir: os.PathLike, resume: bool = False, source: Optional[str] = None,
                 overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run one recipe to completion (`run.train`: native, halfres or progressive)."""
    from ipu_effnet.run import train

    return train(cfg, run_dir, resume=resume, source=source, overrides=overrides, log=log)


def run_state(run_dir: os.PathLike) -> str:
    """"complete" (summary.json), "partial" (a checkpoint but no summary: resume) or "new"."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        return "complete"
    if run_dir.is_dir() and any(p.is_file() for p in run_dir.rglob("*.pt")):
        return "partial"
    return "new"


# ----------------------------------------------------------------------------------------------------
# Measurements


def model_cost(model_args: Dict[str, Any], resolution: int) -> Dict[str, float]:
    """Parameters and GMACs per image at `resolution`, profiled on the meta device (no arithmetic)."""
    import torch

    from ipu_effnet.models import create_model_from_args
    from ipu_effnet.models.profile import profile_model

    with torch.device("meta"):
        model = create_model_from_args(model_args)
    prof = profile_model(model, resolution)
    return {"params": prof.params, "gmacs": prof.gmacs}


def inference_memory_probe(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Run in bench's fresh process (`bench.run_memory_probe`): the network built from a checkpoint's
    `model_args` (fresh weights: memory does not depend on their values, and loading the checkpoint file
    would add its size to the peak), then `bench.step_memory` over the forward passes compare times
    (`inference_workload`: its inference copy in channels_last, random images of `batch` x `resolution`)."""
    import torch

    from ipu_effnet.analysis.bench import set_threads, step_memory
    from ipu_effnet.models import create_model_from_args

    set_threads(payload.get("threads"))
    torch.manual_seed(0)
    settings = BenchSettings(batch=int(payload["batch"]), threads=payload.get("threads"))
    workload = inference_workload(create_model_from_args(payload["model_args"]), int(payload["resolution"]),
                                  settings, device="cpu")
    return step_memory(workload.step)


def measure_inference_memory(model_args: Dict[str, Any], resolution: int,
                             settings: Optional[BenchSettings] = None) -> Dict[str, Any]:
    """Peak memory of inference with a checkpoint's network on the CPU, measured as `bench` measures it:
    a fresh Python process per measurement reporting its VmHWM (`inference_memory_probe`). A process's
    high-water mark only grows, so measuring in this one would report whatever it held before."""
    from ipu_effnet.analysis.bench import run_memory_probe

    settings = settings or BenchSettings()
    payload = {"model_args": model_args, "resolution": int(resolution), "batch": settings.batch,
               "threads": settings.threads}
    return run_memory_probe("ipu_effnet.analysis.compare:inference_memory_probe", payload,
                            f"compare memory probe for {model_args.get('name')} at {resolution} px, "
                            f"batch {settings.batch}")


def inference_memory(model: Any, resolution: int, settings: Optional[BenchSettings] = None) -> Dict[str, Any]:
    """The peak memory of `model`'s inference (`inference_workload`: its inference copy, no grad) at
    `resolution`: on a GPU CUDA max allocated during `warmup` + `steps` forward passes above what was
    allocated before; on the CPU the VmHWM of a fresh process running the same inference
    (`measure_inference_memory`, from `model.model_args`; None without them). Every field None with
    settings.memory off."""
    import torch

    settings = settings or BenchSettings()
    out: Dict[str, Any] = {"peak_memory_mb": None, "memory_kind": None, "built_memory_mb": None,
                           "memory_method": None}
    if not settings.memory:
        return out
    if torch.cuda.is_available():
        workload = inference_workload(model, resolution, settings)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(settings.warmup + settings.steps):
            workload.step()
        workload.sync()
        del workload
        peak = max(torch.cuda.max_memory_allocated() - before, 0)
        out.update(peak_memory_mb=peak / 2**20, memory_kind="cuda",
                   memory_method="torch.cuda.max_memory_allocated during the inference passes, above the level before")
    elif getattr(model, "model_args", None) is not None:
        memory = measure_inference_memory(model.model_args, resolution, settings)
        out.update(peak_memory_mb=memory["peak_rss_mb"], memory_kind="vmhwm", built_memory_mb=memory["built_rss_mb"],
                   memory_method=memory["method"])
    return out


def inference_workload(model: Any, resolution: int, settings: BenchSettings, device: Optional[str] = None) -> Any:
    """`bench.inference_workload` for one recipe's network: its inference copy (BatchNorm folded into the
    convolutions, Proxy Norm's scale and shift frozen; a copy: `model` is left as it is) in channels_last,
    the network `evaluate`, `sweep`, `predict` and `export` run, over `settings.batch` random images at
    `resolution`, no grad, on the GPU if there is one (or `device`)."""
    import torch

    from ipu_effnet.analysis import bench

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench.BenchConfig(model=getattr(model, "name", "model"), res=resolution, batch=settings.batch,
                            steps=settings.steps, warmup=settings.warmup, threads=settings.threads, mode="infer",
                            device=device, channels_last=True)
    return bench.inference_workload(cfg, model, resolution)


def measure_inference_speed(jobs: Sequence[Dict[str, Any]], settings: Optional[BenchSettings] = None,
                            progress: bool = False) -> SpeedMeasurement:
    """Inference images/s of each job ({"model", "resolution"}: the recipe's network, whose inference copy
    is timed, at its test resolution; `inference_workload`), measured as `measure_training_speed` measures the training step:
    the recipes take turns, rounds of at least `settings.steps` timed forward passes filling
    `settings.infer_seconds`, until every recipe's standard error is at most `settings.target_error`
    (between `settings.rounds` and `settings.max_rounds` rounds; see `take_turns`)."""
    settings = settings or BenchSettings()
    workloads = [inference_workload(job["model"], int(job["resolution"]), settings) for job in jobs]
    return take_turns(workloads, settings, settings.infer_seconds, "inference", progress)


def measure_training(jobs: Sequence[Dict[str, Any]], settings: Optional[BenchSettings] = None,
                     progress: bool = False) -> List[float]:
    """Training images/s of each job: `measure_training_speed(...).rates`."""
    return measure_training_speed(jobs, settings, progress).rates


def relative_errors(round_rates: Sequence[Sequence[float]]) -> List[Optional[float]]:
    """How precisely each job's figure stands against the others': in each round, the log of the job's
    rate over the geometric mean of all the jobs' rates of that round, and the standard error of the
    median of those over the rounds, sqrt(pi / 2) * standard deviation / sqrt(rounds) (the median's
    error for normally distributed rounds), as a fraction. A change of load that slows every job of a
    round alike cancels; a job that moves against the others raises it. The ratio of two rows is
    uncertain by about the root sum of squares of their errors. With a single job, the error of its own
    rate; with fewer than two rounds, None."""
    import math

    if not round_rates:
        return []
    logs = [[math.log(max(rate, 1e-12)) for rate in job] for job in round_rates]
    if len(logs) > 1:
        centres = [sum(column) / len(column) for column in zip(*logs)]
        logs = [[value - centre for value, centre in zip(job, centres)] for job in logs]
    return [math.sqrt(math.pi / 2) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
            for values in logs]


def measure_training_speed(jobs: Sequence[Dict[str, Any]], settings: Optional[BenchSettings] = None,
                           progress: bool = False) -> SpeedMeasurement:
    """Training images/s of each job ({"model", "cfg", "resolution"}): the recipe's own step, built by
    `bench.training_workload` (the one definition of a training step bench also times: TrainingModel with
    the recipe's loss and mixing, its optimiser, TorchRunner.step) on a synthetic uint8 host batch at the
    job's resolution and micro-batch x accumulation, `settings.train_warmup` untimed and at least
    `settings.train_steps` timed steps a round, as many more as fill `settings.train_seconds`; the jobs
    take turns (`take_turns`). The models are trained in place: pass copies."""
    import torch

    from ipu_effnet.analysis import bench

    settings = settings or BenchSettings()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workloads = []
    for job in jobs:
        cfg, res = job["cfg"], int(job["resolution"])
        batch = cfg.train.micro_batch * cfg.train.grad_accum
        bench_cfg = bench.BenchConfig(model=cfg.model.name, res=res, batch=batch, steps=settings.train_steps,
                                      warmup=settings.train_warmup, threads=settings.threads, mode="train",
                                      num_classes=cfg.model.num_classes, device=device)
        workloads.append(bench.training_workload(bench_cfg, job["model"], res, train=cfg.train))
    return take_turns(workloads, settings, settings.train_seconds, "training", progress)


def take_turns(workloads: Sequence[Any], settings: BenchSettings, seconds: float, what: str,
               progress: bool = False) -> SpeedMeasurement:
    """Images/s of each of `bench`'s workloads, built so that the ratios between them hold from one call to
    the next on a machine other work shares:

    - two calibration steps per workload first (the first also builds oneDNN's primitives for its
      shapes), and from the second one's time the number of steps that fills `seconds`, at least the
      workload's own `steps` (`seconds` 0: exactly those): a round of a fast recipe is then not a fraction
      of a second that one scheduler hiccup can halve;
    - the workloads take turns, round after round of warm-up + timed steps each, in this one process;
    - each figure is the first workload's median rate times the median over the rounds of the workload's
      rate over the first one's in the same round (measured back to back), so that a change of load
      between rounds moves every workload of the round alike and cancels in the ratios. The first
      figure is its median; the absolute figures still depend on the load;
    - after `settings.rounds` rounds, more rounds while any workload's standard error against the others
      (`relative_errors`) is above `settings.target_error`, up to `settings.max_rounds` (with one workload,
      or a target of 0, exactly `settings.rounds`): a noisy machine gets a longer measurement, a quiet one
      a short one. The table prints each error and how long the measurement took, so a reader can tell a
      difference between rows from the measurement's own noise (docs/PERFORMANCE.md has what calls on
      one machine gave).

    `what` ("training", "inference") names the measurement in the progress bar and the result."""
    import dataclasses

    from ipu_effnet.analysis import bench
    from ipu_effnet.console import progress_bar as tqdm  # tqdm on a terminal, plain lines in a log

    started = time.perf_counter()
    workloads = list(workloads)
    if seconds > 0:
        for workload in workloads:
            bench.set_threads(workload.config.threads)
            workload.begin()
            try:
                workload.step()  # the first step of a shape also builds oneDNN's primitives: not timed
                workload.sync()
                start = time.perf_counter()
                workload.step()
                workload.sync()
                took = max(time.perf_counter() - start, 1e-6)
            finally:
                workload.end()
            steps = max(workload.config.steps, int(-(-seconds // took)))
            workload.config = dataclasses.replace(workload.config, steps=steps)
    rates: List[List[float]] = [[] for _ in workloads]
    target = settings.target_error if len(workloads) > 1 else 0.0
    most = max(settings.rounds, settings.max_rounds) if target > 0 else settings.rounds
    bar = tqdm(total=settings.rounds * len(workloads), desc=f"{what} speed", unit="run",
               disable=not progress, leave=False, dynamic_ncols=True)
    errors: List[Optional[float]] = []
    for done in range(1, most + 1):
        for i, workload in enumerate(workloads):
            rates[i].append(bench.measure(workload).images_per_s)
            bar.update(1)
        errors = relative_errors(rates)
        worst = max((e for e in errors if e is not None), default=None)
        if worst is not None:
            bar.set_postfix(error=f"{worst:.1%}")
        if done >= settings.rounds and (target <= 0 or (worst is not None and worst <= target)):
            break
        if done >= settings.rounds and done < most:  # one more round
            bar.total = (done + 1) * len(workloads)
            bar.refresh()
    bar.close()
    seconds_taken = time.perf_counter() - started
    if not rates or not rates[0]:
        return SpeedMeasurement([], [], rates, seconds_taken, target, what)
    first = statistics.median(rates[0])
    figures = [first] + [first * statistics.median([r / r0 for r, r0 in zip(job_rates, rates[0])])
                         for job_rates in rates[1:]]
    return SpeedMeasurement(figures, errors, rates, seconds_taken, target, what)


# ----------------------------------------------------------------------------------------------------
# The comparison


def _resolutions(summary: Dict[str, Any], cfg: Any) -> Dict[str, int]:
    from ipu_effnet.analysis.sweep import run_resolutions

    train_res, test_res = run_resolutions(cfg, summary)
    return {"train_resolution": train_res, "test_resolution": test_res}


def _sweep_fresh(run_dir: Path) -> bool:
    csv_path, summary = run_dir / "sweep.csv", run_dir / "summary.json"
    return csv_path.is_file() and summary.is_file() and csv_path.stat().st_mtime >= summary.stat().st_mtime


def _check_same_config(cfg: Any, run_dir: Path, name: str, log: Callable[[str], None]) -> None:
    """Warn when a finished run was made from a different recipe than the one asked for now."""
    from ipu_effnet.config import load

    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return
    try:
        old = load(stored).to_dict()
    except UsageError:
        return
    new = cfg.to_dict()
    old.pop("logging", None)
    new.pop("logging", None)
    if old != new:
        diff = sorted(f"{k}" for k in new if old.get(k) != new.get(k))
        log(f"warning: {name}: {run_dir} was trained from a different config (sections {', '.join(diff)}); "
            f"its results are reused: delete the directory to train it again")


def compare(recipes: Sequence[Recipe], out_dir: os.PathLike, overrides: Sequence[str] = (),
            sweep_resolutions: Optional[Sequence[int]] = None, bench: Optional[BenchSettings] = None,
            progress: bool = True, log: Callable[[str], None] = print,
            train_fn: Callable[..., Dict[str, Any]] = train_recipe, write: bool = True) -> CompareResult:
    """Run, sweep and measure each recipe, then write the table and plots into `out_dir` (`write`
    False: only the runs and their sweeps, for a caller that writes its own summary, as `study` does).

    `overrides` apply to every recipe (after its own). Configs are all loaded and checked before any
    training starts, so a typo in the last recipe fails in a second, not after an hour. A finished run's
    sweep is reused while it is newer than the run's summary and covers the resolutions asked for."""
    from ipu_effnet.analysis.report import write_outputs
    from ipu_effnet.analysis.sweep import (
        best_row,
        default_resolutions,
        read_summary,
        read_sweep_csv,
        resolve_checkpoint,
        sweep_checkpoint,
        write_sweep,
    )
    from ipu_effnet.config import load
    from ipu_effnet.console import progress_bar as tqdm  # tqdm on a terminal, plain lines in a log
    from ipu_effnet.training.checkpoint import load_checkpoint, rebuild_model

    bench = bench or BenchSettings()
    if not recipes:
        raise UsageError("compare needs at least one recipe")
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UsageError(f"recipe names must be unique, got {names}")
    out_dir = Path(out_dir)
    extra = list(overrides) + ([] if progress else ["logging.progress=false"])
    configs = [load(r.path, list(r.overrides) + extra) for r in recipes]

    rows: List[Dict[str, Any]] = []
    jobs: List[Dict[str, Any]] = []  # the training-step measurement, after every recipe has run
    sweeps: Dict[str, List[Dict[str, Any]]] = {}
    trained: List[str] = []
    skipped: List[str] = []
    bar = tqdm(total=len(recipes) * 3, desc="compare", unit="task", disable=not progress, dynamic_ncols=True)
    say = (lambda msg: tqdm.write(msg)) if progress else log
    for recipe, cfg in zip(recipes, configs):
        run_dir = out_dir / "runs" / recipe.name
        state = run_state(run_dir)
        bar.set_description(f"{recipe.name}: train")
        if state == "complete":
            skipped.append(recipe.name)
            _check_same_config(cfg, run_dir, recipe.name, say)
            say(f"{recipe.name}: complete in {run_dir}, not trained again")
            summary = read_summary(run_dir)
        else:
            say(f"{recipe.name}: {'resuming' if state == 'partial' else 'training'} in {run_dir}")
            summary = train_fn(cfg, run_dir, resume=state == "partial", source=recipe.path,
                               overrides=list(recipe.overrides) + extra, log=say)
            trained.append(recipe.name)
            summary = read_summary(run_dir) or dict(summary or {})
        bar.update(1)

        bar.set_description(f"{recipe.name}: sweep")
        res = _resolutions(summary, cfg)
        wanted = sorted(set(sweep_resolutions or default_resolutions(res["test_resolution"]))
                        | {res["test_resolution"]})
        rows_sweep = read_sweep_csv(run_dir / "sweep.csv") if _sweep_fresh(run_dir) else []
        if rows_sweep and sweep_resolutions is not None:  # reused only if it holds every size asked for
            kept = [r for r in rows_sweep if r["resolution"] in set(wanted)]
            rows_sweep = kept if len({r["resolution"] for r in kept}) == len(wanted) else []
        if not rows_sweep:
            rows_sweep = sweep_checkpoint(run_dir, wanted, progress=progress)
            write_sweep(rows_sweep, run_dir, res["train_resolution"], res["test_resolution"],
                        title=f"{recipe.name}: top-1 against test resolution")
        sweeps[recipe.name] = rows_sweep
        bar.update(1)

        bar.set_description(f"{recipe.name}: bench")
        ckpt = load_checkpoint(resolve_checkpoint(run_dir))
        cost_train = model_cost(ckpt["model_args"], res["train_resolution"])
        cost_test = model_cost(ckpt["model_args"], res["test_resolution"])
        network = rebuild_model(ckpt)  # its memory now; its speed below, all recipes in turn, then trained
        memory = inference_memory(network, res["test_resolution"], bench)
        at_test = [r for r in rows_sweep if r["resolution"] == res["test_resolution"]]
        best = best_row(rows_sweep)
        rows.append({
            "recipe": recipe.name,
            "model": summary.get("model") or ckpt["model_args"].get("name"),
            "norm": summary.get("norm") or cfg.norm.label,
            "kind": summary.get("recipe") or cfg.recipe,
            "params": cost_train["params"] / 1e6,
            **res,
            "gmacs_train": cost_train["gmacs"],
            "gmacs_test": cost_test["gmacs"],
            "train_images_per_sec": None,  # measured below, all recipes in turn
            "train_error": None,
            "run_train_images_per_sec": summary.get("train_images_per_sec"),
            "infer_images_per_sec": None,  # measured below, all recipes in turn
            "infer_error": None,
            "bench_batch": bench.batch,
            **memory,
            "top1": at_test[0]["top1"] if at_test else summary.get("val_top1"),
            "best_resolution": best["resolution"],
            "best_top1": best["top1"],
            "wall_seconds": summary.get("wall_seconds"),
        })
        jobs.append({"model": network, "cfg": cfg, "train_resolution": res["train_resolution"],
                     "test_resolution": res["test_resolution"]})
        bar.update(1)
    bar.close()
    inference = measure_inference_speed([{"model": j["model"], "resolution": j["test_resolution"]} for j in jobs],
                                        bench, progress=progress)
    training = measure_training_speed([dict(j, resolution=j["train_resolution"]) for j in jobs], bench,
                                      progress=progress)
    for row, rate, error in zip(rows, inference.rates, inference.errors):
        row["infer_images_per_sec"] = rate
        row["infer_error"] = error
    for row, rate, error in zip(rows, training.rates, training.errors):
        row["train_images_per_sec"] = rate
        row["train_error"] = error
    if not write:  # otherwise format_summary says it, under the table
        from ipu_effnet.analysis.report import speed_note

        say(speed_note(inference))
        say(speed_note(training))
    files = write_outputs(out_dir, rows, sweeps, training, inference) if write else {}
    return CompareResult(out_dir, rows, sweeps, trained, skipped, files, training, inference)


def elapsed(start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
