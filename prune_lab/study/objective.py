"""Sweep support on the job side: the job's return value and the attention-share resolver.

The Optuna presets (conf/hparams_search/optuna_*.yaml, common part conf/hydra/optuna_study.yaml) run on
prune_lab's study sweeper (prune_lab/study/sweeper.py); prune_lab/study/job.py has the
Outcome a job returns to it.
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ..errors import PruneLabError
from ..schema import Objective


# ---- what the task function returns ------------------------------------------------------
def objective_values(objective: Objective, ppl: float, params_total: int) -> float | tuple[float, float]:
    """ppl -> PPL; ppl_params -> (PPL, remaining parameters of the pruned model)."""
    if objective == Objective.ppl:
        return ppl
    return ppl, float(params_total)


def n_objectives(objective: Objective) -> int:
    return 2 if objective == Objective.ppl_params else 1


# ---- ${attn_mlp:x}: attention share out of 10 -> allocator.distribution "x:(10-x)" ---------
def attn_mlp(share: Any) -> str:
    if share is None:
        raise PruneLabError("search.attn_share is unset: give a value in [0, 10]")
    x = float(share)
    if not 0.0 <= x <= 10.0:
        raise PruneLabError(f"search.attn_share must be in [0, 10], got {x}")
    return f"{round(x, 3):g}:{round(10.0 - x, 3):g}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("attn_mlp"):
        OmegaConf.register_resolver("attn_mlp", attn_mlp)
