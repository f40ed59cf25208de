"""Uniform allocation: the same rate in every eligible layer."""
from __future__ import annotations

import numpy as np

from ..core.plan import PruningPlan
from .base import Allocator, largest_remainder, lowest


class Uniform(Allocator):
    """The same rate in every eligible layer: whole GQA groups first, MLP channels fill the rest.

    Each layer loses round(rate * KV heads) groups (never more than its share of the budget);
    MLP channels are spread over the layers (counts differ by at most one) so that the total
    lands within half a channel of the target.
    """

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        self.check_inputs(views, scores)
        target = self.target(views)
        chosen = [v for v, ok in zip(views, self.eligible(views)) if ok]
        rate = target / sum(v.num_params for v in chosen)
        budget = np.array([rate * v.num_params for v in chosen])
        n_kv = np.array([v.attn.num_kv_heads for v in chosen])
        group_cost = np.array([v.attn.group_cost for v in chosen])
        groups = np.minimum.reduce([np.rint(rate * n_kv), np.floor(budget / group_cost), n_kv - 1]).astype(int)
        ideal = np.maximum(budget - groups * group_cost, 0) / np.array([v.mlp.channel_cost for v in chosen])
        max_channels = np.array([v.mlp.width - 1 for v in chosen])
        channels = largest_remainder(ideal, int(round(ideal.sum())), max_channels)
        plan = PruningPlan({v.index: lowest(scores.attn[v.index], g) for v, g in zip(chosen, groups)},
                           {v.index: lowest(scores.mlp[v.index], c) for v, c in zip(chosen, channels)},
                           [], target)
        return self.check_met(plan, views, "lower allocator.ratio or widen the layer range")
