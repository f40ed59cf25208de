"""importance=file: unit scores saved by an earlier run."""
from __future__ import annotations

from ..artifacts.scores import load_scores, scores_file
from ..core.scores import UnitScores
from ..errors import PruneLabError
from .base import Importance


class FromFile(Importance):
    """Unit scores saved by an earlier run (scores.safetensors; a run dir also works): analyse once,
    prune many times. Shapes are checked against the model by the allocator."""

    cacheable = False
    name = "file"

    def __init__(self, path: str):
        self.path = scores_file(path, "scores.safetensors")

    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        try:
            scores = load_scores(self.path)
        except Exception as e:     # not a safetensors file
            raise PruneLabError(f"'{self.path}' is not a unit-score file: {type(e).__name__}") from None
        if not scores.attn:
            raise PruneLabError(f"'{self.path}' holds no unit scores (attn.<i>/mlp.<i> tensors)")
        return scores
