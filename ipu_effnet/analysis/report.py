"""The outputs of a recipe comparison (`compare`): its table (`COLUMNS`, `format_table`), the summary
printed at the end, the note on what the memory column measured, and the files `write_outputs` writes
(compare.md, compare.csv, accuracy_vs_resolution.png, pareto.png, training_speed.json,
inference_speed.json)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from ipu_effnet.analysis.compare import CompareResult, SpeedMeasurement

# (key, markdown header, format) in table order.
COLUMNS = [
    ("recipe", "recipe", "{}"),
    ("model", "model", "{}"),
    ("norm", "norm", "{}"),
    ("kind", "recipe kind", "{}"),
    ("params", "params (M)", "{:.3f}"),
    ("train_resolution", "train px", "{}"),
    ("test_resolution", "test px", "{}"),
    ("gmacs_train", "GMACs train", "{:.4f}"),
    ("gmacs_test", "GMACs test", "{:.4f}"),
    ("train_images_per_sec", "train img/s", "{:.1f}"),
    ("train_error", "train ±", "{:.1%}"),
    ("run_train_images_per_sec", "train img/s (run)", "{:.1f}"),
    ("infer_images_per_sec", "infer img/s", "{:.1f}"),
    ("infer_error", "infer ±", "{:.1%}"),
    ("peak_memory_mb", "peak mem (MB)", "{:.1f}"),
    ("top1", "top-1 @ test px", "{:.2%}"),
    ("best_resolution", "best px", "{}"),
    ("best_top1", "top-1 @ best px", "{:.2%}"),
    ("wall_seconds", "wall (s)", "{:.0f}"),
]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The comparison as a Markdown table (also readable as plain text)."""
    header = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k in ("recipe", "model", "norm", "kind") else "---:" for k, _, _ in COLUMNS) + "|"
    lines = [header, rule]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def format_summary(result: CompareResult) -> str:
    """A few lines for the end of a comparison: the most accurate and the fastest recipe, then the table."""
    rows = result.rows
    lines = []
    if rows:
        best = max(rows, key=lambda r: (r["top1"] or 0.0))
        lines.append(f"most accurate: {best['recipe']} ({best['top1']:.2%} top-1 at {best['test_resolution']} px; "
                     f"{best['best_top1']:.2%} at its best test resolution {best['best_resolution']} px)")
        timed = [r for r in rows if r.get("train_images_per_sec")]
        if timed:
            fast = max(timed, key=lambda r: r["train_images_per_sec"])
            lines.append(f"fastest training: {fast['recipe']} ({fast['train_images_per_sec']:.1f} img/s, "
                         f"{fast['top1']:.2%} top-1)")
        fast_inf = max(rows, key=lambda r: r["infer_images_per_sec"])
        lines.append(f"fastest inference: {fast_inf['recipe']} ({fast_inf['infer_images_per_sec']:.1f} img/s at "
                     f"{fast_inf['test_resolution']} px)")
    for speed in (result.inference_speed, result.training_speed):
        if speed is not None and speed.rounds:
            lines.append(speed_note(speed))
    if result.skipped:
        lines.append(f"reused {len(result.skipped)} complete run(s): {', '.join(result.skipped)}")
    lines.append("")
    lines.append(format_table(rows))
    lines.append("")
    lines.append("files: " + ", ".join(str(p) for p in result.files.values()))
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def speed_note(speed: SpeedMeasurement) -> str:
    """The sentence that says how the "train img/s" or "infer img/s" column was measured and how precise it
    came out."""
    jobs = len(speed.round_rates)
    text = (f"{speed.what} speed: {_count(speed.rounds, 'round')} of {_count(jobs, 'recipe')} taking turns, "
            f"{speed.seconds:.0f} s in all")
    known = [e for e in speed.errors if e is not None]
    if known:
        text += f"; standard error {min(known):.1%}-{max(known):.1%}"
        if speed.target_error > 0 and max(known) > speed.target_error:
            text += (f" (the largest, {max(known):.2%}, above the {speed.target_error:.2%} aimed at: "
                     "the rounds ran out)")
    return text


