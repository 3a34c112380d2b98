"""The outputs of a recipe study (`study`): the per-run and per-recipe CSVs, study.md with its table,
findings.md with each claim's verdict, the two plots, and the text the `study` command prints."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ipu_effnet.analysis.study import (
    RUN_COLUMNS,
    STUDY_COLUMNS,
    VERDICT_RULE,
    StudyPlan,
    StudyResult,
    recipe_label,
)


def _num(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _pm(mean: Any, std: Any, fmt: str, scale: float = 1.0) -> str:
    if mean is None:
        return "-"
    text = fmt.format(mean * scale)
    return text if std is None else f"{text} ± {fmt.format(std * scale)}"


def format_study_table(recipes: Sequence[Dict[str, Any]]) -> str:
    header = ("| recipe | seeds | train px | test px | top-1 @ test px (%) | best px | top-1 @ best px (%) | "
              "train img/s | infer img/s | GMACs train | GMACs test | params (M) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [header, rule]
    for r in recipes:
        label = recipe_label(r["norm"], r["kind"])
        lines.append("| " + " | ".join([
            label, str(r["seeds"]), _num(r["train_resolution"], "{}"), _num(r["test_resolution"], "{}"),
            _pm(r["top1_mean"], r["top1_std"], "{:.1f}", 100.0),
            _pm(r["best_resolution_mean"], r["best_resolution_std"], "{:.0f}"),
            _pm(r["best_top1_mean"], r["best_top1_std"], "{:.1f}", 100.0),
            _pm(r["train_images_per_sec_mean"], r["train_images_per_sec_std"], "{:.1f}"),
            _pm(r["infer_images_per_sec_mean"], r["infer_images_per_sec_std"], "{:.1f}"),
            _num(r["gmacs_train"], "{:.4f}"), _num(r["gmacs_test"], "{:.4f}"),
            _num(None if r["params"] is None else r["params"], "{:.3f}"),
        ]) + " |")
    return "\n".join(lines)


def format_finding(f: Dict[str, Any]) -> str:
    unit = f["unit"]
    fmt = "{:+.1f}" if unit != "px" else "{:+.0f}"
    spread = "" if f["se"] is None else f" ± {f['se']:.1f} (standard error)"
    a_side = _pm(f["a_mean"], f["a_std"], "{:.1f}")
    if f["b"] is None:
        sides = f"{f['a']}: best minus training resolution {a_side} {unit} over {f['n'][0]} seed(s)"
    else:
        sides = (f"{f['a']} {a_side} vs {f['b']} {_pm(f['b_mean'], f['b_std'], '{:.1f}')} {unit} "
                 f"({f['n'][0]} and {f['n'][1]} seed(s))")
    ratio = f"; ratio {f['ratio']:.2f}x" if f.get("ratio") else ""
    word = f["verdict"] or "no verdict (fewer than 2 seeds)"
    return (f"- **{word}**: {f['claim']}. Measured difference {fmt.format(f['diff'])} {unit}{spread}{ratio}; "
            f"{sides}.")


def format_findings(findings: Sequence[Dict[str, Any]]) -> str:
    lines = ["# Findings", "", f"Verdict rule: {VERDICT_RULE}", ""]
    if not findings:
        lines.append("No claim could be checked: the study lacks the recipes the claims compare.")
    lines.extend(format_finding(f) for f in findings)
    return "\n".join(lines) + "\n"


def write_study(out_dir: Path, plan: StudyPlan, runs: Sequence[Dict[str, Any]], recipes: Sequence[Dict[str, Any]],
                sweeps: Dict[str, List[Dict[str, Any]]], findings: Sequence[Dict[str, Any]],
                wall_seconds: float) -> Dict[str, Path]:
    from ipu_effnet.analysis.plots import plot_accuracy_bands, plot_pareto_errorbars

    out_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, Path] = {}
    runs_csv = out_dir / "runs.csv"
    _write_csv(runs_csv, RUN_COLUMNS, runs)
    files["runs.csv"] = runs_csv
    study_csv = out_dir / "study.csv"
    _write_csv(study_csv, STUDY_COLUMNS, recipes)
    files["study.csv"] = study_csv
    seeds = sorted({r["seed"] for r in runs})
    md = out_dir / "study.md"
    md.write_text(
        f"# Recipe study: {plan.preset.name}\n\n"
        f"Data: {plan.data}; {len(recipes)} recipes x {len(seeds)} seed(s) (train.seed {', '.join(map(str, seeds))}); "
        f"wall time of this call {wall_seconds / 60:.1f} min (reused runs cost nothing).\n\n"
        + format_study_table(recipes) + "\n\n"
        "Mean ± sample standard deviation over seeds (no ± with one seed). Training images/s: the recipe's "
        "training step at its training resolution, measured after training with every run taking turns "
        "(`compare`); inference images/s at the test resolution. Per-seed rows: runs.csv; verdicts: "
        "findings.md. How to read this: docs/study.md.\n", encoding="utf-8")
    files["study.md"] = md
    findings_md = out_dir / "findings.md"
    findings_md.write_text(format_findings(findings), encoding="utf-8")
    files["findings.md"] = findings_md
    label = {r["recipe"]: recipe_label(r["norm"], r["kind"]) for r in recipes}
    files["accuracy_vs_resolution.png"] = plot_accuracy_bands(
        [(label[r["recipe"]], sweeps.get(r["recipe"], []), r["train_resolution"]) for r in recipes],
        out_dir / "accuracy_vs_resolution.png",
        title=f"mean top-1 over {len(seeds)} seed(s), band: ± one standard deviation")
    files["pareto.png"] = plot_pareto_errorbars(
        [label[r["recipe"]] for r in recipes],
        [(r["top1_mean"] or 0.0, r["top1_std"]) for r in recipes],
        [(r["train_images_per_sec_mean"], r["train_images_per_sec_std"]) for r in recipes],
        [(r["infer_images_per_sec_mean"], r["infer_images_per_sec_std"]) for r in recipes],
        out_dir / "pareto.png")
    return files


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def format_result(result: StudyResult) -> str:
    lines = [format_study_table(result.recipes), "", format_findings(result.findings).rstrip()]
    if result.skipped:
        lines.append("")
        lines.append(f"reused {len(result.skipped)} complete run(s)")
    lines.append("")
    lines.append("files: " + ", ".join(str(p) for p in result.files.values()))
    return "\n".join(lines)
