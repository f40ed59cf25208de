"""scores.safetensors of a run dir: unit scores (attn.<i> / mlp.<i>) and layer importance ("layer"),
with their origin in the metadata (the model's content fingerprint, the fingerprints of the calibration
tokens of each), its one writer and its readers (importance=file, layer_importance=file)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..core.scores import UnitScores
from ..errors import PruneLabError

# origin key -> safetensors metadata key: the model (core/fingerprint.py model_fingerprint) and the
# calibration tokens (tokens_fingerprint) of the unit scores and of the layer importance
ORIGIN = {"model": "prune_lab_model", "tokens": "prune_lab_tokens", "layer_tokens": "prune_lab_layer_tokens"}


def save_scores(path: str | Path, scores: UnitScores | None, layer_scores: torch.Tensor | None = None,
                origin: dict | None = None) -> None:
    """Unit scores (attn.i / mlp.i) and layer importance ("layer") in one safetensors file (a run's
    scores.safetensors; nothing is written when both are None), `origin` (ORIGIN's keys) in its metadata."""
    tensors = scores.to_tensors() if scores is not None else {}
    if layer_scores is not None:
        tensors["layer"] = layer_scores.detach().cpu().float().contiguous()
    if tensors:
        meta = {"format": "pt", **{ORIGIN[k]: str(v) for k, v in (origin or {}).items() if v is not None}}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)


def read_scores(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, origin) of a scores file; origin is {} for a file written before it was recorded.
    A file that is not safetensors is one PruneLabError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PruneLabError(f"'{path}' is not a safetensors score file ({type(e).__name__}: {first})") from None
    return tensors, {k: meta[m] for k, m in ORIGIN.items() if m in meta}


def load_scores(path: str | Path) -> UnitScores:
    """The unit scores of a scores file, checked whole (every layer's attn.<i> and mlp.<i>, 1-D)."""
    try:
        return UnitScores.from_tensors(read_scores(path)[0])
    except PruneLabError as e:
        raise PruneLabError(f"'{path}': {e}") from None


def scores_file(path: str, default_name: str) -> Path:
    """`path`, or `path/default_name` when path is a run dir; fails at build time if missing."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise PruneLabError(f"score file '{p}' does not exist (run an analyse job first: allocator=none)")
    return p
