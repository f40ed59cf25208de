"""What a study writes into its sweep dir when an invocation ends (prune_lab/study/sweeper.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..atomic import atomic_path

log = logging.getLogger(__name__)


def write_tables(study, out: Path) -> None:
    """trials.csv, optimization_results.yaml and, for several objectives, pareto_front.csv, each whole."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "trials.csv") as tmp:
        study.trials_dataframe().to_csv(tmp, index=False)
    try:
        best = study.best_trials
    except ValueError:
        best = []
    if len(study.directions) == 1:
        result = {"name": "optuna", "best_params": best[0].params if best else None,
                  "best_value": best[0].value if best else None}
        if best:
            log.info("best value %.4f with %s (trial %d)", best[0].value, best[0].params, best[0].number)
        else:
            log.warning("no feasible completed trial in study '%s' yet", study.study_name)
    else:
        result = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in best]}
        front = pareto_front(best)
        with atomic_path(out / "pareto_front.csv") as tmp:
            front.to_csv(tmp, index=False)
        log.info("Pareto front (%d trials) -> %s", len(front), out / "pareto_front.csv")
    with atomic_path(out / "optimization_results.yaml") as tmp:
        OmegaConf.save(OmegaConf.create(result), tmp)


def pareto_front(best_trials):
    """One row per Pareto-optimal (feasible) trial: number, objective values, params; sorted by PPL."""
    import pandas as pd
    cols = ["trial", "ppl", "params_remaining"]
    rows = [{"trial": t.number, "ppl": t.values[0], "params_remaining": t.values[1], **t.params}
            for t in best_trials]
    return pd.DataFrame(rows, columns=None if rows else cols).sort_values("ppl").reset_index(drop=True)

