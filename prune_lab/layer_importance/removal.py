"""layer_importance=removal."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.adapter import decoder_layers
from .base import LayerImportance, bypassed, calibration_ppl


class Removal(LayerImportance):
    """PPL rise on the calibration batches when the layer is bypassed (higher = more important)."""

    name = "removal"

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor]) -> torch.Tensor:
        base = calibration_ppl(model, batches)
        scores = []
        for i in tqdm(range(len(decoder_layers(model))), desc="removal: layer", leave=False):
            with bypassed(model, i):
                scores.append(calibration_ppl(model, batches) - base)
        return torch.tensor(scores, dtype=torch.float32)
