"""allocator.searcher=optuna: an Optuna study (CMA-ES by default, TPE or GP selectable) over per-part
removal shares, each trial projected onto the budget and the ladder and scored on the last stage's
tokens. The study lives in <run dir>/search.db (optuna-dashboard sqlite:///<run dir>/search.db);
a rerun into the same run dir resumes it."""
from __future__ import annotations

import numpy as np

from ...errors import PruneLabError
from .budget import Budget

SAMPLERS = ("cmaes", "tpe", "gp")


def sampler(name: str, seed: int):
    import optuna
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise PruneLabError(f"allocator.sampler must be one of {', '.join(SAMPLERS)}, got '{name}'")


def optimise(fitness, budget: Budget, seeds: list[np.ndarray], n_batches: int, trials: int, sampler_name: str,
             seed: int, storage: str, rng: np.random.Generator, trajectory: list) -> np.ndarray:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="search", storage=storage, load_if_exists=True,
                                sampler=sampler(sampler_name, seed), direction="minimize")
    free = np.flatnonzero(budget.top > 0)
    for s in seeds:                                      # the seeds' shares as the first points
        if len(study.trials) == 0 or len(study.trials) < len(seeds):
            study.enqueue_trial({f"p{i}": float(s[i] / budget.top[i]) for i in free})
    best = {"value": np.inf, "levels": seeds[0]}

    def objective(trial):
        shares = np.zeros(len(budget.top))
        shares[free] = [trial.suggest_float(f"p{i}", 0.0, 1.0) for i in free]
        levels = budget.repair(budget.project(shares), rng)
        value = fitness(levels, n_batches)
        trial.set_user_attr("levels", levels.tolist())
        if value < best["value"]:
            best.update(value=value, levels=levels)
        trajectory.append((fitness.evaluations, fitness.tokens, best["value"]))
        return value

    study.optimize(objective, n_trials=trials)
    return np.array(study.best_trial.user_attrs["levels"])
