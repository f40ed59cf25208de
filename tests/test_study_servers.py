"""Studies on real servers, on localhost only: optuna-dashboard over a journal-file study, and parallel
workers on a PostgreSQL server started from the system's packages (unix socket, no TCP)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from conftest import start_cli
from test_sweeps import cli, job_args, job_env  # noqa: F401  (job_args is a fixture)

COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


# ---- journal storage + optuna-dashboard ----------------------------------------------------------
def test_a_journal_file_study_is_listed_by_optuna_dashboard_over_http(tmp_path, job_args):  # noqa: F811
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard absent: pip install '.[dashboard]'")
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    if not dashboard.exists():
        pytest.skip(f"no optuna-dashboard command beside {sys.executable}")
    log = tmp_path / "shared-fs" / "study.log"
    cli(tmp_path, "-m", "hparams_search=optuna_distribution", "hydra.sweeper.study_name=dash",
        f"hydra.sweeper.storage=journal:///{log}", *job_args, "search.attn_share=choice(1,5)",
        "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/dash")
    study = optuna.load_study(study_name="dash", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(log))))
    assert [t.state for t in study.trials] == [COMPLETE, COMPLETE]

    port = free_port()   # the documented command: optuna-dashboard <journal file>
    server = subprocess.Popen([str(dashboard), str(log), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listed = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in listed] == ["dash"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{listed[0]['study_id']}")
        served = {t["number"]: t for t in detail["trials"]}
        assert set(served) == {t.number for t in study.trials}
        for t in study.trials:
            assert served[t.number]["state"] == "Complete"
            assert served[t.number]["values"] == [t.value]
            assert [p["name"] for p in served[t.number]["params"]] == ["search.attn_share"]
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- PostgreSQL ---------------------------------------------------------------------------------
def pid_of(trial) -> str:
    """The pid in a trial's worker attr (host/boot/pid/start); '' until the sweeper has set it."""
    return trial.user_attrs.get("worker", "///").split("/")[2]


def pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on a unix socket in a temp dir; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg2", reason="psycopg2 absent: pip install '.[postgres]'")
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql; .ci/run tries to)")
    root = Path(tempfile.mkdtemp(prefix="prune_lab_pg_"))   # not under pytest's root-only tmp dirs
    as_user: list[str] = []
    if os.geteuid() == 0:    # the server refuses to run as root: run it as the postgres user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a postgres user to start the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        root.chmod(0o700)
    data, port = root / "data", free_port()

    def pg(*cmd, timeout=120):
        return subprocess.run([*as_user, str(bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout)

    out = pg("initdb", "-D", str(data), "-U", "prune", "-A", "trust", "--no-sync")
    if out.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {out.stderr.strip()[-300:]}")
    opts = f"-c listen_addresses='' -k {root} -p {port} -c fsync=off -c max_connections=100"
    out = pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start")
    if out.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {out.stderr.strip()[-300:]}")
    try:
        import psycopg2
        con = psycopg2.connect(host=str(root), port=port, user="prune", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE studies")
        con.close()
        yield f"postgresql+psycopg2://prune@/studies?host={root}&port={port}"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_three_workers_share_a_postgres_study_and_a_killed_one_leaves_it_resumable(tmp_path, job_args,  # noqa: F811
                                                                                   postgres):
    base = ["-m", "hparams_search=optuna_distribution", "hydra.sweeper.study_name=pg",
            f"hydra.sweeper.storage='{postgres}'", *job_args, "hydra.sweeper.heartbeat_interval=2"]

    def worker(seed: int, n: int) -> subprocess.Popen:
        return start_cli(*base, f"hydra.sweeper.sampler.seed={seed}", f"hydra.sweeper.n_trials={n}",
                         f"hydra.sweep.dir={tmp_path}/w{seed}", cwd=tmp_path, env=job_env(tmp_path),
                         stdout=subprocess.DEVNULL, start_new_session=True)

    storage = optuna.storages.RDBStorage(postgres)    # one connection pool for all the polling below

    def load():
        return optuna.load_study(study_name="pg", storage=storage)

    workers = [worker(0, 3), worker(1, 3), worker(2, 50)]
    victim = workers[2]
    deadline, killed_in = time.time() + 240, None
    while time.time() < deadline and victim.poll() is None:   # kill worker 2 in the middle of a trial
        time.sleep(0.3)
        try:
            mine = [t for t in load().trials if pid_of(t) == str(victim.pid)]
        except KeyError:
            continue
        if sum(t.state == COMPLETE for t in mine) >= 1 and any(t.state == RUNNING for t in mine):
            os.killpg(victim.pid, signal.SIGKILL)
            killed_in = [t.number for t in mine if t.state == RUNNING]
            break
    victim.wait()
    assert killed_in, f"worker 2 never ran a second trial: {victim.stderr.read()[-3000:]}"
    for w in workers[:2]:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]

    study = load()
    assert [t.number for t in study.trials] == list(range(len(study.trials)))      # no gap, no duplicate
    done = [t for t in study.trials if t.state == COMPLETE]
    by_worker: dict[str, list] = {}
    for t in done:
        by_worker.setdefault(pid_of(t), []).append(t)
    assert sorted(len(v) for k, v in by_worker.items() if k != str(victim.pid)) == [3, 3]
    # every completed trial is one finished run dir with the same value, and every finished run is a trial
    runs = {}
    for p in tmp_path.glob("w*/*/metrics.json"):
        m = json.loads(p.read_text())
        if m["status"] == "ok":
            runs[str(p.parent.resolve())] = m
    assert sorted(t.user_attrs["run_dir"] for t in done) == sorted(runs)
    for t in done:
        assert runs[t.user_attrs["run_dir"]]["pruned"]["ppl/data"] == pytest.approx(t.value)
        cfg = OmegaConf.load(Path(t.user_attrs["run_dir"]) / ".hydra" / "config.yaml")
        assert cfg.search.attn_share == pytest.approx(t.params["search.attn_share"])
    assert [t.number for t in study.trials if t.state == RUNNING] == killed_in     # until someone resumes

    # resume: the same command again; the dead worker's trial is failed, new trials are added
    again = worker(2, 1)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    study = load()
    assert not [t for t in study.trials if t.state == RUNNING]
    assert [(t.state, t.user_attrs["failed_because"]) for t in study.trials if t.number in killed_in] == \
        [(FAIL, "worker died")] * len(killed_in)
    assert len([t for t in study.trials if t.state == COMPLETE]) == len(done) + 1
