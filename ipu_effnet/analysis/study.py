"""Recipe study: the matrix norm x recipe kind x seed over `compare`, summarised over seeds, with verdicts
on the papers' claims from a stated rule.

    preset = load_preset("imagenette-cpu")              # configs/study/imagenette-cpu.yaml
    result = study(plan_study(preset, data="data/imagenette2-224", seeds=2), "runs/study")

Every (norm, kind, seed) is one `compare` recipe named `<norm>-<kind>-s<seed>` (train.seed = seed), so
the runs live in `out/runs/<name>/` and a rerun keeps finished runs and resumes interrupted ones exactly
as `compare` does. Outputs in `out/` (written by analysis/study_report.py):

    runs.csv                     one row per run (seed), compare's columns plus norm alias, kind and seed
    study.md, study.csv          one row per recipe (norm x kind): mean and standard deviation over seeds
    accuracy_vs_resolution.png   each recipe's mean sweep with a band of +- one standard deviation
    pareto.png                   mean top-1 against mean training / inference images/s, with error bars
    findings.md                  each claim: the measured difference, its spread and a verdict (`verdict`)

The verdict rule (`verdict`): with d the difference of the means in the direction the paper claims and
se its standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b) (sample standard deviations over seeds), the
claim is *supported* when d > 2 se, *contradicted* when d < -2 se, and *within noise* otherwise. With
fewer than 2 seeds on either side there is no spread to judge by: the numbers are given, no verdict.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from ipu_effnet.analysis.compare import MATRIX_NORMS
from ipu_effnet.errors import UsageError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "study"
PRESET_KEYS = ("description", "base", "norms", "kinds", "seeds", "resolutions", "overrides", "kind_overrides",
               "norm_overrides")
KIND_LABELS = {"native": "native", "halfres": "half-res + FT", "progressive": "progressive"}


def norm_label(norm: str) -> str:
    """"LN+PN" for "lnpn": the matrix's label, or the name itself where the matrix has none."""
    return MATRIX_NORMS[norm].label if norm in MATRIX_NORMS else norm


def recipe_label(norm: str, kind: str) -> str:
    """"LN+PN half-res + FT": what tables and plots call one recipe of the study."""
    return f"{norm_label(norm)} {KIND_LABELS.get(kind, kind)}"

# Per-run quantities summarised over seeds (mean, std): study.csv has <key>_mean and <key>_std.
SUMMARY_METRICS = ("top1", "best_resolution", "best_top1", "train_images_per_sec", "run_train_images_per_sec",
                   "infer_images_per_sec", "wall_seconds")
# Per-run quantities every seed shares (the network and the sizes): copied once.
SHARED_FIELDS = ("model", "norm_kind", "params", "train_resolution", "test_resolution", "gmacs_train", "gmacs_test")
STUDY_COLUMNS = ["recipe", "norm", "kind", "seeds"] + list(SHARED_FIELDS) + \
    [f"{k}_{s}" for k in SUMMARY_METRICS for s in ("mean", "std")]
RUN_COLUMNS = ["run", "recipe", "norm", "kind", "seed", "model", "norm_kind", "params", "train_resolution",
               "test_resolution", "gmacs_train", "gmacs_test", "train_images_per_sec", "train_error",
               "run_train_images_per_sec", "infer_images_per_sec", "infer_error", "peak_memory_mb", "top1",
               "best_resolution", "best_top1", "wall_seconds"]

VERDICT_RULE = ("d = the difference of the means over seeds, in the direction the paper claims; se = its "
                "standard error, sqrt(s_a^2/n_a + s_b^2/n_b) with s the sample standard deviation over seeds "
                "(one-sided quantities: s/sqrt(n)). supported: d > 2 se; contradicted: d < -2 se; within noise: "
                "otherwise. Fewer than 2 seeds on a side: no verdict.")


