"""Unit scores: one importance value per GQA group and per MLP channel of every layer.

Per-weight scores are reduced to units with reshapes (never a Python loop over channels):
a GQA group = G*head_dim rows of q, head_dim rows of k and v (+ biases), G*head_dim columns of o;
an MLP channel = a row of gate and up (+ biases) and a column of down.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .adapter import LayerView
from .atomic import atomic_path
from .errors import PruneLabError


@dataclass
class UnitScores:
    attn: list[torch.Tensor]           # per layer: [num_kv_heads]
    mlp: list[torch.Tensor]            # per layer: [mlp_width]

    def check_finite(self) -> None:
        for kind, per_layer in (("attention", self.attn), ("mlp", self.mlp)):
            for i, s in enumerate(per_layer):
                if not torch.isfinite(s).all():
                    raise PruneLabError(
                        f"importance scores of layer {i} {kind} contain NaN/inf (fp16 overflow?): "
                        f"use model.dtype=bfloat16 or float32")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"attn.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.attn)}
        return tensors | {f"mlp.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.mlp)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "UnitScores":
        n = sum(1 for k in t if k.startswith("attn."))
        return cls([t[f"attn.{i}"] for i in range(n)], [t[f"mlp.{i}"] for i in range(n)])

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file(self.to_tensors(), str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> "UnitScores":
        return cls.from_tensors(load_file(str(path)))


def group_rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a [rows, ...] tensor into `groups` consecutive blocks of rows -> [groups]."""
    return x.reshape(groups, -1).sum(1)


def unit_terms(view: LayerView) -> list[tuple[nn.Linear, str, str, Callable]]:
    """Every decoder parameter of a layer as (linear, "weight"|"bias", "attn"|"mlp", reduce), where
    reduce maps a tensor shaped like that parameter to one value per unit (KV group or MLP channel)."""
    a, m = view.attn, view.mlp
    nkv = a.num_kv_heads
    rows = lambda x: group_rows(x, nkv)              # noqa: E731  q/k/v rows (and biases), per group
    cols = lambda x: group_rows(x.sum(0), nkv)       # noqa: E731  o columns, per group
    terms = [(lin, "weight", "attn", rows) for lin in (a.q, a.k, a.v)]
    terms += [(lin, "bias", "attn", rows) for lin in (a.q, a.k, a.v) if lin.bias is not None]
    terms += [(a.o, "weight", "attn", cols)]
    terms += [(lin, "weight", "mlp", lambda x: x.sum(1)) for lin in m.inputs]          # gate/up rows
    terms += [(lin, "bias", "mlp", lambda x: x) for lin in m.inputs if lin.bias is not None]
    return terms + [(m.down, "weight", "mlp", lambda x: x.sum(0))]


def zero_scores(views: list[LayerView], device=None) -> UnitScores:
    return UnitScores([torch.zeros(v.attn.num_kv_heads, device=device or v.attn.q.weight.device)
                       for v in views],
                      [torch.zeros(v.mlp.width, device=device or v.mlp.up.weight.device) for v in views])


def reduce_to_units(views: list[LayerView], per_weight) -> UnitScores:
    """Sum per-weight scores over every unit. per_weight(linear, name) -> tensor like its param."""
    scores = zero_scores(views)
    for v in views:
        for lin, name, kind, reduce in unit_terms(v):
            getattr(scores, kind)[v.index] += reduce(per_weight(lin, name).float())
    return scores


def add_into(acc: UnitScores | None, new: UnitScores) -> UnitScores:
    if acc is None:
        return new
    for a, b in zip(acc.attn + acc.mlp, new.attn + new.mlp):
        a += b
    return acc
