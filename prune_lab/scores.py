"""Unit scores: one importance value per GQA group and per MLP channel of every layer.

Per-weight scores are reduced to units with reshapes (never a Python loop over channels):
a GQA group = G*head_dim rows of q, head_dim rows of k and v (+ biases), G*head_dim columns of o;
an MLP channel = a row of gate and up (+ biases) and a column of down.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import AttentionView, LayerView, MLPView
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


def attention_unit_sum(view: AttentionView, per_weight) -> torch.Tensor:
    """Sum per-weight scores over each GQA group. per_weight(linear, name) -> tensor like its param."""
    nkv = view.num_kv_heads
    total = torch.zeros(nkv, dtype=torch.float32, device=view.q.weight.device)
    for lin in (view.q, view.k, view.v):
        total += group_rows(per_weight(lin, "weight").float(), nkv)
        if lin.bias is not None:
            total += group_rows(per_weight(lin, "bias").float(), nkv)
    o = per_weight(view.o, "weight").float()              # [hidden, nkv*G*hd]
    total += group_rows(o.sum(0), nkv)
    return total


def mlp_unit_sum(view: MLPView, per_weight) -> torch.Tensor:
    total = sum(per_weight(lin, "weight").float().sum(1) for lin in view.inputs)
    for lin in view.inputs:
        if lin.bias is not None:
            total += per_weight(lin, "bias").float()
    return total + per_weight(view.down, "weight").float().sum(0)


def reduce_to_units(views: list[LayerView], per_weight) -> UnitScores:
    return UnitScores([attention_unit_sum(v.attn, per_weight) for v in views],
                      [mlp_unit_sum(v.mlp, per_weight) for v in views])


def add_into(acc: UnitScores | None, new: UnitScores) -> UnitScores:
    if acc is None:
        return new
    for a, b in zip(acc.attn + acc.mlp, new.attn + new.mlp):
        a += b
    return acc
