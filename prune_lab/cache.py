"""Content-addressed cache of importance scores (and layer importance).

Scores depend only on (model weights, criterion config, calibration tokens, seed): the key hashes
exactly those, so changing the calibration data or the criterion invalidates it by construction.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .scores import UnitScores

_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


@torch.no_grad()
def model_fingerprint(model) -> str:
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        d = p.detach()
        h.update(f"{name}{tuple(d.shape)}{d.double().sum().item():.10e}{d.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()


def tokens_fingerprint(batches: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ScoreCache:
    """Disk (safetensors) + in-process memory cache of tensor dicts; reports whether it reused."""

    def __init__(self, directory: str | Path | None, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(directory).expanduser() / "scores" if directory else None

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if not self.enabled:
            return None
        if key not in _MEMORY and self.dir and self._path(key).exists():
            _MEMORY[key] = load_file(str(self._path(key)))
        return _MEMORY.get(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _MEMORY[key] = tensors
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._path(key).with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(self._path(key))

    def unit_scores(self, key: str, compute) -> tuple[UnitScores, bool]:
        """compute() -> UnitScores. Returns (scores, reused)."""
        hit = self.get(key)
        if hit is not None:
            return UnitScores.from_tensors(hit), True
        scores = compute()
        self.put(key, scores.to_tensors())
        return scores, False

    def layer_scores(self, key: str, compute) -> tuple[torch.Tensor, bool]:
        hit = self.get(key)
        if hit is not None:
            return hit["layer"], True
        scores = compute()
        self.put(key, {"layer": scores})
        return scores, False
