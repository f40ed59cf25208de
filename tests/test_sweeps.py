"""Hydra multirun and Optuna studies, run for real through the CLI on a tiny random model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, tiny_overrides, write_small_corpus
from prune_lab.errors import PruneLabError
from prune_lab.sweep import StudyCallback, attn_mlp, register_resolvers

ABLATIONS = {"ablate_layer_importance": ("layer_importance", "activation,removal"),
             "ablate_strategy": ("allocator.strategy", "inverse,proportional,uniform,inverse_minmax"),
             "ablate_distribution": ("allocator.distribution", "0:10,1:9,2:8,3:7,4:6,5:5,6:4"),
             "ablate_freezing": ("allocator.freeze_top_n", "0,1,2,3,5"),
             "ablate_importance": ("importance", "taylor,taylor_2nd,wanda,magnitude,random")}


@pytest.fixture
def job_args(tmp_path):
    """Tiny model + a small local corpus, so a trial is about a second."""
    write_small_corpus(tmp_path)
    return [*tiny_overrides("llama", tmp_path), "data=text", f"data.train={tmp_path}/train.txt",
            f"data.test={tmp_path}/test.txt"]


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "prune_lab", *args]


def cli_env(tmp_path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PRUNE_LAB_CACHE=str(tmp_path / "cache"))


def cli(tmp_path, *args, expect_rc: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run(cli_command(*args), cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == expect_rc, out.stderr[-3000:]
    return out


def study_args(tmp_path, preset: str, name: str = "t") -> list[str]:
    return ["-m", f"experiment={preset}", f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db",
            f"hydra.sweeper.study_name={name}"]


def load_study(tmp_path, name: str = "t"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/study.db")


def completed(study) -> list:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def compose_with_hydra(*overrides):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


# ---- composition (fast) --------------------------------------------------------------------
def test_attn_mlp_builds_the_distribution():
    assert [attn_mlp(x) for x in (0, 3, 2.5, 10, 3.14159)] == ["0:10", "3:7", "2.5:7.5", "10:0", "3.142:6.858"]
    for bad in (None, -1, 10.5):
        with pytest.raises(PruneLabError):
            attn_mlp(bad)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_overlays_set_their_sweep(name):
    cfg = compose_with_hydra(f"experiment={name}")
    key, values = ABLATIONS[name]
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {key: values}
    assert cfg.allocator._target_ == "prune_lab.allocator.Layerwise"
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{name}/")


def test_optuna_presets_compose():
    dist = compose_with_hydra("experiment=optuna_distribution")
    assert dist.allocator.distribution == "3:7" and dist.objective.name == "ppl"
    assert dist.hydra.sweeper.params["search.attn_share"] == "interval(0.0, 10.0)"
    assert dist.hydra.sweeper.storage == "sqlite:///multirun/studies/distribution_r0.25/study.db"
    assert dist.hydra.sweeper.n_jobs == 1 and dist.output.plots is False
    joint = compose_with_hydra("experiment=optuna_joint", "search.attn_share=2")
    assert joint.allocator.distribution == "2:8"
    assert set(joint.hydra.sweeper.params) == {"search.attn_share", "allocator.alpha", "allocator.strategy",
                                               "allocator.freeze_top_n", "importance"}
    pareto = compose_with_hydra("experiment=optuna_pareto")
    assert pareto.objective.name == "ppl_params" and len(pareto.hydra.sweeper.direction) == 2
    assert isinstance(instantiate(pareto.hydra.sweeper.sampler), optuna.samplers.NSGAIISampler)


def test_study_callback_stops_a_study_whose_objective_does_not_match_its_directions(tmp_path, capsys):
    cfg = compose_with_hydra("experiment=optuna_distribution", "objective=ppl_params",
                             f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db")
    with pytest.raises(SystemExit) as stop:
        StudyCallback().on_multirun_start(config=cfg)
    assert stop.value.code == 2 and not (tmp_path / "study.db").exists()
    assert "objective=ppl_params returns 2 value(s) but hydra.sweeper.direction has 1" in capsys.readouterr().err
    with pytest.raises(PruneLabError):
        StudyCallback(max_failure_rate=1.5)


def test_slurm_launcher_overlay_composes_when_the_plugin_is_installed():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    cfg = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"


# ---- multirun (basic sweeper) ----------------------------------------------------------------
def test_multirun_as_typed_reuses_scores_and_invalidates_on_criterion(tmp_path, job_args):
    cli(tmp_path, "-m", "allocator=layerwise", "allocator.distribution=0:10,2:8", "importance=taylor,wanda",
        *job_args, f"hydra.sweep.dir={tmp_path}/grid")
    jobs = {}
    for i in range(4):
        run_dir = tmp_path / "grid" / str(i)
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "ok"
        jobs[(cfg.allocator.distribution, cfg.importance._target_.rsplit(".", 1)[1])] = (i, metrics)
    assert set(jobs) == {(d, c) for d in ("0:10", "2:8") for c in ("Taylor", "Wanda")}
    assert jobs[("0:10", "Taylor")][1]["plan"]["groups_removed"] == 0     # MLP only
    assert jobs[("2:8", "Taylor")][1]["plan"]["groups_removed"] > 0
    for crit in ("Taylor", "Wanda"):   # each criterion: computed by its first job, reused by the next
        (i0, first), (i1, second) = sorted(jobs[(d, crit)] for d in ("0:10", "2:8"))
        assert first["scores"]["reused"] is False and second["scores"]["reused"] is True
    by_num = sorted(jobs.values(), key=lambda j: j[0])
    assert [m["scores"]["layer_reused"] for _, m in by_num] == [False, True, True, True]
    assert [m["model"]["dense_reused"] for _, m in by_num] == [False, True, True, True]
    assert all("evaluate" in m["timings_s"] and "score" in m["timings_s"] for _, m in by_num)


# ---- Optuna ----------------------------------------------------------------------------------
def test_optuna_study_resumes_after_a_kill_and_takes_parallel_workers(tmp_path, job_args):
    base = [*study_args(tmp_path, "optuna_distribution"), *job_args]
    worker = subprocess.Popen(cli_command(*base, "hydra.sweeper.n_trials=50", f"hydra.sweep.dir={tmp_path}/killed"),
                              cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and worker.poll() is None:
        time.sleep(1)
        try:
            if len(completed(load_study(tmp_path))) >= 2:
                break
        except KeyError:                         # study not created yet
            pass
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    before = {t.number: t.value for t in completed(load_study(tmp_path))}
    finished_runs = [p for p in (tmp_path / "killed").glob("*/metrics.json")
                     if json.loads(p.read_text())["status"] == "ok"]
    assert len(before) >= 2 and len(before) >= len(finished_runs) - 1   # at most the in-flight one is lost

    # Resume with two parallel workers on the same storage, each with its own sampler seed.
    workers = [subprocess.Popen(cli_command(*base, "hydra.sweeper.n_trials=2", f"hydra.sweeper.sampler.seed={s}",
                                            f"hydra.sweep.dir={tmp_path}/worker{s}"),
                                cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    study = load_study(tmp_path)
    after = {t.number: t.value for t in completed(study)}
    assert len(after) == len(before) + 4 and all(after[n] == v for n, v in before.items())
    results = [OmegaConf.load(tmp_path / f"worker{s}" / "optimization_results.yaml") for s in (1, 2)]
    assert all(set(r.best_params) == {"search.attn_share"} and r.best_value in after.values() for r in results)
    last = min(results, key=lambda r: r.best_value)       # the worker that finished last saw every trial
    assert last.best_value == min(after.values()) == study.best_value
    assert any(t.params == dict(last.best_params) and t.value == last.best_value for t in completed(study))
    assert len(pd.read_csv(tmp_path / "worker1" / "trials.csv")) >= len(before) + 2


def test_failed_trials_are_recorded_within_the_failure_budget(tmp_path, job_args):
    # freeze_top_n=3 freezes every layer of the 3-layer model: that trial fails with a BudgetError.
    cli(tmp_path, *study_args(tmp_path, "optuna_distribution", "tolerant"), *job_args,
        "allocator.freeze_top_n=choice(0,3)", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=4",
        "hydra.callbacks.study.max_failure_rate=0.5", f"hydra.sweep.dir={tmp_path}/tolerant")
    states = [t.state.name for t in load_study(tmp_path, "tolerant").trials]
    assert "FAIL" in states and "COMPLETE" in states and len(states) == 4
    failed_runs = [json.loads(p.read_text()) for p in (tmp_path / "tolerant").glob("*/metrics.json")]
    failed_runs = [m for m in failed_runs if m["status"] == "failed"]
    assert len(failed_runs) == states.count("FAIL") and all("freezes all" in m["error"] for m in failed_runs)
    best = OmegaConf.load(tmp_path / "tolerant" / "optimization_results.yaml").best_params
    assert best["allocator.freeze_top_n"] == 0

    out = cli(tmp_path, *study_args(tmp_path, "optuna_distribution", "strict"), *job_args,
              "allocator.freeze_top_n=3", "hydra.sweeper.n_trials=3", "hydra.callbacks.study.max_failure_rate=0",
              f"hydra.sweep.dir={tmp_path}/strict", expect_rc=2)
    assert "prune_lab: error: 1 of 1 trials failed, over the budget of 0" in out.stderr
    assert [t.state.name for t in load_study(tmp_path, "strict").trials] == ["FAIL"]


def test_pareto_study_writes_its_front(tmp_path, job_args):
    cli(tmp_path, *study_args(tmp_path, "optuna_pareto"), *job_args, "hydra.sweeper.n_trials=5",
        "hydra.sweeper.sampler.population_size=4", f"hydra.sweep.dir={tmp_path}/pareto")
    study = load_study(tmp_path)
    front = pd.read_csv(tmp_path / "pareto" / "pareto_front.csv")
    values = [tuple(t.values) for t in completed(study)]
    assert len(values) == 5 and set(front.columns) >= {"trial", "ppl", "params_remaining", "allocator.ratio"}
    for ppl, params in zip(front.ppl, front.params_remaining):   # nothing dominates a front member
        assert not any(p <= ppl and n <= params and (p, n) != (ppl, params) for p, n in values)
    dominated = [v for v in values if v not in set(zip(front.ppl, front.params_remaining))]
    assert all(any(p <= a and n <= b for p, n in zip(front.ppl, front.params_remaining)) for a, b in dominated)
    solutions = OmegaConf.load(tmp_path / "pareto" / "optimization_results.yaml").solutions
    assert sorted(tuple(s["values"]) for s in solutions) == sorted(zip(front.ppl, front.params_remaining))
    runs = [json.loads(p.read_text()) for p in (tmp_path / "pareto").glob("*/metrics.json")]
    assert sorted(float(m["model"]["pruned"]["params_total"]) for m in runs) == sorted(n for _, n in values)
