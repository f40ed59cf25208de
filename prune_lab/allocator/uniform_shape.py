"""Uniform-shape allocation (Minitron-style width + depth): one kept KV-group count and one MLP width
for every kept layer, plus a set of removed layers, keeping the most importance within the budget.

The result loads with plain transformers (output.export=hf). For a kept count k and width w, layer l
keeps A_l(k) + M_l(w) importance (its top-k groups and top-w channels); with r layers removed
(the eligible ones that keep least), the removed parameters are r·P + (n-r)·((K-k)·c_g + (W-w)·c_m).
Every (k, w) is evaluated at once with the smallest r that meets the budget; the best is kept.
"""
from __future__ import annotations

import numpy as np

from ..core.plan import PruningPlan
from ..errors import BudgetError, PruneLabError
from .align import check_alignment, group_block
from .base import Allocator, lowest


def top_sums(per_layer: list) -> np.ndarray:
    """[n_layers, units+1]: importance of each layer's top-c units, c = 0..units."""
    s = -np.sort(-np.stack([x.double().cpu().numpy() for x in per_layer]), axis=1)
    return np.concatenate([np.zeros((len(per_layer), 1)), np.cumsum(s, axis=1)], axis=1)


class UniformShape(Allocator):
    """Best plan whose kept layers all share one shape.

    multiple_of: kept MLP width and query width (k x G x head_dim) are multiples of it (1 = any).
    max_removed_layers: cap on depth pruning (0 = width only, null = any). Only layers in
    [layer_start, layer_end) may be removed; every kept layer gets the same width.
    """

    def __init__(self, ratio: float = 0.25, multiple_of: int = 1, max_removed_layers: int | None = None,
                 layer_start: int = 0, layer_end: int | None = None):
        super().__init__(ratio, layer_start, layer_end, multiple_of)
        if max_removed_layers is not None and max_removed_layers < 0:
            raise PruneLabError(f"allocator.max_removed_layers must be >= 0 or null, got {max_removed_layers}")
        self.max_removed_layers = max_removed_layers
        self.choice: dict | None = None

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        self.check_inputs(views, scores)
        shapes = {(v.attn.num_kv_heads, v.mlp.width, v.attn.group_cost, v.mlp.channel_cost) for v in views}
        if len(shapes) != 1:
            raise PruneLabError("allocator=uniform_shape needs a model whose layers share one shape "
                                f"(this one has {len(shapes)} distinct layer shapes)")
        check_alignment(views, self.multiple_of)
        K, W, c_g, c_m = shapes.pop()
        n, P = len(views), views[0].num_params
        eligible = np.flatnonzero(self.eligible(views))
        max_r = min(len(eligible), n - 1, n if self.max_removed_layers is None else self.max_removed_layers)
        target = self.target(views)

        ks = np.unique(np.append(np.arange(group_block(views[0], self.multiple_of), K + 1,
                                           group_block(views[0], self.multiple_of)), K))
        ws = np.unique(np.append(np.arange(self.multiple_of, W + 1, self.multiple_of), W))
        value = top_sums(scores.attn)[:, ks][:, :, None] + top_sums(scores.mlp)[:, ws][:, None, :]  # [n,k,w]
        per_kept = ((K - ks)[:, None] * c_g + (W - ws)[None, :] * c_m).astype(float)            # [k,w]
        short = target - n * per_kept
        r = np.where(short > 0, np.ceil(short / np.maximum(P - per_kept, 1)), 0).astype(int)
        lowest_first = np.sort(value[eligible], axis=0)                                        # [e,k,w]
        lost = np.concatenate([np.zeros((1, *per_kept.shape)), np.cumsum(lowest_first, axis=0)])
        kept = value.sum(0) - np.take_along_axis(lost, np.minimum(r, len(eligible))[None], 0)[0]
        kept = np.where(r <= max_r, kept, -np.inf)
        if not np.isfinite(kept).any():
            raise BudgetError(f"budget of {target} params cannot be met by one shape for all kept layers "
                              f"with at most {max_r} layers removed: lower allocator.ratio or raise "
                              f"allocator.max_removed_layers")
        ik, iw = np.unravel_index(np.argmax(kept), kept.shape)
        k, w, n_removed = int(ks[ik]), int(ws[iw]), int(r[ik, iw])
        layer_value = value[eligible, ik, iw]
        removed = sorted(eligible[np.lexsort((eligible, layer_value))][:n_removed].tolist())
        kept_layers = [v.index for v in views if v.index not in removed]
        self.choice = {"kv_groups": k, "mlp_width": w, "layers_removed": removed}
        return PruningPlan({i: lowest(scores.attn[i], K - k) for i in kept_layers},
                           {i: lowest(scores.mlp[i], W - w) for i in kept_layers}, removed, target)
