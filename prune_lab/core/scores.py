"""Unit scores: one importance value per GQA group and per MLP channel of every layer (the type the
criteria produce and the allocators read; the reductions from per-weight scores are in
prune_lab/importance/units.py, the run dir's scores.safetensors in prune_lab/artifacts/scores.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PruneLabError


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
