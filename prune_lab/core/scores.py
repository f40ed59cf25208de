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

    def check_finite(self, source: str = "unit scores", remedy: str | None = None) -> None:
        """Refuse NaN/inf; the caller says where the scores came from and what helps (a computed
        criterion: fp16 overflow; a file: recompute it)."""
        for kind, per_layer in (("attention", self.attn), ("mlp", self.mlp)):
            for i, s in enumerate(per_layer):
                if not torch.isfinite(s).all():
                    raise PruneLabError(f"{source}: layer {i} {kind} scores contain NaN/inf"
                                        + (f" ({remedy})" if remedy else ""))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"attn.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.attn)}
        return tensors | {f"mlp.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.mlp)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "UnitScores":
        """attn.0..attn.<n-1> and mlp.0..mlp.<n-1>, each 1-D (other names, e.g. "layer", are ignored);
        anything else is a PruneLabError naming what is wrong."""
        n = sum(1 for k in t if k.startswith("attn."))
        names = [f"{kind}.{i}" for kind in ("attn", "mlp") for i in range(n)]
        lacking = [k for k in names if k not in t]
        if not n or lacking or sum(1 for k in t if k.startswith("mlp.")) != n:
            raise PruneLabError("no unit scores (attn.<i>/mlp.<i> tensors)" if not n else
                                f"unit scores lack {', '.join(lacking[:3]) or 'an attn.<i> for every mlp.<i>'}")
        flat = [k for k in names if t[k].dim() != 1]
        if flat:
            raise PruneLabError(f"unit scores must be 1-D (one per GQA group / MLP channel), "
                                f"{flat[0]} is {list(t[flat[0]].shape)}")
        return cls([t[f"attn.{i}"] for i in range(n)], [t[f"mlp.{i}"] for i in range(n)])
