"""layer_importance=file: layer importance saved by an earlier run."""
from __future__ import annotations

import json
import math
from numbers import Real

import torch

from ..artifacts.scores import read_scores, scores_file
from ..errors import PruneLabError
from .base import LayerImportance


class FromFile(LayerImportance):
    """Layer importance saved by an earlier run: layers.json ("layer_importance"), or the "layer"
    tensor of scores.safetensors; a run dir means its layers.json. The file is read and checked (one
    finite number per layer) when the job is built; its layer count against the model after loading."""

    cacheable = False
    name = "file"

    def __init__(self, path: str, n_samples: int | None = None):
        super().__init__(n_samples)
        self.path = scores_file(path, "layers.json")
        self.recorded: dict = {}
        if self.path.suffix == ".json":
            values = self._from_json()
        else:
            tensors, self.recorded = read_scores(self.path)
            values = tensors.get("layer")
            if values is not None and values.dim() != 1:
                raise PruneLabError(f"'{self.path}': the layer importance must be 1-D (one score per layer), "
                                    f"got {list(values.shape)}")
            values = values.tolist() if values is not None else None
        if values is None:
            raise PruneLabError(f"'{self.path}' holds no layer importance (the run had layer_importance=none?)")
        if not values or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise PruneLabError(f"'{self.path}': the layer importance must be one finite number per layer, "
                                f"got {str(values)[:80]}")
        self.values = torch.tensor(values, dtype=torch.float32)

    def _from_json(self):
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:       # JSONDecodeError is a ValueError
            raise PruneLabError(f"'{self.path}' is not JSON ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise PruneLabError(f"'{self.path}' is not a layers.json (an object with \"layer_importance\"), "
                                f"got a JSON {type(data).__name__}")
        values = data.get("layer_importance")
        if values is not None and not isinstance(values, list):
            raise PruneLabError(f"'{self.path}': \"layer_importance\" must be a list of numbers, got {str(values)[:80]}")
        return values

    def check_model(self, views) -> None:
        if len(self.values) != len(views):
            raise PruneLabError(f"'{self.path}' holds the importance of {len(self.values)} layers, the model has "
                                f"{len(views)}: it was saved for another model")

    def __call__(self, model=None, batches=None) -> torch.Tensor:
        return self.values.clone()

    def origin(self, tokens_fingerprint: str | None) -> dict:
        """The file's own record of the layer tokens, if it has one."""
        return {k: v for k, v in self.recorded.items() if k == "layer_tokens"}
