"""Run dirs that never lie: one dir per job, SIGTERM recorded, dead runs shown dead, atomic artefacts,
a full disk one line naming what did not fit, and what a kill -9 left removed once its process is gone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, compose_job, start_cli, tiny_overrides, write_small_corpus
from prune_lab.artifacts import record as record_module
from prune_lab.artifacts.record import RunRecord, as_disk_full
from prune_lab.atomic import atomic_dir, atomic_path, disk_full, temp_sibling
from prune_lab.errors import DiskFull, PruneLabError
from prune_lab.recipes import run
from prune_lab.report import gather
from prune_lab.artifacts.rundir import RunLock, this_process

FROZEN_CLOCK = '''
import datetime
import hydra._internal.hydra as _hydra
from omegaconf import OmegaConf
_setup = _hydra.setup_globals
def _frozen_setup():          # Hydra's ${now:...} reads a clock stopped at 2031-01-02 03:04:05
    _setup()
    OmegaConf.register_new_resolver("now", datetime.datetime(2031, 1, 2, 3, 4, 5).strftime,
                                    use_cache=True, replace=True)
_hydra.setup_globals = _frozen_setup
'''


def launch(cwd: Path, *overrides: str, frozen: bool = False) -> subprocess.Popen:
    """`python -m prune_lab` in cwd (run dirs land under cwd/outputs), optionally with a frozen clock."""
    paths = [str(REPO)]
    if frozen:
        (cwd / "clock").mkdir(exist_ok=True)
        (cwd / "clock" / "sitecustomize.py").write_text(FROZEN_CLOCK)
        paths.insert(0, str(cwd / "clock"))
    return start_cli(*overrides, cwd=cwd, env=cli_env(PYTHONPATH=os.pathsep.join(paths)))


def small_job(tmp_path) -> list[str]:
    corpus = write_small_corpus(tmp_path)
    return [*tiny_overrides("llama", tmp_path), "data=text", f"data.train={corpus}/train.txt",
            f"data.test={corpus}/test.txt", "output.plots=false"]


def test_two_jobs_started_in_the_same_second_get_their_own_run_dirs(tmp_path):
    procs = [launch(tmp_path, *small_job(tmp_path), f"seed={seed}", frozen=True) for seed in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    dirs = sorted((tmp_path / "outputs" / "2031-01-02").iterdir())
    assert [d.name for d in dirs] == ["03-04-05", "03-04-05_1"]
    seeds = set()
    for d in dirs:                       # each dir holds one job's overrides and that job's results
        overrides = (d / ".hydra" / "overrides.yaml").read_text()
        seed = int(overrides.split("seed=")[1].split()[0].strip("'\""))
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["process"]["pid"] in {p.pid for p in procs}
        seeds.add(seed)
    assert seeds == {1, 2}


def test_a_run_dir_owned_by_a_live_job_is_refused(tmp_path):
    owned = tmp_path / "owned"
    owned.mkdir()
    lock = RunLock(owned)
    lock.acquire(this_process())
    try:
        with pytest.raises(PruneLabError, match="belongs to a live job"):
            run(compose_job(*tiny_overrides("llama", tmp_path)), owned)
        proc = launch(tmp_path, *tiny_overrides("llama", tmp_path), f"hydra.run.dir={owned}")
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2
        assert [line for line in err.splitlines() if line.startswith("prune_lab:")] == [
            f"prune_lab: error: run dir {owned} belongs to a live job (pid {os.getpid()} on "
            f"{this_process()['host']}, started {lock_started(owned)}): give this job another hydra.run.dir"]
        assert sorted(p.name for p in owned.iterdir()) == [".lock"]     # Hydra wrote nothing there
    finally:
        lock.release()


def lock_started(run_dir: Path) -> str:
    return (run_dir / ".lock").read_text().strip().split("started ")[1]


def wait_for_stage(run_dir: Path, stage: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if json.loads((run_dir / "metrics.json").read_text()).get("stage") == stage:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} never reached stage {stage}")


def test_sigterm_is_recorded_and_a_killed_run_reads_as_dead(tmp_path):
    corpus = write_small_corpus(tmp_path)
    (corpus / "long.txt").write_text((corpus / "test.txt").read_text() * 40)    # a long evaluation
    job = [*tiny_overrides("llama", tmp_path), "data=text", f"data.train={corpus}/train.txt",
           f"data.test={corpus}/long.txt", "eval.ppl.max_windows=null", "eval.ppl.batch_size=1",
           "output.plots=false"]
    procs = {name: launch(tmp_path, *job, f"hydra.run.dir={tmp_path}/{name}") for name in ("term", "kill")}
    for name, proc in procs.items():
        wait_for_stage(tmp_path / name, "evaluate", proc)
    live = gather([tmp_path]).set_index("run")["status"].to_dict()
    assert live == {"term": "running", "kill": "running"}

    procs["term"].send_signal(signal.SIGTERM)
    procs["kill"].send_signal(signal.SIGKILL)
    _, err = procs["term"].communicate(timeout=60)
    procs["kill"].wait(timeout=60)
    assert procs["term"].returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "prune_lab: interrupted by SIGTERM" in err
    term = json.loads((tmp_path / "term" / "metrics.json").read_text())
    assert (term["status"], term["signal"], term["stage"]) == ("interrupted", "SIGTERM", "evaluate")
    killed = json.loads((tmp_path / "kill" / "metrics.json").read_text())
    assert killed["status"] == "running" and killed["process"]["pid"] == procs["kill"].pid

    table = gather([tmp_path]).set_index("run")
    assert table.loc["term", "status"] == "interrupted"
    assert table.loc["kill", "status"] == "dead"
    assert f"process {procs['kill'].pid}" in table.loc["kill", "error"]


def test_a_full_disk_when_recording_the_end_still_marks_the_run_failed(tmp_path, monkeypatch):
    def disk_full(path, data):
        raise OSError(28, "No space left on device")
    cfg = compose_job(*tiny_overrides("llama", tmp_path), "allocator.ratio=1.5")
    original = record_module.write_json_atomic
    monkeypatch.setattr(record_module, "write_json_atomic",
                        lambda p, d: disk_full(p, d) if d["status"] != "running" else original(p, d))
    with pytest.raises(PruneLabError):
        run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "ratio" in metrics["error"]
    assert "No space left" in metrics["record_error"]
    assert not (tmp_path / "run" / ".lock").exists()


def half_then_full(*args, **kwargs):
    """A writer that gets half way, then the disk is full."""
    target = args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("path_or_buf")
    if hasattr(target, "write"):
        target.write("half")
    else:
        Path(target).write_bytes(b"half")
    raise OSError(28, "No space left on device")


def visible_and_temp(run_dir: Path) -> tuple[set, list]:
    names = {p.name for p in run_dir.iterdir()}
    return names, [n for n in names if ".tmp-" in n or n.endswith(".tmp")]


def test_no_half_written_model_dir_after_a_full_disk(tmp_path, monkeypatch):
    from prune_lab.artifacts import checkpoint
    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    cfg = compose_job(*small_job(tmp_path), "output.save_model=true")
    with pytest.raises(DiskFull, match=f"^no space left on {tmp_path / 'run' / 'model'}$"):
        run(cfg, tmp_path / "run")
    names, temps = visible_and_temp(tmp_path / "run")
    assert "model" not in names and temps == []
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_no_half_written_tables_or_plots_after_a_full_disk(tmp_path, monkeypatch):
    import pandas as pd
    from matplotlib.figure import Figure

    from prune_lab.core.plan import PruningPlan
    from prune_lab.artifacts.plots import save
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, *a, **k: half_then_full(self, *a, **k))
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: half_then_full(self, *a, **k))
    with pytest.raises(OSError):
        PruningPlan({0: [1]}, {}, [], 10).save(tmp_path / "plan.csv")
    with pytest.raises(OSError):
        save(Figure(), tmp_path / "kept_units.png")
    with pytest.raises(OSError), atomic_path(tmp_path / "unit_table.csv") as tmp:
        pd.DataFrame({"a": [1]}).to_csv(tmp)
    assert list(tmp_path.iterdir()) == []


def test_a_claimed_sweep_dir_travels_with_the_pickled_config(tmp_path, monkeypatch):
    """Launchers that pickle the config to worker processes (submitit, joblib) must not claim anew."""
    import pickle

    from omegaconf import OmegaConf

    from prune_lab.artifacts import rundir
    rundir.register_resolvers()
    monkeypatch.setattr(rundir, "_CLAIMED", {})
    cfg = OmegaConf.create({"dir": f"${{unique_dir:{tmp_path}/sweep}}"})
    (tmp_path / "sweep").mkdir()                     # taken by an earlier job in the same second
    assert cfg.dir == f"{tmp_path}/sweep_1"
    monkeypatch.setattr(rundir, "_CLAIMED", {})     # a worker process: nothing claimed there
    assert pickle.loads(pickle.dumps(cfg)).dir == f"{tmp_path}/sweep_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep", "sweep_1"]


def test_a_full_disk_is_recognised_however_the_library_words_it(tmp_path):
    assert disk_full(OSError(28, "No space left on device"))
    assert disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(122, "Disk quota exceeded")
        except OSError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(13, "Permission denied")) and not disk_full(KeyboardInterrupt())
    with pytest.raises(OSError) as err, atomic_path(tmp_path / "plan.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("I/O error: No space left on device (os error 28)")
    assert (err.value.errno, err.value.filename) == (28, str(tmp_path / "plan.csv"))
    with pytest.raises(OSError) as err, atomic_dir(tmp_path / "model") as tmp, atomic_path(tmp / "config.json"):
        raise OSError(28, "No space left on device")
    assert err.value.filename == str(tmp_path / "model")          # the outermost artefact is named
    assert list(tmp_path.iterdir()) == []
    assert str(as_disk_full(err.value, tmp_path)) == f"no space left on {tmp_path / 'model'}"
    assert isinstance(as_disk_full(err.value, tmp_path), PruneLabError)


def test_a_full_disk_at_the_last_write_fails_the_run_instead_of_calling_it_ok(tmp_path, monkeypatch):
    from prune_lab.artifacts import record as record_module
    record = RunRecord(tmp_path / "run")
    original = record_module.write_json_atomic

    def full(path, data):
        if data["status"] == "ok":
            raise OSError(28, "No space left on device", str(path))
        original(path, data)
    monkeypatch.setattr(record_module, "write_json_atomic", full)
    with pytest.raises(DiskFull, match="no space left on .*metrics.json"):
        record.finish("ok")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "no space left" in metrics["error"]
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_job_does_not_start_on_a_full_disk(tmp_path, monkeypatch):
    from prune_lab.artifacts import rundir
    from omegaconf import OmegaConf
    monkeypatch.setattr(rundir, "free_bytes", lambda path: 4096)
    with pytest.raises(SystemExit) as err:
        rundir.RunDirGuard().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "run")}}}))
    assert err.value.code == 2 and not (tmp_path / "run").exists()


def test_dirs_claimed_for_defaults_hydra_then_overrode_are_removed_when_empty(tmp_path):
    from prune_lab.artifacts import rundir
    used, unused = (rundir.unique_dir(str(tmp_path / "multirun" / d / "03-04-05")) for d in ("day1", "day2"))
    (Path(used) / "metrics.json").write_text("{}")
    rundir.remove_unused_dirs()
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir()) == ["day1"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(run_dir: Path) -> tuple[Path, Path]:
    """A dead writer's half-written model dir and a live one's plan.csv temporary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dead = run_dir / f".tmp-{dead_pid()}-0123abcd-model"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"\0" * 1000)
    live = temp_sibling(run_dir / "plan.csv")
    live.write_text("being written")
    return dead, live


def test_a_later_job_into_the_same_dir_removes_what_a_killed_job_left(tmp_path):
    dead, live = leftovers(tmp_path / "run")
    record = RunRecord(tmp_path / "run")
    record.finish("ok")
    assert not dead.exists() and live.exists()


def test_report_clean_removes_stale_temporaries_but_not_those_of_live_jobs(tmp_path, capsys):
    from prune_lab import report
    RunRecord(tmp_path / "sweep" / "0").finish("ok")     # a run dir, and what a kill -9 left there
    dead, live = leftovers(tmp_path / "sweep" / "0")
    RunRecord(tmp_path / "sweep" / "1").finish("ok")
    held = RunRecord(tmp_path / "sweep" / "2")           # a live job: its dir is left alone
    held_dead, _ = leftovers(tmp_path / "sweep" / "2")
    report.main([str(tmp_path / "sweep"), "--clean"])
    held.finish("ok")
    assert not dead.exists() and live.exists() and held_dead.exists()
    assert f"removed {dead}" in capsys.readouterr().err
