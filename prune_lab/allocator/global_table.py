"""Global allocation: one table of every unit, pruned lowest score (importance/cost) first."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.plan import PruningPlan
from ..errors import PruneLabError
from .base import Allocator, take_in_order


SCORE_NORMS = ("none", "standardize")


def unit_table(scores, views, score_norm: str = "none") -> pd.DataFrame:
    """Every GQA group and MLP channel: layer, type, index, importance, cost, score = I/C; with
    score_norm="standardize" (FLAP's AL-AM) score = (I - mean) / std within each layer's groups or
    channels, compared across layers as they are (the cost only counts towards the budget)."""
    parts = []
    for v in views:
        for kind, imp, cost in (("attn_group", scores.attn[v.index], v.attn.group_cost),
                                ("mlp_channel", scores.mlp[v.index], v.mlp.channel_cost)):
            imp = imp.double().cpu().numpy()
            parts.append(pd.DataFrame({"layer": v.index, "type": kind, "index": np.arange(len(imp)),
                                       "importance": imp, "cost": cost}))
    df = pd.concat(parts, ignore_index=True)
    if score_norm == "standardize":
        by = df.groupby(["layer", "type"])["importance"]
        std = by.transform("std").fillna(0.0)
        df["score"] = ((df["importance"] - by.transform("mean")) / std.where(std > 0, 1.0))
    else:
        df["score"] = df["importance"] / df["cost"]
    return df


class Global(Allocator):
    """Prune the lowest-score units across all layers until the parameter budget is met.

    remove_empty_layers=true lets a layer lose everything (depth pruning); a layer never loses
    only its attention or only its MLP. Otherwise each layer keeps its best group and channel.

    When the fill empties one side of a layer, the layer is either removed whole or keeps its
    best unit of that side, whichever loses less importance at the current price per parameter
    (the score of the dearest unit pruned): removing costs I_rest - price * C_rest (the rest is
    pruned, freeing budget elsewhere), keeping costs price * c_best - I_best.
    """

    def __init__(self, ratio: float = 0.25, remove_empty_layers: bool = False,
                 layer_start: int = 0, layer_end: int | None = None, multiple_of: int = 1,
                 score_norm: str = "none"):
        super().__init__(ratio, layer_start, layer_end, multiple_of)
        if score_norm not in SCORE_NORMS:
            raise PruneLabError(f"allocator.score_norm must be one of {', '.join(SCORE_NORMS)}, got '{score_norm}'")
        self.remove_empty_layers, self.score_norm = remove_empty_layers, score_norm

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        self.check_inputs(views, scores)
        target = self.target(views)
        df = unit_table(scores, views, self.score_norm)
        df["allowed"] = self.eligible(views)[df["layer"].to_numpy()]
        df = df.sort_values(["score", "layer", "type", "index"], kind="stable").reset_index(drop=True)
        if self.remove_empty_layers:
            chosen = self._fill_removing_layers(df, target)
        else:
            chosen = take_in_order(df["cost"].to_numpy(float), target,
                                   df["allowed"].to_numpy() & ~self._protected(df))
        df["pruned"] = chosen
        self.table = df
        removed_layers = self._emptied_layers(df)
        pruned = df[chosen & ~df["layer"].isin(removed_layers)]
        by = {t: pruned[pruned["type"] == t].groupby("layer")["index"].apply(list).to_dict()
              for t in ("attn_group", "mlp_channel")}
        plan = PruningPlan(by["attn_group"], by["mlp_channel"], removed_layers, target)
        return self.check_met(plan, views, "lower allocator.ratio or widen the layer range"
                              if self.remove_empty_layers else
                              "set allocator.remove_empty_layers=true or a lower ratio")

    def _fill_removing_layers(self, df: pd.DataFrame, target: int) -> np.ndarray:
        """Greedy fill; each half-emptied layer is then settled for good (removed or protected)."""
        cost, imp = df["cost"].to_numpy(float), df["importance"].to_numpy(float)
        layer, score, allowed = df["layer"].to_numpy(), df["score"].to_numpy(), df["allowed"].to_numpy()
        protect, forced = np.zeros(len(df), bool), np.zeros(len(df), bool)
        while True:
            free = take_in_order(cost, target - cost[forced].sum(), allowed & ~protect & ~forced)
            chosen = forced | free
            half_empty = self._half_empty_layers(df, chosen)
            if not half_empty:
                return chosen
            price = score[free].max()
            for i in half_empty:
                rest = (layer == i) & ~chosen
                best = self._protected(df, layers=[i]) & chosen
                remove_loss = imp[rest].sum() - price * cost[rest].sum()
                keep_loss = price * cost[best].sum() - imp[best].sum()
                if remove_loss < keep_loss and cost[forced | (layer == i)].sum() <= target:
                    forced |= layer == i
                else:
                    protect |= self._protected(df, layers=[i])

    @staticmethod
    def _protected(df: pd.DataFrame, layers=None) -> np.ndarray:
        """Mark the best-scoring unit of each (layer, type) so that it is kept."""
        sub = df if layers is None else df[df["layer"].isin(layers)]
        idx = sub.sort_values("score", kind="stable").groupby(["layer", "type"]).tail(1).index
        mask = np.zeros(len(df), dtype=bool)
        mask[idx] = True
        return mask

    @staticmethod
    def _emptied(df: pd.DataFrame, chosen: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"layer": df["layer"], "type": df["type"], "kept": ~chosen}).groupby(
            ["layer", "type"])["kept"].sum().unstack("type") == 0

    def _half_empty_layers(self, df, chosen) -> list[int]:
        empty = self._emptied(df, chosen)
        return empty.index[empty.sum(1) == 1].tolist()

    def _emptied_layers(self, df) -> list[int]:
        empty = self._emptied(df, df["pruned"].to_numpy())
        return empty.index[empty.all(1)].tolist()
