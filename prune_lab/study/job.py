"""Optuna studies on the job side: what a trial returns (Outcome) and the reuse of evaluated plans.

The driver side is prune_lab/study/sweeper.py (`hydra/sweeper=prune_lab_optuna`) with its storages
in prune_lab/study/storage.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..cache.scores import model_fingerprint
from .storage import normalise_url, open_storage

log = logging.getLogger("prune_lab")

# ---- what a trial returns ---------------------------------------------------------------------
@dataclass
class Outcome:
    """A job's return value in a study. `violation` > 0: infeasible (a constraint violation, not a
    failure); its objective values are +inf. float()/iter() keep the stock Optuna sweeper working."""
    values: tuple[float, ...]
    violation: float = 0.0
    attrs: dict = field(default_factory=dict)     # stored as trial user attrs (plan_key, results, ...)

    @classmethod
    def infeasible(cls, n_values: int, violation: float | None, reason: str) -> "Outcome":
        v = 1.0 if violation is None or not math.isfinite(violation) or violation <= 0 else violation
        return cls((math.inf,) * n_values, v, {"infeasible": reason})

    def __float__(self) -> float:
        return float(self.values[0])

    def __iter__(self):
        return iter(self.values)


def constraint_of(trial) -> list[float]:
    """Optuna samplers' constraints_func: the violation stored on the trial (<= 0 feasible)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


# ---- reuse of evaluated plans -----------------------------------------------------------------
PLAN_ONLY = ("importance", "layer_importance", "allocator", "search", "output", "cache")


def evaluation_key(plan, model_fingerprint: str, data_fingerprint, cfg) -> str:
    """Content key of one evaluation: the allocator's plan, the dense model's and the data's content
    fingerprints, and every setting that is not only an input of the plan (PLAN_ONLY) or bookkeeping:
    model loading, data, calibration, reconstruction, recovery, evaluation, seed, ..."""
    from omegaconf import OmegaConf
    after = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
             for k in cfg if k not in PLAN_ONLY}
    blob = json.dumps({"plan": plan.to_frame().to_csv(index=False), "model": model_fingerprint,
                       "data": data_fingerprint, "after": after}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


_OPEN: dict[str, Any] = {}


@dataclass
class Prior:
    """A completed trial's evaluation of the same plan: its final results and its metrics.json parts."""
    results: dict
    params_total: int
    metrics: dict        # pruned / recovered results and reused_plan, merged into this job's record


class PlanMemo:
    """Finds a completed trial of the running study that evaluated the same plan (same key)."""

    def __init__(self, storage: str, study_name: str):
        self.storage, self.study_name = storage, study_name
        self.key: str | None = None

    @classmethod
    def from_hydra(cls, sweeper_cfg) -> "PlanMemo | None":
        if not (sweeper_cfg.get("reuse_plans") and sweeper_cfg.get("storage")):
            return None
        return cls(normalise_url(sweeper_cfg.storage), sweeper_cfg.study_name)

    def lookup(self, plan, model, data_fingerprint, cfg, run_dir: Path) -> Prior | None:
        """The prior trial's result, and its plan.csv copied into run_dir: with reconstruct=obs the units
        actually removed differ from the allocator's plan (the key), deterministically."""
        import optuna
        from optuna.trial import TrialState

        self.key = evaluation_key(plan, model_fingerprint(model), data_fingerprint, cfg)
        if self.storage not in _OPEN:     # one storage (connection pool) per process, not per job
            _OPEN[self.storage] = open_storage(self.storage)
        study = optuna.load_study(study_name=self.study_name, storage=_OPEN[self.storage])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("plan_key") == self.key and "results" in t.user_attrs:
                log.info("plan already evaluated by trial %d of the study: reusing its result", t.number)
                prior_plan = Path(t.user_attrs.get("run_dir", "")) / "plan.csv"
                if prior_plan.is_file():
                    with atomic_path(Path(run_dir) / "plan.csv") as tmp:
                        shutil.copyfile(prior_plan, tmp)
                return Prior(t.user_attrs["results"], t.user_attrs["params_total"],
                             {**t.user_attrs.get("metrics", {}), "reused_plan": {"trial": t.number, "key": self.key}})
        return None


def job_outcome(values: float | tuple, result, run_dir: Path, memo: PlanMemo | None) -> Outcome:
    """A finished job's Outcome: its objective values, its run dir, and what a later trial needs to
    reuse its result (result: the pipeline's JobResult)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    values = values if isinstance(values, tuple) else (values,)
    attrs = {"run_dir": str(run_dir.resolve()), "results": result.results, "params_total": result.params_total,
             "metrics": {k: metrics[k] for k in ("pruned", "recovered") if k in metrics}}
    if memo is not None and memo.key is not None:
        attrs["plan_key"] = memo.key
    if "reused_plan" in metrics:
        attrs["reused_from_trial"] = metrics["reused_plan"]["trial"]
    return Outcome(tuple(float(v) for v in values), 0.0, attrs)


def in_study(hydra_cfg) -> bool:
    """Whether this job is a trial of prune_lab's study sweeper."""
    return str(hydra_cfg.sweeper.get("_target_", "")).endswith(".PruneLabOptunaSweeper")
