"""Plots of the comparison tools: accuracy against test resolution (one checkpoint or many recipes) and
the accuracy/throughput Pareto plot. Matplotlib with the Agg backend (no display needed); every function
writes one PNG and returns its path.

How to read them is in docs/recipes.md. The Pareto front is computed by `pareto_front`, a pure function
(maximise both coordinates), so it is tested without drawing anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats in both coordinates (larger is better in both),
    ordered by increasing x. A point equal to another in both coordinates is kept once (the first)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    front: List[int] = []
    best_y = float("-inf")
    for i in order:  # walking from the largest x down, a point is on the front if its y beats all so far
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: (points[i][0], i))


def _best(rows: Sequence[Dict[str, float]]) -> Dict[str, float]:
    return max(rows, key=lambda r: (r["top1"], -abs(r["resolution"])))


def plot_sweep(rows: Sequence[Dict[str, float]], path: os.PathLike, train_resolution: Optional[int] = None,
               test_resolution: Optional[int] = None, title: str = "") -> Path:
    """Top-1 against test resolution for one checkpoint; the training resolution as a vertical line
    (and the native test resolution, dotted, where it differs), the best point annotated."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["resolution"])
    xs = [r["resolution"] for r in rows]
    ys = [100.0 * r["top1"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, ys, marker="o", color="tab:blue", label="top-1")
    if train_resolution:
        ax.axvline(train_resolution, color="tab:red", linestyle="--", linewidth=1,
                   label=f"training resolution ({train_resolution} px)")
    if test_resolution and test_resolution != train_resolution:
        ax.axvline(test_resolution, color="tab:green", linestyle=":", linewidth=1,
                   label=f"native test resolution ({test_resolution} px)")
    if rows:
        best = _best(rows)
        bx, by = best["resolution"], 100.0 * best["top1"]
        ax.scatter([bx], [by], s=80, facecolors="none", edgecolors="black", zorder=3)
        ax.annotate(f"best {by:.1f}% at {bx} px", (bx, by), textcoords="offset points", xytext=(6, -14),
                    fontsize=9)
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title or "accuracy against test resolution")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return _save(plt, fig, path)


def _mark_training_resolution(ax: Any, line: Any, xs: Sequence[int], ys: Sequence[float],
                              train_res: Optional[int]) -> None:
    """A square of the line's colour where it passes the training resolution, and a dotted vertical line."""
    if not train_res:
        return
    at = [y for x, y in zip(xs, ys) if x == train_res]
    if at:
        ax.scatter([train_res], at, marker="s", s=50, color=line.get_color(), zorder=3)
    ax.axvline(train_res, color=line.get_color(), linestyle=":", linewidth=0.8, alpha=0.6)


