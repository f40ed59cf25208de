"""Per-weight scores reduced to units with reshapes (never a Python loop over channels):
a GQA group = G*head_dim rows of q, head_dim rows of k and v (+ biases), G*head_dim columns of o;
an MLP channel = a row of gate and up (+ biases) and a column of down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..core.adapter import LayerView
from ..core.scores import UnitScores


def group_rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a [rows, ...] tensor into `groups` consecutive blocks of rows -> [groups]."""
    return x.reshape(groups, -1).sum(1)


@dataclass(frozen=True)
class Term:
    """One decoder parameter's share of the unit scores: a tensor shaped like the parameter is summed
    over `axis` (1: along each row, 0: down each column, None: a bias) and `units` maps that
    marginal to one value per unit (KV group or MLP channel)."""
    lin: nn.Linear
    name: str                       # "weight" | "bias"
    kind: str                       # "attn" | "mlp"
    axis: int | None
    units: Callable[[torch.Tensor], torch.Tensor]

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.lin, self.name)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x if self.axis is None else x.sum(self.axis))


def unit_terms(view: LayerView) -> list[Term]:
    """Every decoder parameter of a layer with its reduction to units."""
    a, m = view.attn, view.mlp
    groups = lambda x: group_rows(x, a.num_kv_heads)     # noqa: E731  per-row (or per-column) -> per group
    channels = lambda x: x                                # noqa: E731  MLP rows of gate/up, columns of down
    terms = [Term(lin, "weight", "attn", 1, groups) for lin in (a.q, a.k, a.v)]
    terms += [Term(lin, "bias", "attn", None, groups) for lin in (a.q, a.k, a.v) if lin.bias is not None]
    terms += [Term(a.o, "weight", "attn", 0, groups)]
    terms += [Term(lin, "weight", "mlp", 1, channels) for lin in m.inputs]
    terms += [Term(lin, "bias", "mlp", None, channels) for lin in m.inputs if lin.bias is not None]
    return terms + [Term(m.down, "weight", "mlp", 0, channels)]


def zero_scores(views: list[LayerView], device=None) -> UnitScores:
    return UnitScores([torch.zeros(v.attn.num_kv_heads, device=device or v.attn.q.weight.device)
                       for v in views],
                      [torch.zeros(v.mlp.width, device=device or v.mlp.up.weight.device) for v in views])


def reduce_to_units(views: list[LayerView], per_weight) -> UnitScores:
    """Sum per-weight scores over every unit. per_weight(term) -> tensor like term.param."""
    scores = zero_scores(views)
    for v in views:
        for t in unit_terms(v):
            getattr(scores, t.kind)[v.index] += t.reduce(per_weight(t).float())
    return scores


def add_into(acc: UnitScores | None, new: UnitScores) -> UnitScores:
    if acc is None:
        return new
    for a, b in zip(acc.attn + acc.mlp, new.attn + new.mlp):
        a += b
    return acc
