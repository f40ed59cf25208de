"""Sweep support: the job's return value, the attention-share resolver, and the Optuna study callback.

The Optuna presets (conf/experiment/optuna_*.yaml, common part conf/hydra/optuna_study.yaml) use
hydra-optuna-sweeper with `n_jobs: 1`, so every trial is stored the moment it ends (a kill loses
only the trial in flight) and the plugin's own per-batch `max_failure_rate` is set to 1.0; the
study-wide failure budget is enforced here instead (StudyCallback.max_failure_rate).
"""
from __future__ import annotations

import fcntl
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import PruneLabError
from .schema import Objective

log = logging.getLogger(__name__)


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


# ---- study storage and results -----------------------------------------------------------
def sqlite_path(storage: str | None) -> Path | None:
    if storage and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):])
    return None


@contextmanager
def storage_lock(storage: str):
    """Serialise study creation between worker processes that start together (sqlite only)."""
    path = sqlite_path(storage)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def directions(sweeper_cfg: DictConfig) -> list[str]:
    d = sweeper_cfg.direction
    items = list(d) if isinstance(d, (ListConfig, list, tuple)) else [d]
    return [getattr(x, "name", str(x)) for x in items]


def open_study(sweeper_cfg: DictConfig, create: bool = False):
    import optuna
    kwargs = dict(study_name=sweeper_cfg.study_name, storage=sweeper_cfg.storage)
    if create:
        with storage_lock(sweeper_cfg.storage):
            return optuna.create_study(**kwargs, directions=directions(sweeper_cfg), load_if_exists=True)
    return optuna.load_study(**kwargs)


def pareto_front(study):
    """One row per Pareto-optimal trial: number, objective values, params (sorted by the first value)."""
    import pandas as pd
    names = ["ppl", "params_remaining"][: len(study.directions)]
    rows = [{"trial": t.number, **dict(zip(names, t.values)), **t.params} for t in study.best_trials]
    return pd.DataFrame(rows).sort_values(names[0]).reset_index(drop=True) if rows else pd.DataFrame()


def abort_sweep(message: str) -> None:
    """Stop the whole multirun with the CLI's one-line error and exit code 2.

    Hydra turns an Exception raised by a callback into a warning, so this exits instead.
    """
    print(f"prune_lab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class StudyCallback(Callback):
    """hydra.callbacks entry of the Optuna presets.

    multirun start: checks objective vs directions, creates the study (under a file lock, so
    parallel workers on one sqlite file do not race). Each job end: enforces the failure budget,
    at most floor(max_failure_rate * n_trials) failed trials in this worker. Multirun end: writes
    trials.csv (every trial of the study) and, for multi-objective studies, pareto_front.csv.
    """

    def __init__(self, max_failure_rate: float = 0.5):
        if not 0.0 <= max_failure_rate <= 1.0:
            raise PruneLabError(f"max_failure_rate must be in [0, 1], got {max_failure_rate}")
        self.max_failure_rate = max_failure_rate
        self.finished = self.failed = 0
        self.n_trials = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        want = n_objectives(config.objective)
        if len(directions(sweeper)) != want:
            abort_sweep(f"objective={config.objective.name} returns {want} value(s) but "
                        f"hydra.sweeper.direction has {len(directions(sweeper))}")
        self.n_trials = int(sweeper.n_trials)
        if sweeper.storage:
            study = open_study(sweeper, create=True)
            log.info("study '%s' in %s: %d trials so far", study.study_name, sweeper.storage,
                     len(study.trials))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.finished += 1
        if job_return.status != JobStatus.FAILED:
            return
        self.failed += 1
        budget = math.floor(self.max_failure_rate * max(self.n_trials, self.finished))
        log.warning("trial failed (%d of %d so far, budget %d): %s", self.failed, self.finished,
                    budget, job_return._return_value)
        if self.failed > budget:
            self._tell_failed(config, job_return)
            abort_sweep(f"{self.failed} of {self.finished} trials failed, over the budget of {budget} "
                        f"(max_failure_rate={self.max_failure_rate}); last error: {job_return._return_value}")

    @staticmethod
    def _tell_failed(config: DictConfig, job_return: JobReturn) -> None:
        """We abort before the sweeper tells this trial: store it as FAIL rather than RUNNING."""
        from optuna.trial import TrialState
        sweeper = config.hydra.sweeper
        if not sweeper.storage:
            return
        given = dict(o.split("=", 1) for o in job_return.overrides or [] if "=" in o)
        study = open_study(sweeper)
        for trial in reversed(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            if all(given.get(k) == str(v) for k, v in trial.params.items()):
                study.tell(trial.number, state=TrialState.FAIL)
                return

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if not sweeper.storage:
            return
        study = open_study(sweeper)
        out = Path(config.hydra.sweep.dir)
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        if len(study.directions) > 1:
            front = pareto_front(study)
            front.to_csv(out / "pareto_front.csv", index=False)
            log.info("Pareto front (%d trials) -> %s", len(front), out / "pareto_front.csv")
