"""What makes a sweep trial cheap: cached importance scores and, within one process, the dense model.

Scores depend only on (model weights, criterion config, calibration tokens, seed): the key hashes
exactly those, so changing the calibration data or the criterion invalidates it by construction.
They live on disk (safetensors, shared by every process and run) and in memory.

The dense model and its token streams are kept in memory across the jobs of one multirun process
(the basic launcher and the Optuna sweeper run jobs one after another in-process): each job gets a
fresh deep copy, because the pipeline prunes its model in place.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from .data import TokenStreams
from .scores import UnitScores

_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


@torch.no_grad()
def model_fingerprint(model) -> str:
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():   # float64 reductions without a float64 copy of the weights
        d = p.detach()
        total, l1 = d.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(d, 1, dtype=torch.float64).item()
        h.update(f"{name}{tuple(d.shape)}{total:.10e}{l1:.10e}".encode())
    return h.hexdigest()


def tokens_fingerprint(batches: list[torch.Tensor]) -> str:
    """Hash of the calibration tokens *and* their batching (second-order Taylor depends on it)."""
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
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


class ContentTokenStreams(TokenStreams):
    """TokenStreams keyed by the split's text hash, so it also hits for a re-instantiated dataset."""

    def __call__(self, dataset, split: str) -> torch.Tensor:
        key = (dataset.fingerprint(split), split)
        if key not in self._cache:
            self._cache[key] = self.tokenizer(dataset.text(split), return_tensors="pt").input_ids[0].long()
        return self._cache[key]


class DenseModels:
    """The dense model of the current process, kept on CPU and handed out as a fresh copy per job.

    Holds one model at a time (a sweep over models replaces it rather than piling them up).
    """

    def __init__(self):
        self.key: str | None = None
        self.model = self.tokenizer = self.streams = None

    def load(self, loader, model_cfg: DictConfig | dict, keep: bool):
        """-> (model, tokenizer, token streams, reused). keep=False loads from disk, keeps nothing."""
        if not keep:
            model, tokenizer = loader.load()
            return model, tokenizer, TokenStreams(tokenizer), False
        key = cache_key(model=OmegaConf.to_container(model_cfg, resolve=True)
                        if isinstance(model_cfg, DictConfig) else model_cfg)
        if key == self.key:
            return copy.deepcopy(self.model).to(loader.device), self.tokenizer, self.streams, True
        self.clear()
        model, tokenizer = loader.load()
        self.key, self.model, self.tokenizer = key, copy.deepcopy(model).cpu(), tokenizer
        self.streams = ContentTokenStreams(tokenizer)
        return model, tokenizer, self.streams, False

    def clear(self) -> None:
        self.key = None
        self.model = self.tokenizer = self.streams = None


DENSE_MODELS = DenseModels()


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def load_dense(loader, cfg: DictConfig):
    """The pipeline's load step: keeps the dense model in memory only within a multirun process."""
    keep = bool(cfg.cache.enabled and cfg.cache.keep_dense and in_multirun())
    return DENSE_MODELS.load(loader, cfg.model, keep)