@dataclass
class Preset:
    """A study preset: the recipe every run starts from and the matrix on top of it."""

    name: str
    base: str
    norms: List[str]
    kinds: List[str]
    seeds: int = 1
    resolutions: Optional[List[int]] = None
    overrides: List[str] = field(default_factory=list)
    kind_overrides: Dict[str, List[str]] = field(default_factory=dict)
    norm_overrides: Dict[str, List[str]] = field(default_factory=dict)
    description: str = ""


@dataclass
class StudyRun:
    name: str       # <norm>-<kind>-s<seed>: the compare recipe and its run directory
    recipe: str     # <norm>-<kind>
    norm: str
    kind: str
    seed: int
    overrides: List[str]


@dataclass
class StudyPlan:
    preset: Preset
    runs: List[StudyRun]
    overrides: List[str]                # for every run, after its own (data, classes, then --set)
    resolutions: Optional[List[int]]
    data: str


@dataclass
class Verdict:
    diff: float                 # in the claim's direction: positive agrees with the paper
    se: Optional[float]         # standard error of diff; None with fewer than 2 seeds on a side
    verdict: Optional[str]      # "supported", "contradicted", "within noise"; None without spread
    n: Tuple[int, int]


# ----------------------------------------------------------------------------------------------------
# Presets and the plan


def _str_list(value: Any, where: str) -> List[str]:
    if isinstance(value, str):
        value = [x.strip() for x in value.split(",") if x.strip()]
    if not isinstance(value, list) or not all(isinstance(x, (str, int)) for x in value):
        raise UsageError(f"{where}: expected a list of strings, got {value!r}")
    return [str(x) for x in value]


