"""Optuna study storages and the driver's bookkeeping: storage URLs (sqlite, PostgreSQL/MySQL, journal
file), which worker runs a trial and whether it is alive, the sampler seed of an invocation, and the
check that a study serves one job. Used by prune_lab/study/sweeper.py.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import PruneLabError

# ---- storages ----------------------------------------------------------------------------
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


def normalise_url(url: str) -> str:
    """sqlite:///rel.db and journal:///rel.log made absolute against the current directory. The study
    driver resolves a relative URL once, where the study was started, and hands every trial that
    absolute URL (study/location.py), so a trial, whatever its cwd, and a resume from another
    directory, find the same study."""
    for scheme in ("sqlite", "journal"):
        prefix = f"{scheme}:///"
        if url.startswith(prefix):
            path = Path(url[len(prefix):]).expanduser()
            return prefix + str(path if path.is_absolute() else Path.cwd() / path)
    return url


def open_storage(url: str, heartbeat_interval: int | None = None):
    """An Optuna storage from a URL: sqlite:///…, postgresql://…, mysql://… (RDB) or journal:///path.log.

    A bad or unreachable URL raises PruneLabError with one line naming the URL and the cause.
    """
    import optuna
    url = normalise_url(url)
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    try:
        if scheme == "journal":
            from optuna.storages.journal import JournalFileBackend
            path = Path(url[len("journal:///"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if scheme not in RDB_SCHEMES:
            raise PruneLabError(f"unknown study storage {url!r}: use sqlite:///path.db, "
                                f"postgresql://user@host/db, mysql://… or journal:///path.log")
        engine: dict[str, Any] = {"pool_pre_ping": True}
        if scheme == "sqlite":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            engine["connect_args"] = {"timeout": 60}      # parallel workers wait for the file lock
        else:
            engine["connect_args"] = {"connect_timeout": 10}
        hb = dict(heartbeat_interval=heartbeat_interval, grace_period=3 * heartbeat_interval) \
            if heartbeat_interval else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, **hb)
    except PruneLabError:
        raise
    except ModuleNotFoundError as e:
        raise PruneLabError(f"study storage {redact(url)} needs the {e.name} module: "
                            f"pip install 'prune_lab[postgres]' (psycopg2) or the driver of your database")
    except Exception as e:   # sqlalchemy errors, OSError on the journal file, bad URL syntax
        cause = " ".join(str(e).split())
        cause = cause.split(" (Background on this error")[0][:300]
        raise PruneLabError(f"cannot open study storage {redact(url)}: {type(e).__name__}: {cause}")


def storage_file(url: str | None) -> str | None:
    """The file of a sqlite:///… or journal:///… URL, else None (a database server)."""
    for prefix in ("sqlite:///", "journal:///"):
        if url and url.startswith(prefix):
            return url[len(prefix):]
    return None


def storage_place(url: str | None) -> str:
    """Where a study is stored, for messages: its file, else the URL without its password."""
    return storage_file(url) or redact(str(url))


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("://")
    if "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}{sep}{user}:***@{tail.split('@', 1)[1]}"
    return url


# ---- workers: who runs a trial, and whether it is still alive ---------------------------------
def _proc_start(pid: int) -> str | None:
    try:   # field 22 of /proc/<pid>/stat: start time in clock ticks since boot (tells a reused pid apart)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def worker_id(pid: int | None = None) -> str:
    """host/boot/pid/start of a process: stored on each trial it runs."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{_proc_start(pid) or '-'}"


def worker_alive(worker: str) -> bool | None:
    """True/False for a worker of this machine; None where this process cannot tell (another host)."""
    try:
        host, boot, pid, start = worker.rsplit("/", 3)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    if boot != _boot_id():
        return False            # the machine rebooted since
    if start != "-":
        return _proc_start(int(pid)) == start
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def fail_stale_trials(study) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL: dead local processes at once, other hosts'
    trials once their heartbeat (RDB storages) is older than the grace period. Returns their numbers."""
    import optuna
    from optuna.trial import TrialState
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(t.user_attrs.get("worker", "")) is False:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "failed_because", "worker died")
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                stale.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass          # another worker got there first
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    optuna.storages.fail_stale_trials(study)     # heartbeat-based; a no-op without heartbeats
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(set(stale) | (after - before))


def derived_seed(seed: int | None, n_trials: int) -> int | None:
    """The sampler seed of one invocation: from the configured seed and the trials already in the
    study, so rerunning the same command resumes with new points instead of replaying the first run."""
    if seed is None:
        return None
    import numpy as np
    return int(np.random.SeedSequence([int(seed), int(n_trials)]).generate_state(1)[0])


# ---- one study, one job ------------------------------------------------------------------------
IGNORED = ("hydra", "cache", "output", "search")   # neither decides a trial's result nor names the job
IGNORED_KEYS = ("eval.ppl.prefix_windows",)        # extra metrics only (and absent from studies made before it)


def job_settings(config, searched) -> dict[str, str]:
    """The sweep's job settings as flat dotted keys, less the searched ones and those in IGNORED."""
    from omegaconf import OmegaConf
    job = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k not in IGNORED}
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True, default=str)
    walk(job, "")
    return {k: v for k, v in flat.items()
            if not any(k == s or k.startswith(s + ".") for s in (*searched, *IGNORED_KEYS))}


NEUTRAL = ("null", "false", "0", "0.0", "[]", "{}", '""')
RETIRED = {"reconstruct.obs_chunk": "0"}   # retired setting -> its old default (now null; obs_block took over)
ADDED = {"quant.score": '"QuantScore.lab"'}   # added later with a non-neutral default: the same job at it


def check_same_job(study, settings: dict[str, str]) -> None:
    """A study serves one job: a resumed or parallel invocation whose settings differ is refused."""
    have = study.user_attrs.get("job_settings")
    if have is None:
        study.set_user_attr("job_settings", settings)
        return
    # a setting added to prune_lab after the study was made is the same job while it keeps a neutral
    # value (null, false, 0, empty): the study's jobs ran without that option
    added = {k for k in set(settings) - set(have) if settings[k] in NEUTRAL}
    added |= {k for k, v in ADDED.items() if k not in have and settings.get(k) == v}
    added |= {k for k, old in RETIRED.items() if have.get(k) == old and settings.get(k, "null") == "null"}
    differ = sorted(k for k in (set(have) | set(settings)) - added if have.get(k) != settings.get(k))
    if differ:
        shown = ", ".join(f"{k} ({have.get(k, '-')} -> {settings.get(k, '-')})" for k in differ[:4])
        raise PruneLabError(f"study '{study.study_name}' was made by a job with other settings: {shown}"
                            f"{' …' if len(differ) > 4 else ''}; resume it with its settings or name a new "
                            f"study with hydra.sweeper.study_name=…")
