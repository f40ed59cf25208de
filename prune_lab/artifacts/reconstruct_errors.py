"""reconstruct.csv and reconstruct_error.png of a run dir: the per-layer output errors of a refit."""
from __future__ import annotations

import csv
from pathlib import Path

from ..atomic import atomic_path
from .plots import new_figure, save


def write_errors(run_dir: Path, rows: list[dict], plots: bool) -> None:
    """reconstruct.csv (layer, kind, removed, err_before, err_after) and reconstruct_error.png."""
    if not rows:
        return
    with atomic_path(run_dir / "reconstruct.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if plots:
        fig, axes = new_figure(7, 3.2 * 2, rows=2)
        for ax, kind, title in zip(axes, ("attn", "mlp"), ("o_proj (GQA groups)", "down_proj (MLP channels)")):
            sel = [r for r in rows if r["kind"] == kind]
            layers = [r["layer"] for r in sel]
            ax.plot(layers, [r["err_before"] for r in sel], "o-", label="removed, no refit")
            ax.plot(layers, [r["err_after"] for r in sel], "s-", label="after refit")
            ax.set_yscale("log")
            ax.set_title(f"relative output error of {title}")
            ax.set_xlabel("layer")
            ax.legend()
        save(fig, run_dir / "reconstruct_error.png")