def preset_path(name: str) -> Path:
    """A preset name (configs/study/<name>.yaml) or a path to a preset file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    q = PRESET_DIR / f"{name}.yaml"
    if q.is_file():
        return q
    known = sorted(x.stem for x in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise UsageError(f"--preset {name}: no such preset (known: {', '.join(known) or 'none'}; or give a .yaml file)")


def load_preset(name: str) -> Preset:
    """Read and check a preset file: unknown keys, bad norms or kinds fail with one line."""
    from ipu_effnet.config import RECIPES

    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of {', '.join(PRESET_KEYS)}")
    unknown = sorted(set(data) - set(PRESET_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(PRESET_KEYS)}")
    if "base" not in data:
        raise UsageError(f"{path}: 'base' (the recipe every run starts from) is missing")
    base = (path.parent / str(data["base"])).resolve()
    if not base.is_file():
        raise UsageError(f"{path}: base {data['base']}: no such file")
    preset = Preset(name=path.stem, base=str(base),
                    norms=_str_list(data.get("norms", ["bn", "gn", "ln", "lnpn"]), f"{path}: norms"),
                    kinds=_str_list(data.get("kinds", ["native", "halfres"]), f"{path}: kinds"),
                    description=str(data.get("description", "")).strip())
    seeds = data.get("seeds", 1)
    if not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"{path}: seeds must be a whole number >= 1, got {seeds!r}")
    preset.seeds = seeds
    if data.get("resolutions") is not None:
        res = data["resolutions"]
        if not isinstance(res, list) or not all(isinstance(r, int) and r >= 8 for r in res):
            raise UsageError(f"{path}: resolutions must be a list of sizes >= 8 px, got {res!r}")
        preset.resolutions = sorted(set(res))
    preset.overrides = _str_list(data.get("overrides") or [], f"{path}: overrides")
    for key, allowed, label in (("kind_overrides", RECIPES, "kind"), ("norm_overrides", tuple(MATRIX_NORMS), "norm")):
        section = data.get(key) or {}
        if not isinstance(section, dict):
            raise UsageError(f"{path}: {key} must map a {label} to a list of KEY=VALUE overrides")
        for k, v in section.items():
            if k not in allowed:
                raise UsageError(f"{path}: {key}: {k!r} is not a {label} (expected some of {', '.join(allowed)})")
            getattr(preset, key)[k] = _str_list(v or [], f"{path}: {key}.{k}")
    check_matrix(preset.norms, preset.kinds, str(path))
    return preset


def check_matrix(norms: Sequence[str], kinds: Sequence[str], where: str) -> None:
    from ipu_effnet.config import RECIPES

    if not norms or not kinds:
        raise UsageError(f"{where}: a study needs at least one norm and one recipe kind")
    for n in norms:
        if n not in MATRIX_NORMS:
            raise UsageError(f"{where}: norm {n!r}: expected some of {', '.join(MATRIX_NORMS)}")
    for k in kinds:
        if k not in RECIPES:
            raise UsageError(f"{where}: recipe kind {k!r}: expected some of {', '.join(RECIPES)}")
    for name, values in (("norms", norms), ("kinds", kinds)):
        if len(set(values)) != len(values):
            raise UsageError(f"{where}: {name} {', '.join(values)}: each may appear once")


def count_classes(data: os.PathLike) -> int:
    """Class folders under DIR/train (or, without train/, DIR/val or DIR/validation)."""
    root = Path(data)
    for split in ("train", "val", "validation"):
        d = root / split
        if d.is_dir():
            n = sum(1 for p in d.iterdir() if p.is_dir())
            if n:
                return n
    raise UsageError(f"--data {data}: expected train/<class>/<image> and val/<class>/<image> "
                     "(or validation/) under it; `download imagenette --to DIR` fetches a copy")


def plan_study(preset: Preset, data: str, seeds: Optional[int] = None, norms: Optional[Sequence[str]] = None,
               kinds: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
               resolutions: Optional[Sequence[int]] = None) -> StudyPlan:
    """The runs of a study: `norms` x `kinds` x seeds 0..seeds-1 (None: the preset's)."""
    norms = list(norms) if norms else list(preset.norms)
    kinds = list(kinds) if kinds else list(preset.kinds)
    check_matrix(norms, kinds, "study")
    seeds = preset.seeds if seeds is None else int(seeds)
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: at least 1")
    for text in overrides:
        if text.replace(" ", "").startswith("train.seed="):
            raise UsageError(f"--set {text}: the study sets train.seed per run (0 .. seeds - 1); use --seeds")
    if not Path(data).is_dir():
        raise UsageError(f"--data {data}: no such directory; `download imagenette --to DIR` fetches a copy")
    classes = count_classes(data)
    runs = []
    for norm in norms:
        for kind in kinds:
            for seed in range(seeds):
                own = MATRIX_NORMS[norm].overrides + [f"recipe={kind}"]
                own += preset.kind_overrides.get(kind, []) + preset.norm_overrides.get(norm, [])
                own.append(f"train.seed={seed}")
                runs.append(StudyRun(f"{norm}-{kind}-s{seed}", f"{norm}-{kind}", norm, kind, seed, own))
    every = ["data.dataset=imagenet", f"data.path={Path(data).resolve()}", f"model.num_classes={classes}"]
    every += list(preset.overrides) + list(overrides)
    res = sorted(set(int(r) for r in resolutions)) if resolutions else preset.resolutions
    return StudyPlan(preset, runs, every, res, str(data))


# ----------------------------------------------------------------------------------------------------
# Statistics and verdicts


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1) of the values that are not None; std None below 2."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def verdict(a: Sequence[float], b: Optional[Sequence[float]] = None, sign: int = 1) -> Verdict:
    """The rule for one claim. `a`, `b`: per-seed values of the two sides (b None: compare a with 0, e.g.
    a resolution gap); `sign` +1 when the paper says a > b, -1 when it says a < b."""
    a = [float(x) for x in a]
    b = None if b is None else [float(x) for x in b]
    if not a or (b is not None and not b):
        raise ValueError("verdict needs at least one value on each side")
    diff = sign * (statistics.fmean(a) - (statistics.fmean(b) if b is not None else 0.0))
    n = (len(a), len(b) if b is not None else 0)
    if len(a) < 2 or (b is not None and len(b) < 2):
        return Verdict(diff, None, None, n)
    var = statistics.variance(a) / len(a) + (statistics.variance(b) / len(b) if b is not None else 0.0)
    se = math.sqrt(var)
    if diff > 2 * se:
        word = "supported"
    elif diff < -2 * se:
        word = "contradicted"
    else:
        word = "within noise"
    return Verdict(diff, se, word, n)


