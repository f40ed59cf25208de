"""The driver's hold on the trials it runs: a heartbeat while they run, and no trial left RUNNING when
the loop is left early (SIGTERM, a full database or disk, a crash). Used by prune_lab/study/sweeper.py."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..artifacts.rundir import pid_alive, signal_of
from ..atomic import disk_full

log = logging.getLogger(__name__)


class Heartbeat:
    """Records a heartbeat for the running trials every `interval` s (RDB storages with heartbeats).
    A storage that stops taking them (a full disk) ends the heartbeat with a warning, not a thread
    traceback: the loop itself then meets the same error."""

    def __init__(self, storage, trial_ids: list[int], interval: int):
        self.enabled = isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval()
        self.storage, self.ids, self.interval, self.stop = storage, trial_ids, interval, threading.Event()

    def _beat(self):
        while True:
            try:
                for tid in self.ids:
                    self.storage.record_heartbeat(tid)
            except Exception as e:  # noqa: BLE001 - whatever the database driver raises
                log.warning("heartbeat stopped: %s", " ".join(str(e).split())[:200])
                return
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def reason_of(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted by {signal_of(error)}"
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
        return f"interrupted by {signal.Signals(code - 128).name}" if 128 < code < 128 + signal.NSIG \
            else f"the sweep stopped (exit {error.code})"
    if disk_full(error):
        return "no space left on the device (study storage or run dir)"
    return f"{type(error).__name__}: {error}"[:1000]


def mark_failed(study, trials, reason: str) -> list[int]:
    """Trials among `trials` still RUNNING -> FAIL with user attr failed_because; their numbers. Best
    effort: where the storage takes no more writes, the next invocation fails them (worker gone)."""
    failed = []
    for trial in trials:
        try:
            if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                continue
            study._storage.set_trial_user_attr(trial._trial_id, "failed_because", reason)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        except Exception as e:  # noqa: BLE001 - the storage may be what failed
            cause = "no space left on the device" if disk_full(e) else " ".join(str(e).split())[:200]
            log.warning("trial %d stays RUNNING (%s): the next run of this study marks it failed",
                        trial.number, cause)
    return failed


class Reserve:
    """Space kept beside a study file (sqlite, journal) and given back when the disk is full, so that
    the study can still record that its running trials failed (SQLite needs room for its journal)."""

    SIZE = 256 << 10

    def __init__(self, study_file: str | None):
        self.path = None
        if not study_file:
            return
        folder, name = Path(study_file).parent, Path(study_file).name
        for old in folder.glob(f".{name}.reserve-*"):          # of drivers killed with -9
            pid = old.name.rsplit("-", 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                old.unlink(missing_ok=True)
        self.path = folder / f".{name}.reserve-{os.getpid()}"
        try:
            with open(self.path, "wb") as f:
                f.write(bytes(self.SIZE))
                f.flush()
                os.fsync(f.fileno())
        except OSError:          # no room even for that: nothing to give back
            self.release()

    def release(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


@contextmanager
def settled(study, trials: list, reserve: Reserve | None = None):
    """Leaving the block by any exception marks the batch's unfinished trials FAIL, with the reason
    (on a full disk after giving back the reserve)."""
    try:
        yield
    except BaseException as e:
        if reserve is not None and disk_full(e):
            reserve.release()
        failed = mark_failed(study, trials, reason_of(e))
        if failed:
            log.warning("marked trial(s) %s FAILED: %s", failed, reason_of(e))
        raise
