"""PNG plots of a sweep or study, for prune_lab.report: metric vs each knob, Pareto front."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .plots import KEPT, new_figure, save


def pareto_labels(names, xs, ys) -> list[tuple[str, float, float]]:
    """One label per point of the front: the runs' own dir names (not their paths), merged when
    runs land on the same point (more than 3 become "first +n"), ordered along x."""
    points: dict[tuple, list[str]] = {}
    for name, xi, yi in zip(names, xs, ys):
        points.setdefault((xi, yi), []).append(Path(str(name)).name)
    return [(", ".join(same) if len(same) <= 3 else f"{same[0]} +{len(same) - 1}", xi, yi)
            for (xi, yi), same in sorted(points.items())]


def plot_metric_vs_knob(frame: pd.DataFrame, knob: str, metrics: list[str], path: Path,
                        group_by: list[str] = (), baselines: dict[str, float] | None = None,
                        connect: bool = True) -> Path:
    """One line per metric (and per combination of the other swept overrides) against `knob`.

    connect=False draws points only (other knobs vary too, so a line would join unlike runs)."""
    data = frame.dropna(subset=metrics, how="all")
    numeric = pd.api.types.is_numeric_dtype(data[knob])
    categories = sorted(data[knob].astype(str).unique()) if not numeric else None
    fig, (ax,) = new_figure(7.0, 4.2)
    groups = data.groupby(list(group_by), dropna=False) if group_by else [((), data)]
    for key, sub in groups:
        sub = sub.sort_values(knob) if numeric else sub
        xs = sub[knob] if numeric else sub[knob].astype(str).map(categories.index)
        label_key = ", ".join(f"{g}={v}" for g, v in zip(group_by, np.atleast_1d(key)))
        for metric in metrics:
            label = metric + (f" [{label_key}]" if label_key else "")
            ax.plot(xs, sub[metric], marker="o", linestyle="-" if connect else "none",
                    label=label[:80])
    for name, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"{name} {value:.2f}", (0.99, value), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=8, color="grey")
    values = data[metrics].to_numpy(float)
    if np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 10:
        ax.set_yscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(knob)
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "metric")
    ax.set_title(f"{', '.join(metrics)} vs {knob} ({len(data)} runs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points no other point beats in both x and y (both minimised)."""
    le = (x[None, :] <= x[:, None]) & (y[None, :] <= y[:, None])
    lt = (x[None, :] < x[:, None]) | (y[None, :] < y[:, None])
    return ~(le & lt).any(axis=1)


def plot_pareto(frame: pd.DataFrame, x: str, y: str, path: Path, label: str = "run") -> Path:
    data = frame.dropna(subset=[x, y])
    xs, ys = data[x].to_numpy(float), data[y].to_numpy(float)
    front = pareto_mask(xs, ys)
    order = np.argsort(xs[front])
    fig, (ax,) = new_figure(6.5, 4.5)
    ax.scatter(xs[~front], ys[~front], color="#cbd5e0", edgecolor="grey", label="dominated")
    ax.plot(xs[front][order], ys[front][order], "-o", color=KEPT, label=f"Pareto front ({front.sum()})")
    for k, (text, xi, yi) in enumerate(pareto_labels(data.loc[front, label], xs[front], ys[front])):
        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(6, 6) if k % 2 else (-6, -10),
                    ha="left" if k % 2 else "right", fontsize=7)     # alternate sides along the front
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (lower is better)")
    ax.set_title(f"Pareto front: {y} vs {x} ({len(data)} runs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def write_sweep_plots(ok: pd.DataFrame, out: Path, knobs: list[str], metrics: list[str],
                      swept: list[str], pareto: list[str] | None = None) -> list[Path]:
    """For prune_lab.report: metrics vs each knob (grouped by at most 2 other swept knobs, dense
    baselines dashed) and the Pareto front of the two `pareto` columns, over the ok runs."""
    paths: list[Path] = []
    if not metrics or ok.empty:
        return paths
    for knob in knobs:
        others = [c for c in swept if c != knob]
        sizes = ok.groupby(others, dropna=False).size() if others else None
        grouped = 0 < len(others) <= 2 and len(sizes) <= 6 and sizes.min() >= 2   # a grid, not random
        baselines = {f"dense {m}": float(ok[f"dense/{m}"].median()) for m in metrics
                     if f"dense/{m}" in ok and ok[f"dense/{m}"].notna().any()}
        name = re.sub(r"[^\w.-]+", "_", knob)
        paths.append(plot_metric_vs_knob(ok, knob, metrics, out / f"ppl_vs_{name}.png",
                                         others if grouped else [], baselines,
                                         connect=grouped or not others))
    if pareto and len(ok) >= 2:
        paths.append(plot_pareto(ok, pareto[0], pareto[1], out / "pareto.png"))
    return paths
