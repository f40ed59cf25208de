"""One recipe per method family, chosen by the built method's declared `family` (no `_target_` compare).

`run(cfg, run_dir)` is the one entry of a job: metrics.json says running -> ok | failed | interrupted.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..artifacts.record import RunRecord, as_disk_full
from ..schema import check_keys
from . import structured, unstructured
from .common import JobResult, build

RECIPES = {"structured": structured.run, "unstructured": unstructured.run}


def run(cfg: DictConfig, run_dir: str | Path, memo=None) -> JobResult:
    """Run one job. memo (a study's PlanMemo, prune_lab/study/job.py): a plan the study already
    evaluated is not pruned and evaluated again."""
    run_dir = Path(run_dir)
    try:
        record = RunRecord(run_dir)
    except OSError as e:                  # not even metrics.json fits
        error = as_disk_full(e, run_dir)
        if error is not e:
            raise error from e
        raise
    try:
        check_keys(cfg)                 # `+allocator.ratoi=0.3`: a key past the schema, before any work
        method = build(cfg.method)
        result = RECIPES[method.family](cfg, run_dir, record, method, memo)
    except BaseException as e:
        error = as_disk_full(e, run_dir)  # a full disk: one line naming what did not fit
        record.fail(error)
        if error is not e:
            raise error from e
        raise
    record.finish("ok")
    return result
