"""layer_importance=file: layer importance saved by an earlier run."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ..artifacts.scores import scores_file
from ..errors import PruneLabError
from .base import LayerImportance


class FromFile(LayerImportance):
    """Layer importance saved by an earlier run: layers.json ("layer_importance"), or the "layer"
    tensor of scores.safetensors; a run dir means its layers.json."""

    cacheable = False
    name = "file"

    def __init__(self, path: str, n_samples: int | None = None):
        super().__init__(n_samples)
        self.path = scores_file(path, "layers.json")

    def __call__(self, model=None, batches=None) -> torch.Tensor:
        if self.path.suffix == ".json":
            values = json.loads(self.path.read_text()).get("layer_importance")
        else:
            values = load_file(str(self.path)).get("layer")
        if values is None:
            raise PruneLabError(f"'{self.path}' holds no layer importance (the run had layer_importance=none?)")
        return torch.as_tensor(values, dtype=torch.float32)
