"""Where a study's storage lives. A relative `sqlite:///rel.db` or `journal:///rel.log` is resolved once,
by the driver, against the directory the study was started from; that absolute URL is what every trial
opens (whatever its cwd), it is recorded in the study, and `<cache.dir>/study_storages.json` remembers it,
so the same command resumes the same study from another directory instead of starting a new one there.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, open_dict, read_write

from ..atomic import write_json_atomic

log = logging.getLogger(__name__)
REGISTRY = "study_storages.json"
FILE_SCHEMES = ("sqlite:///", "journal:///")


def relative_file(url: str) -> tuple[str, Path] | None:
    """(scheme prefix, path) of a file storage URL with a relative path, else None."""
    for prefix in FILE_SCHEMES:
        if url.startswith(prefix):
            path = Path(url[len(prefix):]).expanduser()
            return None if path.is_absolute() else (prefix, path)
    return None


def _read(registry: Path) -> dict:
    try:
        known = json.loads(registry.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def locate(url: str, study_name: str | None, registry_dir: str | Path | None) -> str:
    """The absolute URL of the study's storage: a relative file resolved against the current directory,
    unless no such file is here and the study of that name and URL was started elsewhere (recorded)."""
    relative = relative_file(url)
    if relative is None:
        return url
    prefix, path = relative
    here = Path.cwd() / path
    registry = Path(registry_dir) / REGISTRY if registry_dir else None
    key = f"{study_name} {url}"
    known = _read(registry).get(key) if registry else None
    if not here.exists() and isinstance(known, dict) and Path(str(known.get("path"))).exists():
        log.info("study '%s': %s is %s, resolved where the study was started (%s)", study_name, url,
                 known["path"], known.get("started_from"))
        return prefix + str(known["path"])
    if registry is not None and not here.exists():      # a new study file: remember where it is
        try:
            registry.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(registry, {**_read(registry), key: {"path": str(here), "started_from": os.getcwd()}})
        except OSError as e:
            log.warning("cannot record where study '%s' lives in %s (%s): resume it from %s", study_name,
                        registry, e, os.getcwd())
    return prefix + str(here)


def record_location(study, given: str, resolved: str) -> None:
    """The study's own record of the URL it was started with, what it resolved to, and from where."""
    if "storage" not in study.user_attrs:
        study.set_user_attr("storage", {"url": given, "resolved": resolved, "started_from": os.getcwd()})


def pin_storage(config: DictConfig, url: str) -> None:
    """Every trial's config carries the resolved URL (Hydra recomposes each trial from the driver's
    overrides, and refuses a trial whose sweeper settings differ from the driver's)."""
    quoted = "'" + url.replace("\\", "\\\\").replace("'", "\\'") + "'"
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweeper.storage = url
        kept = [o for o in config.hydra.overrides.hydra if not str(o).lstrip("+~").startswith("hydra.sweeper.storage=")]
        config.hydra.overrides.hydra = [*kept, f"hydra.sweeper.storage={quoted}"]
