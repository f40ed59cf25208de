"""The unit-importance lifecycle (twin of conf/importance/*.yaml): a criterion maps (model,
calibration batches, seed) -> UnitScores, one value per GQA group and MLP channel of every layer.
Gradient criteria run one forward/backward per batch for all layers at once; accumulators are fp32."""
from __future__ import annotations

import torch

from ..core.scores import UnitScores


class Importance:
    """Base class. `cacheable`: the pipeline may keep the scores in the score cache. `version`: the
    criterion's arithmetic; bump it when a change (here or in the engine code it calls) changes its
    scores, so the score cache (keyed by content and config, not code) never hands back scores of older
    code (cache.scores.code_version_part puts it in the key)."""

    cacheable = True
    name = "importance"
    version = 1

    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        raise NotImplementedError

    def origin(self, model_fingerprint: str, tokens_fingerprint: str | None) -> dict:
        """Where the scores come from, for scores.safetensors' metadata (artifacts/scores.py ORIGIN):
        computed on this job's model and calibration tokens."""
        return {"model": model_fingerprint, "tokens": tokens_fingerprint}
