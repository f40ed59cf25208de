"""Atomic artefact writes: a file or directory appears whole under its final name, or not at all.

Writers get a unique temporary sibling (hidden, pid + random suffix, the real name at the end so
formats inferred from the suffix still work); it is renamed over the final name only once written.
A kill, a full disk or an exception leaves no half-written artefact that looks finished; a full disk
(however the writing library words it) comes out as OSError(ENOSPC) naming the artefact. A kill -9
leaves the temporary behind: `temp_owner` reads its pid back, for the cleaners (artifacts/rundir.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP = re.compile(r"^\.(?:tmp|old)-(\d+)-[0-9a-f]{8}-.")
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries that wrap the OSError word it: safetensors (Rust), SQLite, the OS itself
FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "database or disk is full")


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def temp_owner(name: str) -> int | None:
    """The pid in the name of a temporary made by temp_sibling, else None."""
    m = TEMP.match(name)
    return int(m.group(1)) if m else None


def disk_full(error: BaseException | None) -> bool:
    """Whether error, or the error it was raised from or during, is a full disk or an exceeded quota
    (never a KeyboardInterrupt or SystemExit, whatever they interrupted)."""
    if not isinstance(error, Exception):
        return False
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return True
        if any(text in str(error) for text in FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def full_file(error: BaseException | None) -> str | None:
    """The file a full-disk OSError in error's chain names, if one does."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS and error.filename:
            return str(error.filename)
        error = error.__cause__ or error.__context__
    return None


def full_at(path: Path) -> OSError:
    """OSError(ENOSPC) naming path (the artefact that did not fit) in its filename."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


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
    except BaseException as e:
        _remove(tmp)
        if disk_full(e):           # the outermost artefact is named (a checkpoint dir, not its files)
            raise full_at(path) from e
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
    except BaseException as e:
        _remove(tmp)
        if disk_full(e):           # the outermost artefact is named (a checkpoint dir, not its files)
            raise full_at(path) from e
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
