"""Content fingerprints (pure torch): a model's every weight byte, the calibration tokens and their
batching. They key the score cache (prune_lab/cache/scores.py) and are recorded in a run's
scores.safetensors, so that importance=file can tell another model's scores (importance/file.py)."""
from __future__ import annotations

import hashlib

import torch

_CHUNK = 1 << 26                 # elements per host copy when hashing a device tensor


def new_hash():
    """xxh3-128 (~10 GB/s; xxhash ships with `datasets`), else sha256 (~0.5 GB/s)."""
    try:
        import xxhash
        return xxhash.xxh3_128()
    except ImportError:
        return hashlib.sha256()


def hash_tensor(h, t: torch.Tensor) -> None:
    """Feed dtype, shape and the raw bytes of `t` to the hash (no Python loop over elements)."""
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().reshape(-1)
    for chunk in (flat,) if flat.device.type == "cpu" else flat.split(_CHUNK):
        h.update(chunk.cpu().contiguous().view(torch.uint8).numpy())


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Hash of the config and every parameter's and buffer's bytes (names, dtypes, shapes included)."""
    h = new_hash()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        hash_tensor(h, t)
    return f"{type(h).__name__}:{h.hexdigest()}"


def tokens_fingerprint(batches: list[torch.Tensor]) -> str:
    """Hash of the calibration tokens *and* their batching (second-order Taylor depends on it)."""
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.cpu().numpy().tobytes())
    return h.hexdigest()