# ----------------------------------------------------------------------------------------------------
# Running it


@dataclass
class StudyResult:
    out_dir: Path
    runs: List[Dict[str, Any]]
    recipes: List[Dict[str, Any]]
    sweeps: Dict[str, List[Dict[str, Any]]]     # per recipe: resolution, top1_mean, top1_std, seeds
    findings: List[Dict[str, Any]]
    files: Dict[str, Path]
    trained: List[str]
    skipped: List[str]


def study(plan: StudyPlan, out_dir: os.PathLike, bench: Any = None, progress: bool = True,
          log: Callable[[str], None] = print, train_fn: Optional[Callable[..., Dict[str, Any]]] = None,
          wall_seconds: Optional[float] = None) -> StudyResult:
    """Run (or resume) every run of `plan` through `compare`, then write the study's outputs."""
    import time

    from ipu_effnet.analysis.compare import Recipe, compare, train_recipe
    from ipu_effnet.analysis.study_report import write_study

    start = time.perf_counter()
    out_dir = Path(out_dir)
    recipes = [Recipe(r.name, plan.preset.base, list(r.overrides)) for r in plan.runs]
    result = compare(recipes, out_dir, overrides=plan.overrides, sweep_resolutions=plan.resolutions, bench=bench,
                     progress=progress, log=log, train_fn=train_fn or train_recipe, write=False)
    by_name = {row["recipe"]: row for row in result.rows}
    runs = []
    for r in plan.runs:
        row = dict(by_name[r.name])
        row.update(run=r.name, recipe=r.recipe, norm=r.norm, kind=r.kind, seed=r.seed, norm_kind=row.get("norm"))
        row["norm"] = r.norm
        runs.append(row)
    recipes_rows = summarise(runs)
    sweeps = summarise_sweeps(plan.runs, result.sweeps)
    findings = findings_for(runs)
    elapsed = wall_seconds if wall_seconds is not None else time.perf_counter() - start
    files = write_study(out_dir, plan, runs, recipes_rows, sweeps, findings, elapsed)
    return StudyResult(out_dir, runs, recipes_rows, sweeps, findings, files, result.trained, result.skipped)


