"""The study sweeper (`hydra/sweeper=prune_lab_optuna`): hydra-optuna-sweeper's search-space parsing
with prune_lab's own study loop.

On top of the stock sweeper it: opens any storage URL (sqlite, PostgreSQL/MySQL, journal file) with one
clear error line when it cannot; marks RUNNING trials of dead workers failed before resuming; derives
the sampler seed from the trials already in the study (a rerun proposes new points); records each
trial's worker and keeps a heartbeat while it runs; stores infeasible trials (Outcome.violation > 0) as
constraint violations; enforces a study-wide failure budget; writes optimization_results.yaml,
trials.csv and, for several objectives, pareto_front.csv in the sweep dir.
"""
from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import DictConfig
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import TrialState

from ..artifacts.rundir import exit_code, signal_of, signals_as_interrupts
from ..atomic import disk_full, full_file
from ..errors import PruneLabError
from .job import Outcome, constraint_of
from .location import locate, pin_storage, record_location
from .objective import n_objectives
from .results import write_tables
from .storage import (
    check_same_job,
    derived_seed,
    fail_stale_trials,
    job_settings,
    open_storage,
    redact,
    storage_file,
    storage_place,
    worker_id,
)
from .trials import Heartbeat, Reserve, settled

log = logging.getLogger(__name__)
SAMPLER_WHITELIST = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")     # optuna >= 5
# heartbeats are used with ask/tell here, which optuna warns about; both features are stable in use
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def abort_sweep(message: str) -> None:
    """Stop the multirun with the CLI's one-line error and exit code 2 (Hydra would print a traceback)."""
    print(f"prune_lab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def unpack(ret: Any, n: int) -> Outcome:
    """A job's return value -> Outcome with n objective values (ValueError when it has another shape)."""
    if not isinstance(ret, Outcome):
        values = tuple(ret) if isinstance(ret, (tuple, list)) else (ret,)
        ret = Outcome(tuple(float(v) for v in values))
    if len(ret.values) != n:
        raise ValueError(f"the job returned {len(ret.values)} value(s) for a study with {n} direction(s)")
    return ret


def tell(study, trial, **kwargs) -> None:
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:   # the grid sampler calls study.stop() after the last point: stored all the same
        if "Study.stop" not in str(e):
            raise


class StudySweeper(OptunaSweeperImpl):
    def __init__(self, sampler: DictConfig, direction, storage, study_name, n_trials, n_jobs,
                 max_failure_rate, custom_search_space, params, constraints: bool = True,
                 reuse_plans: bool = True, heartbeat_interval: int = 60):
        super().__init__(None, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                         custom_search_space, params)
        self.sampler_cfg, self.constraints, self.heartbeat_interval = sampler, constraints, heartbeat_interval
        self.reserve = Reserve(None)

    # ---- set-up -------------------------------------------------------------------------------
    def _make_sampler(self, seed: int | None, space: dict):
        make = instantiate(self.sampler_cfg, _partial_=True, _execution_whitelist_=SAMPLER_WHITELIST)
        kwargs: dict[str, Any] = {"seed": seed}
        if make.func is optuna.samplers.GridSampler:
            continuous = [k for k, d in space.items() if isinstance(d, optuna.distributions.FloatDistribution)
                          and d.step is None]
            if continuous:
                raise PruneLabError(f"the grid sampler needs discrete values (choice(...) or range(...)), "
                                    f"not interval(...): {', '.join(continuous)}")
            grid = {k: self._to_grid_sampler_choices(d) for k, d in space.items()}
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            return make(grid, **kwargs)
        if self.constraints and not SET_CONSTRAINT and "constraints_func" in self.sampler_cfg:
            kwargs["constraints_func"] = constraint_of      # optuna 4: samplers learn constraints through this
        return make(**kwargs)

    def _open_study(self, directions: list[str], searched) -> optuna.Study:
        given = self.storage
        if given:       # resolved once, here; every trial opens the same file (study/location.py)
            self.storage = locate(str(given), self.study_name, self.config.cache.dir)
            pin_storage(self.config, self.storage)
        storage = open_storage(self.storage, self.heartbeat_interval) if self.storage else None
        study = optuna.create_study(study_name=self.study_name, storage=storage, directions=directions,
                                    load_if_exists=True)
        if storage is not None:
            record_location(study, str(given), self.storage)
        have = [d.name.lower() for d in study.directions]
        if have != [d.lower() for d in directions]:
            raise PruneLabError(f"study '{study.study_name}' has directions {have}, this sweep asks for "
                                f"{directions}: name another hydra.sweeper.study_name")
        if storage is not None:
            check_same_job(study, job_settings(self.config, searched))
        return study

    def sweep(self, arguments: list[str]) -> None:
        """The study loop under SIGTERM-as-interrupt; a full disk or database is one line, exit 2."""
        try:
            with signals_as_interrupts():
                self._sweep(arguments)
        except KeyboardInterrupt as e:
            print(f"prune_lab: interrupted by {signal_of(e)}: study '{self.study_name}' stopped (its running "
                  f"trials marked failed)", file=sys.stderr)
            raise SystemExit(exit_code(e)) from None
        except Exception as e:
            if disk_full(e):         # the study's database, or a file Hydra writes for a trial
                where = full_file(e) or storage_place(self.storage)
                abort_sweep(f"no space left on {where} (study '{self.study_name}')")
            raise
        finally:
            self.reserve.release()

    def _sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        space, fixed, fixed_overrides = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            space.pop(name, None)
        directions = self._get_directions()
        want = n_objectives(self.config.objective)
        try:
            if len(directions) != want:
                raise PruneLabError(f"objective={self.config.objective.name} returns {want} value(s) but "
                                    f"hydra.sweeper.direction has {len(directions)}")
            study = self._open_study(directions, set(space))
        except PruneLabError as e:
            abort_sweep(str(e))
        self.reserve = Reserve(storage_file(self.storage))
        stale = fail_stale_trials(study)
        if stale:
            log.warning("marked %d stale RUNNING trial(s) of dead workers FAILED: %s", len(stale), stale)
        seed = derived_seed(self.sampler_cfg.get("seed"), len(study.trials))
        try:
            study.sampler = self._make_sampler(seed, space)
        except PruneLabError as e:
            abort_sweep(str(e))
        log.info("study '%s' in %s: %d trials so far; sampler %s, seed %s; %d trials to run",
                 study.study_name, redact(str(self.storage)), len(study.trials),
                 type(study.sampler).__name__, seed, self.n_trials)
        self._run_trials(study, space, fixed, fixed_overrides, len(directions), seed)
        self._write_results(study)

    # ---- the loop -----------------------------------------------------------------------------
    def _run_trials(self, study, space, fixed, fixed_overrides, n_values: int, seed) -> None:
        budget = math.floor(self.max_failure_rate * self.n_trials)
        failed, done, to_go = 0, 0, self.n_trials
        while to_go > 0:
            trials: list = []
            with settled(study, trials, self.reserve):   # SIGTERM, a full disk: no trial left RUNNING
                trials.extend(study.ask() for _ in range(min(self.n_jobs, to_go)))
                for trial in trials:
                    trial.set_user_attr("worker", worker_id())
                    trial.set_user_attr("sampler_seed", seed)
                overrides = self._configure_trials(trials, space, fixed, fixed_overrides)
                with Heartbeat(study._storage, [t._trial_id for t in trials], self.heartbeat_interval):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                self.job_idx += len(returns)
                for trial, ret in zip(trials, returns):
                    error = self._tell(study, trial, ret, n_values)
                    done += 1
                    if error is not None:
                        failed += 1
                        log.warning("trial %d failed (%d of %d so far, budget %d): %s", trial.number, failed,
                                    done, budget, error)
                    if error is not None and disk_full(ret._return_value):
                        abort_sweep(f"trial {trial.number}: {ret._return_value}: the study stopped")
            if failed > budget:
                abort_sweep(f"{failed} of {done} trials failed, over the budget of {budget} "
                            f"(max_failure_rate={self.max_failure_rate}); last error: {error}")
            to_go -= len(trials)

    def _tell(self, study, trial, ret, n_values: int) -> str | None:
        """Store one finished job in the study; returns the error of a failed trial."""
        try:
            if ret.status == JobStatus.FAILED:
                raise ret._return_value
            out = unpack(ret.return_value, n_values)
        except Exception as e:   # the job's own error, or a return value of the wrong shape
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            tell(study, trial, state=TrialState.FAIL)
            return f"{type(e).__name__}: {e}"
        for key, value in out.attrs.items():
            trial.set_user_attr(key, value)
        if self.constraints:    # <= 0 feasible; samplers steer away from violations, best_trials skips them
            trial.set_user_attr("constraint", out.violation)
            if SET_CONSTRAINT:
                trial.set_constraint("budget", out.violation)
            else:
                study._storage.set_trial_system_attr(trial._trial_id, _CONSTRAINTS_KEY, (out.violation,))
        if out.violation > 0:
            log.info("trial %d infeasible (violation %.3g): %s", trial.number, out.violation,
                     out.attrs.get("infeasible"))
        tell(study, trial, values=list(out.values))
        return None

    # ---- results ------------------------------------------------------------------------------
    def _write_results(self, study) -> None:
        out = Path(self.config.hydra.sweep.dir)
        try:
            write_tables(study, out)
        except OSError as e:
            if disk_full(e):
                abort_sweep(f"no space left on {out}: the study is stored, its tables were not written")
            raise
