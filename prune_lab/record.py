"""Run record: metrics.json in the run dir, written atomically, with status and stage timings."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

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


def versions() -> dict:
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "git": git_revision()}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class RunRecord:
    """Collects metrics; `status` is running -> ok | failed, so a half-written run never looks done."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.json"
        self.metrics: dict = {"status": "running", "timings_s": {}, "versions": versions()}
        self._t0 = time.time()
        self.write()

    def __setitem__(self, key, value):
        self.metrics[key] = value

    def __getitem__(self, key):
        return self.metrics[key]

    def update(self, values: dict) -> None:
        self.metrics.update(values)

    @contextmanager
    def stage(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self.metrics["timings_s"][name] = round(time.time() - start, 3)

    def write(self) -> None:
        write_json_atomic(self.path, self.metrics)

    def finish(self, status: str = "ok", error: BaseException | None = None) -> None:
        self.metrics["status"] = status
        self.metrics["timings_s"]["total"] = round(time.time() - self._t0, 3)
        if error is not None:
            self.metrics["error"] = f"{type(error).__name__}: {error}"
        self.write()
