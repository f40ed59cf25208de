"""The importance-score cache: content-hash keys, checksummed entries, safe concurrent writers.

Scores depend only on (model weights, criterion config, calibration tokens, seed): the key hashes
exactly those -- every byte of every weight, so a permuted or retrained model never reuses another
model's scores. Entries live on disk (safetensors, shared by every process and run) and in memory.
Each entry carries a checksum of its tensors; a corrupt, truncated or non-finite entry is reported
as a warning and recomputed. The cache is an optimisation: a directory that cannot be written
(read-only, full disk) gives a warning and the job goes on without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.fingerprint import hash_tensor, new_hash
from ..core.fingerprint import model_fingerprint, tokens_fingerprint  # noqa: F401  (the cache keys' parts)
from ..core.scores import UnitScores
from ..errors import PruneLabError

log = logging.getLogger("prune_lab")
_MEMORY: dict[str, dict[str, torch.Tensor]] = {}
CHECKSUM = "prune_lab_checksum"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = new_hash()
    for name in sorted(tensors):
        h.update(name.encode())
        hash_tensor(h, tensors[name])
    return h.hexdigest()


def cache_key(**parts) -> str:
    parts = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
             for k, v in parts.items()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def code_version_part(version: int) -> dict:
    """The criterion's code version as a score-cache key part. The config in the key already names the
    class (its _target_); version 1 adds nothing, so entries written before versions existed (the same
    arithmetic) stay valid, and every later version is a key of its own."""
    if version < 1:
        raise ValueError(f"a criterion's version starts at 1, got {version}")
    return {} if version == 1 else {"code_version": version}


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


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
            tensors = self._read(self._path(key))
            if tensors is not None:
                _MEMORY[key] = tensors
        return _MEMORY.get(key)

    def _read(self, path: Path) -> dict[str, torch.Tensor] | None:
        """The entry if it is whole (checksum matches) and finite, else None after a warning."""
        try:
            with safe_open(str(path), framework="pt") as f:
                expected = (f.metadata() or {}).get(CHECKSUM)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            problem = ("it has no checksum" if expected is None else
                       "its checksum does not match" if tensors_checksum(tensors) != expected else
                       "it holds NaN/inf" if not all_finite(tensors) else None)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if problem is None:
            return tensors
        log.warning("score cache entry %s is corrupt or truncated (%s): recomputing", path, problem)
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if not all_finite(tensors):
            log.warning("scores contain NaN/inf: not caching them")
            return
        _MEMORY[key] = tensors
        if self.dir:
            self._write(self._path(key), tensors)

    def _write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Unique temp name + atomic rename: concurrent writers of one key never see half a file."""
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={"format": "pt", CHECKSUM: tensors_checksum(tensors)})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as e:
            log.warning("score cache %s is not writable (%s): continuing without caching these scores",
                        path.parent, str(e).splitlines()[0] if str(e) else type(e).__name__)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _parsed(self, key: str, parse):
        """The entry as parse(tensors) returns it, or None. An entry parse cannot use (a tensor missing
        under a valid checksum) is corrupt too: a warning, then it is recomputed and replaced."""
        hit = self.get(key)
        if hit is None:
            return None
        try:
            return parse(hit)
        except PruneLabError as e:
            _MEMORY.pop(key, None)
            log.warning("score cache entry %s is corrupt or truncated (%s): recomputing",
                        self._path(key) if self.dir else key, e)
            return None

    def unit_scores(self, key: str, compute, enabled: bool = True) -> tuple[UnitScores, bool]:
        """compute() -> UnitScores. Returns (scores, reused); enabled=False: compute, store nothing."""
        if not enabled:
            return compute(), False
        hit = self._parsed(key, UnitScores.from_tensors)
        if hit is not None:
            return hit, True
        scores = compute()
        self.put(key, scores.to_tensors())
        return scores, False

    def layer_scores(self, key: str, compute, enabled: bool = True) -> tuple[torch.Tensor, bool]:
        if not enabled:
            return compute(), False
        hit = self._parsed(key, layer_tensor)
        if hit is not None:
            return hit, True
        scores = compute()
        self.put(key, {"layer": scores})
        return scores, False


def layer_tensor(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "layer" not in tensors or tensors["layer"].dim() != 1:
        raise PruneLabError("it lacks a 1-D 'layer' tensor")
    return tensors["layer"]
