"""Run dirs that belong to exactly one job, and that tell a dead job from a live one.

* `${unique_dir:<path>}` (the default hydra.run.dir and hydra.sweep.dir) claims the first free name
  among <path>, <path>_1, <path>_2, ... with an atomic mkdir: two jobs started in the same second
  get two dirs, also on a shared filesystem.
* A job holds an exclusive lock on <run dir>/.lock while it runs (RunLock); the kernel drops it when
  the process dies, kill -9 included. A second job refuses a dir whose lock is held (RunDirGuard,
  before Hydra writes into it), and readers (`prune_lab.report`) see a run whose metrics.json still
  says `running` but whose lock is free as `dead`.
* SIGTERM -- what Slurm, `timeout` and OOM watchdogs send -- is raised in the main thread as
  `Interrupted` (a KeyboardInterrupt), so the job ends as with Ctrl-C: status `interrupted`.
* What a kill -9 leaves (a hidden `.tmp-<pid>-…` artefact half written) is removed by the next job
  that takes the dir, and by `prune_lab.report --clean`, once its process is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..atomic import temp_owner
from ..errors import Interrupted, PruneLabError

LOCK = ".lock"
MIN_FREE = 1 << 20      # bytes a job needs to start: its configs, log and metrics.json
_CLAIMED: dict[str, str] = {}
_MADE: list[Path] = []  # dirs unique_dir created (claimed dirs and their new parents), innermost last


# ---- unique default dirs ----------------------------------------------------------------------
def unique_dir(base: str) -> str:
    """Claim base (or base_1, base_2, ...) with mkdir; the same base always gives the same dir
    within a process (Hydra resolves the sweep dir once per job). Hydra also resolves a default it
    then overrides (a study preset's sweep dir): what stays empty is removed when the process ends."""
    if base not in _CLAIMED:
        root, i = Path(base), 0
        if not _MADE:
            atexit.register(remove_unused_dirs)
        _MADE.extend(p for p in reversed(root.parents) if not p.exists())
        while base not in _CLAIMED:
            candidate = root if i == 0 else root.with_name(f"{root.name}_{i}")
            try:
                root.parent.mkdir(parents=True, exist_ok=True)    # again if another exit removed it
                candidate.mkdir()
                _MADE.append(candidate)
                _CLAIMED[base] = str(candidate)
            except FileExistsError:
                i += 1
            except FileNotFoundError:
                pass
    return _CLAIMED[base]


def remove_unused_dirs() -> None:
    """At exit: the dirs unique_dir made that nothing was written into (rmdir leaves any other)."""
    for path in reversed(_MADE):
        with contextlib.suppress(OSError):
            path.rmdir()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_resolver("unique_dir", unique_dir, use_cache=True)   # pickled with the config


# ---- ownership and liveness ---------------------------------------------------------------------
def this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started_at')}"


class RunLock:
    """An exclusive flock on <run dir>/.lock for the life of the job."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.file = None

    def acquire(self, owner: dict) -> None:
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise PruneLabError(f"run dir {self.path.parent} belongs to a live job ({holder}): "
                                f"give this job another hydra.run.dir") from None
        f.truncate(0)
        f.write(describe(owner) + "\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.file.close()
            self.file = None


def lock_held(run_dir: str | Path) -> bool | None:
    """True if a live process holds the run's lock, False if nobody does, None without a lock file."""
    path = Path(run_dir) / LOCK
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries (atomic.temp_sibling) in directory whose writing process is gone."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(directory).iterdir():
            pid = temp_owner(entry.name)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead(run_dir: str | Path, metrics: dict) -> bool:
    """metrics.json says running, but its process is gone (killed, OOM, power loss)."""
    if metrics.get("status") != "running":
        return False
    held = lock_held(run_dir)
    if held is not None:
        return not held
    owner = metrics.get("process") or {}          # no lock file: a run of an older version
    return bool(owner.get("pid")) and owner.get("host") == socket.gethostname() and \
        not pid_alive(int(owner["pid"]))


def dead_fields(run_dir: str | Path, metrics: dict) -> dict:
    """{status: dead, error: ...} for a dead run (re-read first: it may have ended meanwhile), else {}."""
    if not is_dead(run_dir, metrics):
        return {}
    if json.loads((Path(run_dir) / "metrics.json").read_text()).get("status") != "running":
        return {}
    owner = metrics.get("process") or {}
    return {"status": "dead",
            "error": f"process {owner.get('pid')} on {owner.get('host')} ended during stage "
                     f"{metrics.get('stage')} without recording a status (kill -9, OOM, power loss?)"}


def free_bytes(path: str | Path) -> int:
    """Free space for this user on the filesystem that holds path (or would hold it)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return (st := os.statvfs(path)).f_bavail * st.f_frsize


class RunDirGuard(Callback):
    """hydra.callbacks entry, before Hydra writes into the run (sweep) dir: refuse one another live job
    owns, or a full disk (where Hydra's own writes would end in a traceback)."""

    checked: str | None = None       # the dir last checked, for the CLI's message when Hydra's writes fail

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            run_dir = OmegaConf.select(config, key)
        except Exception:             # e.g. ${hydra:...} not resolvable yet: RunRecord's lock still checks
            return
        error, RunDirGuard.checked = None, run_dir
        if run_dir and lock_held(run_dir):
            holder = (Path(run_dir) / LOCK).read_text().strip()
            error = f"run dir {run_dir} belongs to a live job ({holder}): give this job another hydra.run.dir"
        elif run_dir and free_bytes(run_dir) < MIN_FREE:
            error = f"no space left on {run_dir} ({free_bytes(run_dir) // 1024} KiB free)"
        if error:
            print(f"prune_lab: error: {error}", file=sys.stderr)
            raise SystemExit(2)


# ---- signals ------------------------------------------------------------------------------------
def _raise_interrupted(signum, _frame):
    signal.signal(signum, signal.SIG_IGN)      # a second SIGTERM must not cut the status write
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupts(signums=(signal.SIGTERM,)):
    """Within the block, SIGTERM raises Interrupted in the main thread (like Ctrl-C's KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def signal_of(error: BaseException) -> str:
    return signal.Signals(getattr(error, "signum", signal.SIGINT)).name


def exit_code(error: BaseException) -> int:
    return 128 + int(getattr(error, "signum", signal.SIGINT))
