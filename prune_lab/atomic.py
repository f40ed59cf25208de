"""Atomic artefact writes: a file or directory appears whole under its final name, or not at all.

Writers get a unique temporary sibling (hidden, pid + random suffix, the real name at the end so
formats inferred from the suffix still work); it is renamed over the final name only once written.
A kill, a full disk or an exception leaves no half-written artefact that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """with atomic_path(p) as tmp: write tmp  -> renamed to p on success, removed on failure."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """with atomic_dir(d) as tmp: fill tmp  -> becomes d (replacing an older d) on success."""
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = temp_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
