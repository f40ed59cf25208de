"""PNG plots of one run (kept units, layer importance, score histogram); sweeps: sweep_plots.py.
Figures are drawn with the Agg canvas directly, so no pyplot state and no display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..atomic import atomic_path
from ..core.plan import PruningPlan

KEPT, PRUNED, LAYER_GONE = "#2b6cb0", "#ed8936", "#e53e3e"
DPI = 120


def new_figure(width: float, height: float, rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(rows, 1, squeeze=False)[:, 0]))


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or None)
    return path


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=float)


class UnitLayout:
    """Dense widths and removed-unit masks per layer, read from the scores (views may be sliced)."""

    def __init__(self, plan, scores):
        self.n_layers = len(scores.attn)
        self.removed_layers = set(plan.layers)
        n = range(self.n_layers)
        self.attn = [self._mask(len(scores.attn[i]), plan.attn.get(i), i, plan.attn_blocks) for i in n]
        self.mlp = [self._mask(len(scores.mlp[i]), plan.mlp.get(i), i, plan.mlp_blocks) for i in n]

    def _mask(self, width: int, removed: list[int] | None, layer: int, blocks: list[int]) -> np.ndarray:
        mask = np.zeros(width, dtype=bool)
        if layer in self.removed_layers or layer in blocks:     # the layer, or this whole block, removed
            mask[:] = True
        elif removed:
            mask[np.asarray(removed)] = True
        return mask

    @staticmethod
    def counts(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        dense = np.array([len(m) for m in masks])
        return dense, dense - np.array([m.sum() for m in masks])


def plot_kept_units(plan, scores, path: Path, group_sizes: list[int] | None = None) -> Path:
    layout = UnitLayout(plan, scores)
    x = np.arange(layout.n_layers)
    fig, axes = new_figure(max(7.0, 0.32 * layout.n_layers + 3), 6.2, rows=2)
    gqa = f" (each = 1 KV head + {group_sizes[0]} query heads)" if group_sizes else ""
    panels = ((axes[0], layout.attn, f"attention: KV groups{gqa}"), (axes[1], layout.mlp, "MLP channels"))
    for ax, masks, what in panels:
        dense, kept = layout.counts(masks)
        gone = np.isin(x, sorted(layout.removed_layers))
        ax.bar(x, kept, color=KEPT, label="kept")
        ax.bar(x, dense - kept, bottom=kept, color=PRUNED, alpha=0.55, label="pruned")
        if gone.any():
            ax.bar(x[gone], dense[gone], color="none", edgecolor=LAYER_GONE, hatch="//", linewidth=1.2,
                   label="layer removed")
        if layout.n_layers <= 48:
            for xi, k, d in zip(x, kept, dense):
                ax.text(xi, d, f"{100 * k / d:.0f}%", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, dense.max() * 1.12)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xticks(x)
        ax.set_xlabel("layer")
        ax.set_ylabel("units")
        ax.set_title(f"{what}: kept {kept.sum()} of {dense.sum()} ({100 * kept.sum() / dense.sum():.1f}%)",
                     fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    removed = sorted(layout.removed_layers)
    fig.suptitle("Kept units per layer" + (f" — layers removed: {removed}" if removed else ""))
    return save(fig, path)


def value_scale(values: np.ndarray) -> tuple[str, dict]:
    """linear, or log (symlog if some values are <= 0) when the values span more than 30x their median."""
    magnitude = np.abs(values[values != 0])
    if len(magnitude) < 2 or magnitude.max() <= 30 * np.median(magnitude):
        return "linear", {}
    if (values > 0).all():
        return "log", {}
    return "symlog", {"linthresh": float(np.median(magnitude))}


def plot_layer_importance(layer_scores, removed_layers: list[int], path: Path) -> Path:
    """Bars per layer; a log axis (symlog if some scores are <= 0) when they span > 30x, so an
    outlier such as removal's layer 0 does not flatten the rest. Values are written on the bars."""
    values = to_numpy(layer_scores)
    x = np.arange(len(values))
    colors = np.where(np.isin(x, removed_layers), LAYER_GONE, KEPT)
    fig, (ax,) = new_figure(max(6.0, 0.3 * len(values) + 3), 3.6)
    ax.bar(x, values, color=colors)
    scale, options = value_scale(values)
    ax.set_yscale(scale, **options)
    if len(values) <= 48:
        for xi, v in zip(x, values):
            ax.text(xi, v, f"{v:.3g}", ha="center", va="bottom" if v >= 0 else "top", fontsize=6, rotation=90)
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("importance (higher = keep)" + ("" if scale == "linear" else f", {scale} axis"))
    title = "Layer importance"
    if len(removed_layers):
        title += f" — red: removed layers {sorted(removed_layers)}"
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def plot_score_histogram(plan, scores, path: Path) -> Path:
    layout = UnitLayout(plan, scores)
    fig, axes = new_figure(7.5, 6.0, rows=2)
    panels = ((axes[0], scores.attn, layout.attn, "attention KV groups"),
              (axes[1], scores.mlp, layout.mlp, "MLP channels"))
    for ax, per_layer, masks, what in panels:
        values = np.concatenate([to_numpy(s) for s in per_layer])
        removed = np.concatenate(masks)
        positive = values > 0
        log_scale = positive.sum() >= 2 and values[positive].max() > values[positive].min()
        shown = positive if log_scale else np.ones_like(positive)
        lo, hi = values[shown].min(), values[shown].max()
        bins = np.geomspace(lo, hi, 40) if log_scale else np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist([values[shown & ~removed], values[shown & removed]], bins=bins, stacked=True,
                color=[KEPT, PRUNED], label=[f"kept ({(~removed).sum()})", f"pruned ({removed.sum()})"])
        if log_scale:
            ax.set_xscale("log")
        hidden = len(values) - shown.sum()
        note = f"; {hidden} scores <= 0 not shown" if hidden else ""
        ax.set_title(f"{what}: {len(values)} unit scores{note}", fontsize=10)
        ax.set_xlabel("unit importance score" + (" (log scale)" if log_scale else ""))
        ax.set_ylabel("units")
        ax.legend(fontsize=8)
    fig.suptitle("Unit-score distribution (pruned units in orange)")
    return save(fig, path)


def write_run_plots(run_dir, plan, scores, layer_scores=None, views_before=None) -> list[Path]:
    """The per-run PNGs; views_before (dense LayerViews) only supply the GQA group size."""
    run_dir = Path(run_dir)
    group_sizes = [v.attn.group_size for v in views_before] if views_before else None
    paths = []
    if scores is not None:     # plan None: an analyse-only job (nothing pruned)
        if plan is not None:
            paths.append(plot_kept_units(plan, scores, run_dir / "kept_units.png", group_sizes))
        paths.append(plot_score_histogram(plan or PruningPlan(), scores, run_dir / "score_histogram.png"))
    if layer_scores is not None:
        removed = plan.layers if plan is not None else []
        paths.append(plot_layer_importance(layer_scores, removed, run_dir / "layer_importance.png"))
    return paths
