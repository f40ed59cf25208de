"""Hydra plugin of prune_lab's study sweeper: `hydra/sweeper=prune_lab_optuna`.

Registered as a `hydra.plugins` entry point (pyproject.toml), so Hydra finds it in any install;
kept light (Hydra imports it at every start): the logic lives in prune_lab/study/sweeper.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig


@dataclass
class PruneLabOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "prune_lab.study.plugin.PruneLabOptunaSweeper"
    n_jobs: int = 1                  # trials per batch; 1 stores each trial as soon as it ends
    max_failure_rate: float = 0.5    # at most floor(rate * n_trials) failed trials per invocation
    constraints: bool = True         # infeasible jobs (BudgetError) -> constraint violations, not failures
    reuse_plans: bool = True         # a trial whose plan the study already evaluated reuses that result
    heartbeat_interval: int = 60     # s; RDB storages: trials of a worker silent for 3x this are failed


ConfigStore.instance().store(group="hydra/sweeper", name="prune_lab_optuna", node=PruneLabOptunaSweeperConf,
                             provider="prune_lab")


class PruneLabOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, custom_search_space: str | None,
                 params: DictConfig | None, constraints: bool, reuse_plans: bool,
                 heartbeat_interval: int) -> None:
        from ..errors import PruneLabError
        from .sweeper import StudySweeper
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):     # one line each (__main__.py)
            if not value >= 1:
                raise PruneLabError(f"hydra.sweeper.{key} must be >= 1, got {value}")
        if not 0.0 <= max_failure_rate <= 1.0:                               # NaN fails too
            raise PruneLabError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {max_failure_rate}")
        self.sweeper = StudySweeper(sampler, direction, storage, study_name, n_trials, n_jobs,
                                    max_failure_rate, custom_search_space, params, constraints,
                                    reuse_plans, heartbeat_interval)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
