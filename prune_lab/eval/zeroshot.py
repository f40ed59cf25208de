"""Zero-shot accuracy through lm-evaluation-harness (optional extra: pip install 'prune_lab[eval]').

The in-memory (pruned) model is wrapped with lm_eval's HFLM, so nothing is saved or reloaded.
Results come back flat: zeroshot/<task>/<metric> (+ zeroshot/avg_acc over the tasks reporting acc).
"""
from __future__ import annotations

import difflib
import logging
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import DataUnavailable, PruneLabError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'prune_lab[eval]' (lm-eval>=0.4.5)"


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PruneLabError(f"eval.zeroshot needs lm-evaluation-harness, which is not installed: "
                            f"{INSTALL_HINT}, or set eval.zeroshot=null") from e
    return lm_eval, HFLM, TaskManager


@contextmanager
def preserved_rng():
    """lm_eval reseeds python/numpy/torch globally; keep the job's own random streams intact."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def task_manager_for(TaskManager, tasks: list[str], include_path: str | None):
    """Index only include_path when it holds every task: lm_eval's own index takes ~30 s to build."""
    if include_path:
        path = str(Path(include_path).expanduser())
        local = TaskManager(include_path=path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
        return TaskManager(include_path=path)
    return TaskManager()


def check_task_names(task_manager, tasks: list[str], include_path: str | None) -> None:
    known = set(task_manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f" or in eval.zeroshot.include_path={include_path}" if include_path else ""
            raise PruneLabError(f"unknown lm-eval task '{name}'{hint}: not among lm_eval's tasks{where}")


def flatten_results(results: dict, tasks: list[str]) -> dict:
    """lm_eval's {"results": {task: {"acc,none": .., "alias": ..}}} -> {zeroshot/task/acc: ..}."""
    out: dict = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = "docs" if metric == "sample_len" else metric
            suffix = "" if filter_name in ("", "none") else f"/{filter_name}"
            out[f"zeroshot/{task}/{metric}{suffix}"] = float(value)
    accs = [out[f"zeroshot/{t}/acc"] for t in tasks if f"zeroshot/{t}/acc" in out]
    if len(accs) > 1:
        out["zeroshot/avg_acc"] = sum(accs) / len(accs)
    return out


# Raised by `datasets` / huggingface_hub when task data are not cached and the hub is unreachable.
DATA_ERRORS = (ConnectionError, OSError)


def unreachable(tasks: list[str], e: BaseException) -> DataUnavailable:
    first_line = (str(e).splitlines() or [""])[0][:200]
    return DataUnavailable(
        f"lm-eval task data for {', '.join(tasks)} are unreachable ({type(e).__name__}: {first_line}). "
        f"Offline? Pre-fill HF_DATASETS_CACHE, or use local tasks via eval.zeroshot.include_path")


_RESOLVED: dict[tuple, object] = {}


def resolve_tasks(tasks: list[str], include_path: str | None = None):
    """The task manager, once every task name is known and its data loads (cached or downloaded).

    Called when the evaluator is built, so a misspelt or unreachable task fails before any scoring;
    remembered per process, so the evaluation itself does not index the tasks again.
    """
    _, _, TaskManager = import_lm_eval()         # first: a missing extra fails even for remembered tasks
    tasks = list(tasks)
    key = (tuple(tasks), include_path)
    if key in _RESOLVED:
        return _RESOLVED[key]
    if not tasks:
        raise PruneLabError("eval.zeroshot.tasks is empty: name at least one lm-eval task")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise PruneLabError(f"eval.zeroshot.include_path '{include_path}' is not a directory")
    task_manager = task_manager_for(TaskManager, tasks, include_path)
    check_task_names(task_manager, tasks, include_path)
    from lm_eval.tasks import get_task_dict
    try:
        with preserved_rng():
            get_task_dict(tasks, task_manager)       # builds each task: loads its data
    except DATA_ERRORS as e:
        raise unreachable(tasks, e) from e
    _RESOLVED[key] = task_manager
    return task_manager


def zero_shot(model, tokenizer, tasks: list[str], num_fewshot: int = 0, batch_size: int = 8,
              limit: int | None = None, include_path: str | None = None) -> dict:
    lm_eval, HFLM, _ = import_lm_eval()
    tasks = list(tasks)
    task_manager = resolve_tasks(tasks, include_path)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with preserved_rng():
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot,
                                              limit=limit, task_manager=task_manager,
                                              log_samples=False)
    except DATA_ERRORS as e:
        raise unreachable(tasks, e) from e
    finally:
        model.train(was_training)
    return flatten_results(results, tasks)
