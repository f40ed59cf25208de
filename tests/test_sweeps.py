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

from conftest import CONF, cli_env, run_cli, start_cli, tiny_overrides, write_small_corpus
from prune_lab.errors import PruneLabError
from prune_lab.study.job import Outcome
from prune_lab.study.storage import (check_same_job, derived_seed, job_settings, normalise_url, open_storage, redact,
                                     worker_alive, worker_id)
from prune_lab.study.sweeper import unpack
from prune_lab.study.objective import attn_mlp, register_resolvers

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


def job_env(tmp_path) -> dict:
    """The score cache and the default study dir under tmp_path."""
    return cli_env(tmp_path / "cache", tmp_path / "studies")


def cli(tmp_path, *args, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """A job in tmp_path with its score cache and study dir there."""
    out = run_cli(*args, cwd=tmp_path, env=job_env(tmp_path), timeout=300)
    assert out.returncode == expect_rc, out.stderr[-3000:]
    return out


def study_args(tmp_path, preset: str, name: str = "t") -> list[str]:
    return ["-m", f"hparams_search={preset}", f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db",
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


def test_optuna_presets_compose(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNE_LAB_STUDIES", str(tmp_path / "studies"))
    dist = compose_with_hydra("hparams_search=optuna_distribution")
    assert dist.allocator.distribution == "3:7" and dist.objective.name == "ppl"
    assert dist.hydra.sweeper.params["search.attn_share"] == "interval(0.0, 10.0)"
    assert dist.hydra.sweeper._target_ == "prune_lab.study.plugin.PruneLabOptunaSweeper"
    # the study's storage does not depend on the current directory
    assert dist.hydra.sweeper.storage == f"sqlite:///{tmp_path}/studies/distribution_r0.25.db"
    assert dist.hydra.sweeper.n_jobs == 1 and dist.output.plots is False
    assert dist.hydra.sweeper.constraints and dist.hydra.sweeper.reuse_plans
    monkeypatch.delenv("PRUNE_LAB_STUDIES")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compose_with_hydra("hparams_search=optuna_distribution").hydra.sweeper.storage == \
        f"sqlite:///{tmp_path}/.local/share/prune_lab/studies/distribution_r0.25.db"
    joint = compose_with_hydra("hparams_search=optuna_joint", "search.attn_share=2")
    assert joint.allocator.distribution == "2:8"
    assert set(joint.hydra.sweeper.params) == {"search.attn_share", "allocator.alpha", "allocator.strategy",
                                               "allocator.freeze_top_n", "importance"}
    pareto = compose_with_hydra("hparams_search=optuna_pareto")
    assert pareto.objective.name == "ppl_params" and len(pareto.hydra.sweeper.direction) == 2
    assert isinstance(instantiate(pareto.hydra.sweeper.sampler), optuna.samplers.NSGAIISampler)


def test_a_study_refuses_mismatched_directions_and_unreachable_storage_in_one_line(tmp_path, job_args):
    out = cli(tmp_path, *study_args(tmp_path, "optuna_distribution"), *job_args, "objective=ppl_params",
              expect_rc=2)
    assert out.stderr.strip().splitlines()[-1] == \
        "prune_lab: error: objective=ppl_params returns 2 value(s) but hydra.sweeper.direction has 1"
    assert not (tmp_path / "study.db").exists()
    # nothing listens on port 9 of localhost: refused at once, one line, exit 2
    out = cli(tmp_path, "-m", "hparams_search=optuna_distribution", *job_args,
              "hydra.sweeper.storage=postgresql://prune:secret@127.0.0.1:9/studies", expect_rc=2)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("prune_lab: error: cannot open study storage postgresql://prune:***@127.0.0.1:9/studies")
    assert "secret" not in out.stderr and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if "error" in line.lower()] == [last]


@pytest.mark.parametrize("url", ["sqlite:////proc/prune_lab/study.db", "journal:////proc/prune_lab/study.log",
                                 "postgresql://prune@no-such-host.invalid/studies"])
def test_unreachable_storage_urls_are_one_line(url):
    with pytest.raises(PruneLabError, match=r"^cannot open study storage ") as err:
        open_storage(url)
    assert "\n" not in str(err.value)


def test_study_bookkeeping():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert worker_alive(worker_id()) is True and worker_alive(worker_id(child.pid)) is False
    assert worker_alive("elsewhere/b00t/1/2") is None                 # another host: ask the heartbeat
    assert derived_seed(None, 5) is None
    assert len({derived_seed(0, n) for n in range(50)} | {derived_seed(1, 0)}) == 51
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert normalise_url("sqlite:///rel/s.db") == f"sqlite:///{os.getcwd()}/rel/s.db"
    with pytest.raises(PruneLabError, match="unknown study storage 'redis://127.0.0.1/0'"):
        open_storage("redis://127.0.0.1/0")
    study = optuna.create_study()
    check_same_job(study, {"model.path": '"/a"', "allocator.ratio": "0.25"})
    check_same_job(study, {"model.path": '"/a"', "allocator.ratio": "0.25"})
    with pytest.raises(PruneLabError, match=r"allocator.ratio \(0.25 -> 0.3\)"):
        check_same_job(study, {"model.path": '"/a"', "allocator.ratio": "0.3"})
    out = Outcome.infeasible(2, None, "budget")
    assert out.values == (float("inf"),) * 2 and out.violation == 1.0 and list(out) == list(out.values)
    assert float(Outcome((3.0,))) == 3.0 and unpack(2.5, 1).values == (2.5,) and unpack((1, 2), 2).values == (1, 2)
    with pytest.raises(ValueError, match="returned 1 value"):
        unpack(2.5, 2)


def test_extra_metrics_do_not_make_another_study_job():
    """eval.ppl.prefix_windows only adds metrics: a study made without it resumes with it."""
    with initialize_config_dir(config_dir=str(CONF)):
        plain = compose(config_name="config")
        more = compose(config_name="config", overrides=["eval.ppl.prefix_windows=[64]"])
    assert job_settings(plain, []) == job_settings(more, [])
    assert "eval.ppl.max_windows" in job_settings(plain, [])


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
def wait_for_completed(tmp_path, n: int, worker: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and worker.poll() is None:
        time.sleep(0.5)
        try:
            if len(completed(load_study(tmp_path))) >= n:
                return
        except KeyError:                         # study not created yet
            pass


def test_optuna_study_resumes_after_a_kill_and_takes_parallel_workers(tmp_path, job_args):
    base = [*study_args(tmp_path, "optuna_distribution"), *job_args]
    worker = start_cli(*base, "hydra.sweeper.n_trials=50", f"hydra.sweep.dir={tmp_path}/killed",
                       cwd=tmp_path, env=job_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)
    wait_for_completed(tmp_path, 2, worker)
    time.sleep(0.3)                                # into the next trial
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    killed = load_study(tmp_path)
    before = {t.number: t.value for t in completed(killed)}
    running = [t.number for t in killed.trials if t.state == optuna.trial.TrialState.RUNNING]
    finished_runs = [p for p in (tmp_path / "killed").glob("*/metrics.json")
                     if json.loads(p.read_text())["status"] == "ok"]
    assert len(before) >= 2 and len(before) >= len(finished_runs) - 1   # at most the in-flight one is lost
    assert len(running) <= 1

    # Resume with two parallel workers on the same storage, each with its own sampler seed.
    workers = [start_cli(*base, "hydra.sweeper.n_trials=2", f"hydra.sweeper.sampler.seed={s}",
                         f"hydra.sweep.dir={tmp_path}/worker{s}", cwd=tmp_path, env=job_env(tmp_path),
                         stdout=subprocess.DEVNULL) for s in (1, 2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    study = load_study(tmp_path)
    after = {t.number: t.value for t in completed(study)}
    assert len(after) == len(before) + 4 and all(after[n] == v for n, v in before.items())
    # the killed worker's trial is not left RUNNING forever: the resumed study failed it
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for n in running:
        assert study.trials[n].state == optuna.trial.TrialState.FAIL
        assert study.trials[n].user_attrs["failed_because"] == "worker died"
    results = [OmegaConf.load(tmp_path / f"worker{s}" / "optimization_results.yaml") for s in (1, 2)]
    assert all(set(r.best_params) == {"search.attn_share"} and r.best_value in after.values() for r in results)
    last = min(results, key=lambda r: r.best_value)       # the worker that finished last saw every trial
    assert last.best_value == min(after.values()) == study.best_value
    assert len(pd.read_csv(tmp_path / "worker1" / "trials.csv")) >= len(before) + 2


def test_rerunning_the_same_command_from_another_directory_resumes_with_new_points(tmp_path, job_args):
    """Same command, same sampler seed, other cwd: one study (storage from PRUNE_LAB_STUDIES, not the
    cwd), and the second invocation proposes new points instead of replaying the first ones."""
    args = ["-m", "hparams_search=optuna_distribution", "hydra.sweeper.study_name=again", *job_args,
            "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=2"]
    for cwd in ("a", "b"):
        (tmp_path / cwd).mkdir()
        out = run_cli(*args, cwd=tmp_path / cwd, env=job_env(tmp_path), timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="again", storage=f"sqlite:///{tmp_path}/studies/again.db")
    shares = [t.params["search.attn_share"] for t in study.trials]
    assert len(completed(study)) == 4 and len(set(shares)) == 4, shares
    assert len({t.user_attrs["sampler_seed"] for t in study.trials}) == 2
    assert not list(tmp_path.glob("*/multirun/studies/*.db"))


def test_infeasible_points_are_constraint_violations_and_crashes_count_against_the_budget(tmp_path, job_args):
    # freeze_top_n=3 freezes every layer of the 3-layer model: the allocation cannot meet the budget.
    cli(tmp_path, *study_args(tmp_path, "optuna_distribution", "feasible"), *job_args,
        "allocator.freeze_top_n=choice(0,3)", "search.attn_share=2", "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.max_failure_rate=0", f"hydra.sweep.dir={tmp_path}/feasible")
    trials = load_study(tmp_path, "feasible").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]      # no failed trial, no abort
    by_freeze = {t.params["allocator.freeze_top_n"]: t for t in trials}
    assert by_freeze[3].value == float("inf") and by_freeze[3].user_attrs["constraint"] == 1.0
    assert "freezes all 3 prunable layers" in by_freeze[3].user_attrs["infeasible"]
    assert by_freeze[0].user_attrs["constraint"] == 0.0 and by_freeze[0].value < float("inf")
    assert load_study(tmp_path, "feasible").best_trial.number == by_freeze[0].number
    best = OmegaConf.load(tmp_path / "feasible" / "optimization_results.yaml").best_params
    assert best["allocator.freeze_top_n"] == 0

    # without constraints the same point is a failed trial, and the budget applies
    out = cli(tmp_path, *study_args(tmp_path, "optuna_distribution", "strict"), *job_args,
              "allocator.freeze_top_n=3", "hydra.sweeper.n_trials=3", "hydra.sweeper.max_failure_rate=0",
              "hydra.sweeper.constraints=false", f"hydra.sweep.dir={tmp_path}/strict", expect_rc=2)
    assert "prune_lab: error: 1 of 1 trials failed, over the budget of 0" in out.stderr
    failed = load_study(tmp_path, "strict").trials
    assert [t.state.name for t in failed] == ["FAIL"] and "freezes all" in failed[0].user_attrs["error"]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "strict").glob("*/metrics.json")]
    assert [m["status"] for m in runs] == ["failed"] and "freezes all" in runs[0]["error"]


def test_a_plan_the_study_already_evaluated_is_reused_not_rerun(tmp_path, job_args):
    # 2.0001 and 2.0004 both give the split "2:8" (so the same plan); 6 gives another plan
    cli(tmp_path, *study_args(tmp_path, "optuna_distribution"), *job_args,
        "search.attn_share=choice(2.0001,2.0004,6.0)", "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}/memo")
    study = load_study(tmp_path)
    runs = {}
    for p in (tmp_path / "memo").glob("*/metrics.json"):
        cfg = OmegaConf.load(p.parent / ".hydra" / "config.yaml")
        runs[cfg.search.attn_share] = (json.loads(p.read_text()), (p.parent / "plan.csv").read_text())
    assert runs[2.0001][1] == runs[2.0004][1] != runs[6.0][1]
    first, second = sorted((2.0001, 2.0004), key=lambda x: "reused_plan" in runs[x][0])
    reused = runs[second][0]
    assert "reused_plan" not in runs[first][0] and "evaluate" in runs[first][0]["timings_s"]
    assert "evaluate" not in reused["timings_s"] and "prune" not in reused["timings_s"]
    assert reused["status"] == "ok" and reused["pruned"] == runs[first][0]["pruned"]
    by_share = {t.params["search.attn_share"]: t for t in study.trials}
    assert reused["reused_plan"]["trial"] == by_share[first].number
    assert by_share[second].value == by_share[first].value
    assert by_share[second].user_attrs["reused_from_trial"] == by_share[first].number
    assert "reused_plan" not in runs[6.0][0]


@pytest.mark.parametrize("n_trials", [3, 8])
def test_pareto_study_writes_its_front_with_few_trials_and_many_infeasible_points(tmp_path, job_args, n_trials):
    # max_rate 0.2 makes most sampled ratios (0.05..0.5) infeasible: they must not abort the study
    cli(tmp_path, *study_args(tmp_path, "optuna_pareto"), *job_args, f"hydra.sweeper.n_trials={n_trials}",
        "allocator.max_rate=0.2", f"hydra.sweep.dir={tmp_path}/pareto")
    study = load_study(tmp_path)
    assert len(completed(study)) == n_trials
    feasible = [tuple(t.values) for t in completed(study) if t.user_attrs["constraint"] <= 0]
    infeasible = [t for t in completed(study) if t.user_attrs["constraint"] > 0]
    assert feasible and infeasible and all(t.values == [float("inf")] * 2 for t in infeasible)
    front = pd.read_csv(tmp_path / "pareto" / "pareto_front.csv")
    assert set(front.columns) >= {"trial", "ppl", "params_remaining", "allocator.ratio"}
    assert not set(front.trial) & {t.number for t in infeasible}
    for ppl, params in zip(front.ppl, front.params_remaining):   # nothing dominates a front member
        assert not any(p <= ppl and n <= params and (p, n) != (ppl, params) for p, n in feasible)
    dominated = [v for v in feasible if v not in set(zip(front.ppl, front.params_remaining))]
    assert all(any(p <= a and n <= b for p, n in zip(front.ppl, front.params_remaining)) for a, b in dominated)
    solutions = OmegaConf.load(tmp_path / "pareto" / "optimization_results.yaml").solutions
    assert sorted(tuple(s["values"]) for s in solutions) == sorted(zip(front.ppl, front.params_remaining))
    runs = [json.loads(p.read_text()) for p in (tmp_path / "pareto").glob("*/metrics.json")]
    ok = [m for m in runs if m["status"] == "ok"]
    assert sorted(float(m["model"]["pruned"]["params_total"]) for m in ok) == sorted(n for _, n in feasible)


def test_a_setting_added_after_the_study_was_made_resumes_only_at_its_neutral_value():
    study = optuna.create_study()
    check_same_job(study, {"allocator.ratio": "0.25"})
    check_same_job(study, {"allocator.ratio": "0.25", "eval.ppl.prefix_windows": "[]"})     # a newer key, unset
    with pytest.raises(PruneLabError, match="eval.ppl.prefix_windows"):
        check_same_job(study, {"allocator.ratio": "0.25", "eval.ppl.prefix_windows": "[64]"})
    with pytest.raises(PruneLabError, match="allocator.ratio"):
        check_same_job(study, {"allocator.ratio": "0.5"})


def test_a_retired_setting_at_its_old_default_is_the_same_job():
    """reconstruct.obs_chunk (0 = auto) became reconstruct.obs_block: a study made with the old default
    resumes; one made with an explicit chunk does not."""
    study = optuna.create_study()
    check_same_job(study, {"reconstruct.obs_chunk": "0"})
    check_same_job(study, {"reconstruct.obs_chunk": "null", "reconstruct.obs_block": "0"})
    other = optuna.create_study()
    check_same_job(other, {"reconstruct.obs_chunk": "4"})
    with pytest.raises(PruneLabError, match="reconstruct.obs_chunk"):
        check_same_job(other, {"reconstruct.obs_chunk": "null", "reconstruct.obs_block": "0"})


def test_a_relative_study_url_is_one_study_from_any_directory_and_leaves_no_empty_dirs(tmp_path, job_args):
    args = ["-m", "hparams_search=optuna_distribution", "hydra.sweeper.storage=sqlite:///rel.db",
            "hydra.sweeper.study_name=rel", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=1", *job_args]
    for cwd in ("a", "b"):                 # started in a/, resumed from b/
        (tmp_path / cwd).mkdir()
        out = run_cli(*args, cwd=tmp_path / cwd, env=job_env(tmp_path), timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "b" / "rel.db").exists()
    study = optuna.load_study(study_name="rel", storage=f"sqlite:///{tmp_path}/a/rel.db")
    assert len(completed(study)) == 2
    assert study.user_attrs["storage"] == {"url": "sqlite:///rel.db", "resolved": f"sqlite:///{tmp_path}/a/rel.db",
                                           "started_from": str(tmp_path / "a")}
    trial_configs = list(tmp_path.glob("b/multirun/studies/rel/*/0/.hydra/hydra.yaml"))
    assert [OmegaConf.load(p).hydra.sweeper.storage for p in trial_configs] == [f"sqlite:///{tmp_path}/a/rel.db"]
    empty = [p for cwd in ("a", "b") for p in (tmp_path / cwd).rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert empty == []                     # no multirun/<date>/<time> of the default the preset overrode


def test_sigterm_to_a_study_fails_its_running_trial(tmp_path, job_args):
    (tmp_path / "long.txt").write_text((tmp_path / "test.txt").read_text() * 40)     # a long evaluation
    args = [*study_args(tmp_path, "optuna_distribution", "term"), *job_args, f"data.test={tmp_path}/long.txt",
            "eval.ppl.max_windows=null", "eval.ppl.batch_size=1", "hydra.sweeper.n_trials=3",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = start_cli(*args, cwd=tmp_path, env=job_env(tmp_path))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())["stage"] == "evaluate":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("prune_lab:")] == [
        f"prune_lab: interrupted by SIGTERM: {tmp_path}/sweep/0 marked interrupted"]
    trials = load_study(tmp_path, "term").trials
    assert [(t.state.name, t.user_attrs.get("failed_because")) for t in trials] == [("FAIL", "interrupted by SIGTERM")]
    assert json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())["status"] == "interrupted"
