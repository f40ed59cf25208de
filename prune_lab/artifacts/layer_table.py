"""Per-layer view of a run: layer importance and the attention / MLP rates the plan gives each layer.

Written for every allocator as layers.csv and layers.json in the run dir; layers.json is also what
`layer_importance=file` reads back (its "layer_importance" list).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from ..atomic import atomic_path, write_text_atomic
from ..core.adapter import LayerView
from ..core.plan import PruningPlan


def layer_table(views: list[LayerView], plan: PruningPlan | None = None,
                layer_importance: torch.Tensor | None = None) -> pd.DataFrame:
    """One row per layer of the dense model. Rates are fractions of the layer's units / params."""
    df = pd.DataFrame({"layer": [v.index for v in views],
                       "kv_groups": [v.attn.num_kv_heads for v in views],
                       "mlp_channels": [v.mlp.width for v in views],
                       "params": [v.num_params for v in views]})
    if layer_importance is not None:
        df["importance"] = layer_importance.double().cpu().numpy()
    if plan is None:
        return df
    removed = df["layer"].isin(plan.layers)
    df["removed"] = removed
    df["kv_groups_pruned"] = [len(plan.attn.get(i, [])) for i in df["layer"]]
    df["mlp_channels_pruned"] = [len(plan.mlp.get(i, [])) for i in df["layer"]]
    df["attn_removed"] = df["layer"].isin(plan.attn_blocks)     # the whole attention (the layer stays)
    df["mlp_removed"] = df["layer"].isin(plan.mlp_blocks)
    df.loc[removed | df["attn_removed"], "kv_groups_pruned"] = df["kv_groups"]
    df.loc[removed | df["mlp_removed"], "mlp_channels_pruned"] = df["mlp_channels"]
    df["attn_rate"] = df["kv_groups_pruned"] / df["kv_groups"]
    df["mlp_rate"] = df["mlp_channels_pruned"] / df["mlp_channels"]
    cost = pd.Series([v.attn.group_cost for v in views]), pd.Series([v.mlp.channel_cost for v in views])
    df["params_pruned"] = df["kv_groups_pruned"] * cost[0] + df["mlp_channels_pruned"] * cost[1]
    df.loc[removed, "params_pruned"] = df["params"]
    df["rate"] = df["params_pruned"] / df["params"]
    return df


def write_layer_table(run_dir: str | Path, df: pd.DataFrame, criterion: str | None = None) -> None:
    run_dir = Path(run_dir)
    with atomic_path(run_dir / "layers.csv") as tmp:
        df.to_csv(tmp, index=False)
    doc = {"layer_importance_criterion": criterion,
           "layer_importance": df["importance"].tolist() if "importance" in df else None,
           "layers": json.loads(df.to_json(orient="records"))}
    write_text_atomic(run_dir / "layers.json", json.dumps(doc, indent=2))
