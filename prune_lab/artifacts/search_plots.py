"""search.png of a run dir (allocator=search): fitness of the best candidate vs fitness evaluations, and the
chosen per-layer shape (GQA groups and MLP channels removed) next to the global plan's that seeded it."""
from __future__ import annotations

from pathlib import Path

from .plots import new_figure, save


def write_search_plot(run_dir: Path, summary: dict) -> Path:
    fig, axes = new_figure(12, 3.4)
    ax = axes[0]
    evals, _tokens, values = zip(*summary["trajectory"])
    ax.plot(evals, values, "o-", ms=3)
    ax.set(title=f"{summary['searcher']}: {summary['fitness_kind']} of the best candidate",
           xlabel="fitness evaluations", ylabel=summary["fitness_kind"], yscale="log")
    fig2, axes2 = new_figure(12, 3.4 * 2, rows=2)
    for a, kind, title in zip(axes2, ("attn", "mlp"), ("GQA groups removed", "MLP channels removed")):
        layers = range(len(summary["levels"][kind]))
        a.bar([i - 0.2 for i in layers], summary["global_levels"][kind], width=0.4, label="global plan (seed)")
        a.bar([i + 0.2 for i in layers], summary["levels"][kind], width=0.4, label="search")
        a.set(title=title, xlabel="layer")
        a.legend()
    save(fig2, Path(run_dir) / "search_shape.png")
    return save(fig, Path(run_dir) / "search.png")
