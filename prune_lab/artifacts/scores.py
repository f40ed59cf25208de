"""scores.safetensors of a run dir: unit scores (attn.<i> / mlp.<i>) and layer importance ("layer"),
its one writer and its readers (importance=file, layer_importance=file)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..core.scores import UnitScores
from ..errors import PruneLabError


def save_scores(path: str | Path, scores: UnitScores | None, layer_scores: torch.Tensor | None = None) -> None:
    """Unit scores (attn.i / mlp.i) and layer importance ("layer") in one safetensors file (a run's
    scores.safetensors; nothing is written when both are None)."""
    tensors = scores.to_tensors() if scores is not None else {}
    if layer_scores is not None:
        tensors["layer"] = layer_scores.detach().cpu().float().contiguous()
    if tensors:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))


def load_scores(path: str | Path) -> UnitScores:
    return UnitScores.from_tensors(load_file(str(path)))


def scores_file(path: str, default_name: str) -> Path:
    """`path`, or `path/default_name` when path is a run dir; fails at build time if missing."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise PruneLabError(f"score file '{p}' does not exist (run an analyse job first: allocator=none)")
    return p