def memory_note(rows: Sequence[Dict[str, Any]]) -> str:
    """The sentence under the table that says what "peak mem (MB)" measured."""
    from ipu_effnet.analysis.bench import MEMORY_STEPS

    kinds = {r.get("memory_kind") for r in rows}
    parts = []
    if "vmhwm" in kinds:
        built = [r["built_memory_mb"] for r in rows if r.get("memory_kind") == "vmhwm" and r.get("built_memory_mb")]
        low, high = (f"{min(built):.0f}", f"{max(built):.0f}") if built else ("", "")
        span = "most" if not built else f"{low} MB" if low == high else f"{low}-{high} MB"
        parts.append("peak mem (CPU): the peak resident memory (VmHWM) of a fresh Python process that builds the "
                     f"recipe's network from its checkpoint's model_args and runs {MEMORY_STEPS} inference steps of its "
                     "inference copy, "
                     "as `bench` "
                     f"measures it; the interpreter and torch are included ({span} of it before the first step, "
                     "built_memory_mb in compare.csv), so the differences between rows are what the networks and "
                     "their activations need.")
    if "cuda" in kinds:
        parts.append("peak mem (GPU): CUDA max allocated during the warm-up and the least timed inference passes, "
                     "above what was allocated before.")
    if None in kinds:
        parts.append("peak mem \"-\": not measured.")
    return " ".join(parts)


def _speed_clause(speed: Optional[SpeedMeasurement]) -> str:
    if speed is None or not speed.rounds:
        return ""
    return f", {_count(speed.rounds, 'round')} in {speed.seconds:.0f} s"


def write_outputs(out_dir: Path, rows: Sequence[Dict[str, Any]], sweeps: Dict[str, List[Dict[str, Any]]],
                  training_speed: Optional[SpeedMeasurement] = None,
                  inference_speed: Optional[SpeedMeasurement] = None) -> Dict[str, Path]:
    from ipu_effnet.analysis.plots import plot_accuracy_vs_resolution, plot_pareto

    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "compare.md"
    md.write_text(
        "# Recipe comparison\n\n" + format_table(rows) + "\n\n"
        f"Inference images/s and peak memory, measured on this machine on each network's inference copy "
        f"(BatchNorm folded, Proxy Norm frozen, channels_last) at the test resolution, batch "
        f"{rows[0].get('bench_batch', '-') if rows else '-'}, the same settings for every recipe, the recipes "
        f"taking turns (median of the rounds{_speed_clause(inference_speed)}); {memory_note(rows)} Training "
        "images/s: the recipe's training step at its training resolution and micro-batch, measured here the same "
        f"way (the recipes taking turns{_speed_clause(training_speed)}). \"train ±\" and \"infer ±\" are the "
        "standard errors of a recipe's rate relative to the other recipes' (each round's rates over their "
        "geometric mean); the ratio of two "
        "rows is uncertain by about the root sum of squares of their errors. \"(run)\" and wall time come from "
        "each run's summary.json. How to read this: docs/recipes.md.\n",
        encoding="utf-8")
    csv_path = out_dir / "compare.csv"
    keys = [k for k, _, _ in COLUMNS] + ["memory_kind", "built_memory_mb", "memory_method", "bench_batch"]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    acc = plot_accuracy_vs_resolution([(r["recipe"], sweeps[r["recipe"]], r["train_resolution"]) for r in rows],
                                      out_dir / "accuracy_vs_resolution.png")
    par = plot_pareto([r["recipe"] for r in rows], [r["top1"] or 0.0 for r in rows],
                      [r.get("train_images_per_sec") for r in rows], [r.get("infer_images_per_sec") for r in rows],
                      out_dir / "pareto.png", train_error=[r.get("train_error") for r in rows],
                      infer_error=[r.get("infer_error") for r in rows])
    files = {"compare.md": md, "compare.csv": csv_path, "accuracy_vs_resolution.png": acc, "pareto.png": par}
    for speed in (training_speed, inference_speed):
        if speed is not None and speed.rounds:
            name = f"{speed.what}_speed.json"
            files[name] = write_speed(out_dir / name, rows, speed)
    return files


def write_speed(path: Path, rows: Sequence[Dict[str, Any]], speed: SpeedMeasurement) -> Path:
    """Every round's rate of every recipe, beside the figures and standard errors the table shows, for a reader
    who wants to see how the measurement moved (or to judge it another way)."""
    import json

    recipes = {row["recipe"]: {"images_per_sec": rate, "error": error, "rounds": rounds}
               for row, rate, error, rounds in zip(rows, speed.rates, speed.errors, speed.round_rates)}
    data = {"measurement": speed.what, "rounds": speed.rounds, "seconds": speed.seconds, "target_error": speed.target_error,
            "recipes": recipes,
            "method": "the recipes take turns; the first recipe's figure is the median of its rounds, every other "
                      "recipe's the first's median times the median of its per-round ratios to the first"}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path