def summarise(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per recipe (norm x kind, in the runs' order): shared fields, and mean/std over seeds."""
    order: List[str] = []
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        if r["recipe"] not in groups:
            order.append(r["recipe"])
            groups[r["recipe"]] = []
        groups[r["recipe"]].append(r)
    out = []
    for name in order:
        rows = groups[name]
        row: Dict[str, Any] = {"recipe": name, "norm": rows[0]["norm"], "kind": rows[0]["kind"], "seeds": len(rows)}
        for key in SHARED_FIELDS:
            row[key] = rows[0].get(key)
        for key in SUMMARY_METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([x.get(key) for x in rows])
        out.append(row)
    return out


def summarise_sweeps(runs: Sequence[StudyRun], sweeps: Dict[str, List[Dict[str, Any]]]
                     ) -> Dict[str, List[Dict[str, Any]]]:
    """Per recipe and test resolution, mean and std of top-1 over the seeds that evaluated it."""
    per: Dict[str, Dict[int, List[float]]] = {}
    for r in runs:
        table = per.setdefault(r.recipe, {})
        for row in sweeps.get(r.name, []):
            table.setdefault(int(row["resolution"]), []).append(float(row["top1"]))
    out = {}
    for recipe, table in per.items():
        rows = []
        for res in sorted(table):
            m, s = mean_std(table[res])
            rows.append({"resolution": res, "top1_mean": m, "top1_std": s, "seeds": len(table[res])})
        out[recipe] = rows
    return out


# (claim id, statement, metric, a recipe, b recipe or None (a one-sided gap), sign, unit)
def claims_for(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The claims the study can check with the recipes it ran."""
    have = {r["recipe"] for r in runs}
    norms = []
    for r in runs:
        if r["norm"] not in norms:
            norms.append(r["norm"])
    claims = []
    pairs = [("lnpn", "bn", "LN+PN matches or beats BN at the native test resolution (Proxy Norm; Masters et al.)"),
             ("lnpn", "ln", "Proxy Norm lifts LayerNorm: LN+PN above plain LN (Proxy Norm's own claim)"),
             ("lnpn", "gn", "LN+PN above GN at the native test resolution (Masters et al.: G16 LN+PN 79.4 % vs GN "
                            "79.1 % on ImageNet)")]
    for a, b, text in pairs:
        claims.append({"id": f"{a}-vs-{b}", "claim": text, "metric": "top1", "a": f"{a}-native",
                       "b": f"{b}-native", "sign": 1, "unit": "points"})
    for norm in norms:
        label = norm_label(norm)
        claims.append({"id": f"halfres-vs-native-{norm}", "metric": "top1", "a": f"{norm}-halfres",
                       "b": f"{norm}-native", "sign": 1, "unit": "points",
                       "claim": f"{label}: half-res training + fine-tune beats native training at the native test "
                                "resolution (Masters et al., section on half-resolution training)"})
    for norm in norms:
        label = norm_label(norm)
        claims.append({"id": f"fixres-{norm}", "metric": "resolution_gap", "a": f"{norm}-native", "b": None,
                       "sign": 1, "unit": "px",
                       "claim": f"{label} native: the best test resolution lies above the training resolution "
                                "(FixRes, Touvron et al.)"})
    for norm in norms:
        label = norm_label(norm)
        claims.append({"id": f"halfres-speed-{norm}", "metric": "train_images_per_sec", "a": f"{norm}-halfres",
                       "b": f"{norm}-native", "sign": 1, "unit": "img/s",
                       "claim": f"{label}: half-res training runs faster than native training (about half the "
                                "pixels per image)"})
    for c in claims:
        c["available"] = c["a"] in have and (c["b"] is None or c["b"] in have)
    return claims


def _values(runs: Sequence[Dict[str, Any]], recipe: str, metric: str) -> List[float]:
    out = []
    for r in runs:
        if r["recipe"] != recipe:
            continue
        if metric == "resolution_gap":
            value = None if r.get("best_resolution") is None else r["best_resolution"] - r["train_resolution"]
        else:
            value = r.get(metric)
        if value is not None:
            out.append(float(value))
    return out


def findings_for(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each available claim with both sides' per-seed values, the difference, its spread and the verdict."""
    out = []
    for c in claims_for(runs):
        if not c["available"]:
            continue
        a = _values(runs, c["a"], c["metric"])
        b = _values(runs, c["b"], c["metric"]) if c["b"] is not None else None
        if not a or (b is not None and not b):
            continue
        v = verdict(a, b, c["sign"])
        scale = 100.0 if c["metric"] == "top1" else 1.0
        row = dict(c, a_values=a, b_values=b, diff=v.diff * scale, se=None if v.se is None else v.se * scale,
                   verdict=v.verdict, n=v.n)
        row["a_mean"], row["a_std"] = (x * scale if x is not None else None for x in mean_std(a))
        row["b_mean"], row["b_std"] = ((x * scale if x is not None else None for x in mean_std(b))
                                       if b is not None else (None, None))
        if c["metric"] == "train_images_per_sec" and row["b_mean"]:
            row["ratio"] = row["a_mean"] / row["b_mean"]
        out.append(row)
    return out