def plot_accuracy_vs_resolution(sweeps: Sequence[Tuple[str, Sequence[Dict[str, float]], Optional[int]]],
                                path: os.PathLike, title: str = "") -> Path:
    """Every recipe's sweep on one plot: `sweeps` holds (name, rows, training resolution). Each line's
    training resolution is marked with a square of the line's colour on the line (or a tick on the x axis
    where the sweep did not evaluate it), so several training resolutions stay readable on one plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, rows, train_res in sweeps:
        rows = sorted(rows, key=lambda r: r["resolution"])
        if not rows:
            continue
        xs = [r["resolution"] for r in rows]
        ys = [100.0 * r["top1"] for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        _mark_training_resolution(ax, line, xs, ys, train_res)
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title or "accuracy against test resolution (squares, dotted lines: training resolution)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


def _save(plt, fig, path: os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto_panel(ax, names: Sequence[str], xs: Sequence[Optional[float]], ys: Sequence[float], xlabel: str) -> None:
    keep = [i for i, x in enumerate(xs) if x is not None and x > 0]
    pts = [(float(xs[i]), ys[i]) for i in keep]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
    for (x, y), i in zip(pts, keep):
        ax.annotate(names[i], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = [pts[j] for j in pareto_front(pts)]
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", linestyle="--", linewidth=1,
                drawstyle="steps-pre" if len(front) > 1 else "default", label="Pareto front")
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=90, facecolors="none", edgecolors="tab:red",
                   zorder=4)
        ax.legend(fontsize=8, loc="best")  # away from the points and their names
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 at native resolution (%)")
    ax.grid(True, alpha=0.3)


def error_bar(x: Optional[float], error: Optional[float]) -> Optional[Tuple[float, float]]:
    """The extent of a throughput's error bar, x (1 - error) to x (1 + error), for a relative standard
    error; None when there is nothing to draw."""
    if x is None or x <= 0 or not error or error <= 0:
        return None
    return x * (1.0 - error), x * (1.0 + error)


def plot_pareto(names: Sequence[str], top1: Sequence[float], train_ips: Sequence[Optional[float]],
                infer_ips: Sequence[Optional[float]], path: os.PathLike, title: str = "",
                train_error: Optional[Sequence[Optional[float]]] = None,
                infer_error: Optional[Sequence[Optional[float]]] = None) -> Path:
    """Two panels: top-1 (fractions in, percent shown) against training and against inference images/s,
    each recipe a labelled point, the Pareto front (faster and more accurate is better) drawn dashed.
    `train_error` and `infer_error` (compare's "train ±" and "infer ±", a relative standard error per
    recipe) draw each rate's error as a horizontal bar (`error_bar`): points whose bars overlap are not
    told apart by the measurement."""
    plt = _pyplot()
    ys = [100.0 * t for t in top1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, xs, errors, label in ((left, train_ips, train_error, "training images/s"),
                                  (right, infer_ips, infer_error, "inference images/s")):
        bars = [error_bar(x, e) for x, e in zip(xs, errors or [])]
        for bar, y in zip(bars, ys):
            if bar is not None:
                ax.plot(bar, [y, y], color="tab:gray", linewidth=1.5, alpha=0.6, zorder=2, solid_capstyle="butt")
        _pareto_panel(ax, names, xs, ys, f"{label} (bar: ± one standard error)" if any(bars) else label)
    fig.suptitle(title or "accuracy against throughput (up and right is better)")
    return _save(plt, fig, path)


def plot_accuracy_bands(sweeps: Sequence[Tuple[str, Sequence[Dict[str, float]], Optional[int]]],
                        path: os.PathLike, title: str = "") -> Path:
    """Each recipe's mean sweep over seeds with a band of +- one standard deviation: `sweeps` holds
    (name, rows of resolution / top1_mean / top1_std (None with one seed), training resolution). The
    training resolution is marked as in `plot_accuracy_vs_resolution`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, rows, train_res in sweeps:
        rows = sorted(rows, key=lambda r: r["resolution"])
        if not rows:
            continue
        xs = [r["resolution"] for r in rows]
        ys = [100.0 * r["top1_mean"] for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        spread = [100.0 * (r.get("top1_std") or 0.0) for r in rows]
        if any(spread):
            ax.fill_between(xs, [y - s for y, s in zip(ys, spread)], [y + s for y, s in zip(ys, spread)],
                            color=line.get_color(), alpha=0.18, linewidth=0)
        _mark_training_resolution(ax, line, xs, ys, train_res)
    ax.set_xlabel("test resolution (px)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title or "mean top-1 against test resolution (band: +- one standard deviation over seeds)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


def _errorbar_panel(ax, names: Sequence[str], xs: Sequence[Tuple[Optional[float], Optional[float]]],
                    ys: Sequence[Tuple[float, Optional[float]]], xlabel: str) -> None:
    keep = [i for i, (x, _) in enumerate(xs) if x is not None and x > 0]
    for i in keep:
        (x, xerr), (y, yerr) = xs[i], ys[i]
        ax.errorbar([x], [100.0 * y], xerr=None if xerr is None else [xerr],
                    yerr=None if yerr is None else [100.0 * yerr], fmt="o", color="tab:blue", ecolor="tab:gray",
                    capsize=3, zorder=3)
        ax.annotate(names[i], (x, 100.0 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    pts = [(float(xs[i][0]), 100.0 * ys[i][0]) for i in keep]
    front = [pts[j] for j in pareto_front(pts)]
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", linestyle="--", linewidth=1,
                drawstyle="steps-pre" if len(front) > 1 else "default", label="Pareto front of the means")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean top-1 at native resolution (%)")
    ax.grid(True, alpha=0.3)


def plot_pareto_errorbars(names: Sequence[str], top1: Sequence[Tuple[float, Optional[float]]],
                          train_ips: Sequence[Tuple[Optional[float], Optional[float]]],
                          infer_ips: Sequence[Tuple[Optional[float], Optional[float]]], path: os.PathLike,
                          title: str = "") -> Path:
    """`plot_pareto` over seeds: every argument a (mean, standard deviation or None) pair per recipe,
    top-1 as fractions; error bars of one standard deviation on both axes, the front drawn over the means."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    _errorbar_panel(left, names, train_ips, top1, "training images/s")
    _errorbar_panel(right, names, infer_ips, top1, "inference images/s")
    fig.suptitle(title or "accuracy against throughput, mean ± one standard deviation over seeds "
                          "(up and right is better)")
    return _save(plt, fig, path)
