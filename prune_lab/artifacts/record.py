"""Run record: metrics.json in the run dir, written atomically, with status, owner and stage timings."""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from ..atomic import disk_full, full_file, write_json_atomic
from ..errors import DiskFull
from .rundir import RunLock, remove_stale_temporaries, signal_of, this_process

log = logging.getLogger("prune_lab")
REPO = Path(__file__).resolve().parent.parent


def git_revision() -> str | None:
    """The checkout's revision, or None when the code does not run from a git checkout (a wheel)."""
    if not ((REPO / ".git").exists() and (REPO / "pyproject.toml").is_file()):
        return None
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def as_disk_full(error: BaseException, where: str | Path) -> BaseException:
    """A full disk, however it was raised, as DiskFull naming what did not fit (the artefact the atomic
    writer names, else `where`); any other error as it is."""
    if isinstance(error, DiskFull) or not disk_full(error):
        return error
    return DiskFull(full_file(error) or where)


def versions() -> dict:
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "git": git_revision()}


class RunRecord:
    """Collects metrics; `status` is running -> ok | failed | interrupted (README, "Run dirs").

    The job owns its run dir while it runs (an exclusive lock, see rundir.py) and records pid, host
    and start time, so a reader can tell a run killed with kill -9 from a live one.
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.json"
        self.lock = RunLock(self.dir)
        process = this_process()
        self.lock.acquire(process)           # before writing anything: another live job may own it
        for path in remove_stale_temporaries(self.dir):     # what a killed job left half written
            log.warning("removed %s, left half written by a process that is gone", path)
        self.metrics: dict = {"status": "running", "stage": None, "process": process,
                              "timings_s": {}, "versions": versions()}
        self._t0 = time.time()
        try:
            self.write()
        except BaseException:
            self.lock.release()
            raise

    def __setitem__(self, key, value):
        self.metrics[key] = value

    def __getitem__(self, key):
        return self.metrics[key]

    def update(self, values: dict) -> None:
        self.metrics.update(values)

    @contextmanager
    def stage(self, name: str):
        self.metrics["stage"] = name
        self.write()
        start = time.time()
        try:
            yield
        finally:
            self.metrics["timings_s"][name] = round(time.time() - start, 3)

    def write(self) -> None:
        write_json_atomic(self.path, self.metrics)

    def fail(self, error: BaseException) -> None:
        """failed, or interrupted (Ctrl-C, SIGTERM) with the signal's name."""
        if isinstance(error, KeyboardInterrupt):
            self.metrics["signal"] = signal_of(error)
            self.finish("interrupted", error)
        else:
            self.finish("failed", error)

    def finish(self, status: str = "ok", error: BaseException | None = None) -> None:
        self.metrics["status"] = status
        self.metrics["timings_s"]["total"] = round(time.time() - self._t0, 3)
        if error is not None:
            self.metrics["error"] = f"{type(error).__name__}: {error}"
        try:
            self.write()
        except OSError as e:                 # a full disk: overwrite the old file's blocks in place
            if error is not None:            # the job's own error goes on up
                self._write_status_in_place(e)
                return
            failure = as_disk_full(e, self.path)   # done, but its results do not fit: failed
            self.metrics.update(status="failed", error=f"{type(failure).__name__}: {failure}")
            self._write_status_in_place(e)
            raise failure from e
        finally:
            self.lock.release()

    def _write_status_in_place(self, cause: OSError) -> None:
        keep = ("status", "signal", "error", "process", "stage")
        small = {k: self.metrics[k] for k in keep if k in self.metrics}
        small["record_error"] = f"metrics.json could not be rewritten in full: {cause}"
        text = json.dumps(small, default=str).encode()
        try:
            with open(self.path, "r+b") as f:
                f.write(text)
                f.truncate(len(text))
        except OSError:
            log.error("cannot record status %s in %s: %s", self.metrics["status"], self.path, cause)
