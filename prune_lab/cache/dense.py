"""The dense model of a multirun process, kept in memory so a sweep trial does not reload it.

The basic launcher and the Optuna sweeper run jobs one after another in-process: each job gets a
fresh deep copy of the dense model (the pipeline prunes its model in place) and the token streams
tokenised by earlier jobs.
"""
from __future__ import annotations

import copy

from omegaconf import DictConfig

from ..data import TokenStreams
from .scores import cache_key


class ContentTokenStreams(TokenStreams):
    """TokenStreams keyed by the split's text hash, so it also hits for a re-instantiated dataset."""

    def __call__(self, dataset, split: str):
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
        key = cache_key(model=model_cfg)
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
