"""The stages both method families share: build the job's components, load, evaluate, recover, save.

A recipe (recipes/structured.py, recipes/unstructured.py) reads top to bottom over these stages;
each stage records its timing in metrics.json and writes what it owns into the run dir.
"""
from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from ..artifacts import packed
from ..artifacts.checkpoint import save_pruned
from ..artifacts.record import RunRecord
from ..cache.dense import load_dense
from ..core.adapter import decoder_linear_params, layer_views
from ..data import load_named
from ..errors import PruneLabError
from ..schema import TRUSTED_ENV, trusted_targets
from . import exports

log = logging.getLogger("prune_lab")


def build(node, **kwargs):
    """instantiate(node) with the trusted `_target_`s, surfacing our own PruneLabError instead of
    Hydra's wrapper; a mandatory value left unset (`???`) and a refused `_target_` are one line too."""
    try:
        return instantiate(node, _execution_whitelist_=trusted_targets(), **kwargs)
    except MissingMandatoryValue as e:
        raise PruneLabError(f"{e.full_key} must be set: add {e.full_key}=<value> to the command line") from None
    except InstantiationException as e:
        if isinstance(e.__cause__, PruneLabError):
            raise e.__cause__ from None
        line = instantiation_error(e)
        if line is None:
            raise
        raise PruneLabError(line) from None


def instantiation_error(e: InstantiationException) -> str | None:
    """Hydra's refusal of a `_target_` (its execution whitelist) or its failure to locate one, as one
    line; None when the target itself raised (a bug, whose traceback is kept)."""
    cause, text = e.__cause__, str(e)
    if cause is not None and not text.startswith("Error locating target"):
        return None
    key = re.search(r"^full_key: (\S+)$", text, re.M)
    where = f"{key.group(1)}._target_" if key else "_target_"
    first = re.split(r"(?<=\.)\s", " ".join(x.strip() for x in text.splitlines() if not x.startswith("full_key:")))[0]
    if cause is not None:
        return f"{where}: {first} {type(cause).__name__}: {' '.join(str(cause).split())}"
    return f"{where} refused: {first} (a job instantiates only prune_lab.* and the patterns in {TRUSTED_ENV})"


def model_stats(model) -> dict:
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_decoder_linear": decoder_linear_params(model),
            "num_layers": len(layer_views(model))}


def fmt(results: dict) -> str:
    return "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())


@dataclass
class JobResult:
    """What a job hands back: the final evaluation (after recovery if any) and the model's size."""
    results: dict
    params_total: int

    @property
    def ppl(self) -> float | None:
        """The value sweepers minimise: perplexity on the first evaluated dataset (None if none)."""
        return next((float(v) for k, v in self.results.items() if k.startswith("ppl/")), None)


@dataclass
class Job:
    """The components every family builds first (so bad configuration fails before any heavy work)
    and, after `load`, the dense model, its tokenizer, the token streams and the evaluation sets."""
    cfg: DictConfig
    run_dir: Path
    record: RunRecord
    loader: Any
    dataset: Any
    calibration: Any
    finetuner: Any
    evaluator: Any
    model: Any = None
    tokenizer: Any = None
    streams: Any = None
    eval_sets: dict = field(default_factory=dict)
    teacher: Any = None               # finetune=distill: the dense model's side, kept before compression

    def calibration_batches(self, n_samples: int | None = None) -> list[torch.Tensor]:
        stream = self.streams(self.dataset, self.calibration.split)
        return self.calibration.batches(stream, self.cfg.seed, *([n_samples] if n_samples else []))

    def check_calibration(self, n_samples: int | None = None) -> None:
        """Before any heavy work: the calibration split holds the windows (calibration.allow_overlap)."""
        self.calibration.check(len(self.streams(self.dataset, self.calibration.split)), n_samples)


def build_job(cfg: DictConfig, run_dir: Path, record: RunRecord) -> Job:
    torch.manual_seed(cfg.seed)
    exports.check_options(cfg, run_dir, build(cfg.quant))
    return Job(cfg, run_dir, record, loader=build(cfg.model), dataset=build(cfg.data),
               calibration=build(cfg.calibration), finetuner=build(cfg.finetune),
               evaluator=build(cfg.eval, _convert_="all"))


def load(job: Job, calibrates: bool) -> None:
    """Every dataset reachable (the calibration split only if the job calibrates), the dense model
    (kept in memory across the jobs of one multirun), then the evaluation settings against the data."""
    with job.record.stage("load"):
        job.eval_sets = {n: job.dataset if n == "data" else load_named(n) for n in job.evaluator.dataset_names()}
        if calibrates:
            job.dataset.text(job.calibration.split)           # fail fast if unreachable
        for ds in {id(d): d for d in job.eval_sets.values()}.values():
            ds.text(job.evaluator.split)
        job.model, job.tokenizer, job.streams, dense_reused = load_dense(job.loader, job.cfg)
        torch.manual_seed(job.cfg.seed)   # the same RNG state whether the dense model came from disk or memory
    job.record["model"] = {"name": job.loader.name, **job.loader.source_info(), "dense": model_stats(job.model),
                           "dense_reused": dense_reused}
    job.evaluator.check_data(job.eval_sets, job.streams)
    job.finetuner.check_model(job.model)     # LoRA target modules, distill's layers: before any work
    if calibrates:
        job.check_calibration()
    exports.check_loaded(job)                # a family output.export cannot describe: before any work


def evaluate_dense(job: Job) -> None:
    if job.evaluator.before:
        with job.record.stage("eval_dense"):
            job.record["dense"] = job.evaluator(job.model, job.tokenizer, job.eval_sets, job.streams, tag="dense")
        log.info("dense:  %s", fmt(job.record["dense"]))


def keep_teacher(job: Job) -> None:
    """finetune=distill: the teacher is the dense model as loaded, so it is taken here, before the recipe
    compresses job.model in place (a frozen copy, or its top-k logits of every training batch)."""
    if job.finetuner.needs_teacher:
        with job.record.stage("teacher"):
            job.teacher = job.finetuner.teacher(job.model, job.streams(job.dataset, job.finetuner.split),
                                                job.cfg.seed)


def evaluate(job: Job, tag: str) -> dict:
    """The compressed model's evaluation: metrics.json `pruned` (after compression, before recovery)."""
    with job.record.stage("evaluate"):
        results = job.evaluator(job.model, job.tokenizer, job.eval_sets, job.streams, tag=tag)
    job.record["pruned"] = results
    log.info("%s: %s", tag, fmt(results))
    return results


def recover(job: Job, results: dict, kept=None, removed_layers=(), extra=None, grids=None, masks=None) -> dict:
    """finetune=lora|full|distill, then evaluate again: metrics.json `recovered`. `kept`: a context the
    training runs in (the unstructured family's masks and bit grids); `removed_layers`: the dense indices of
    the layers pruned whole (distill maps the hidden-state layers past them). With output.save_model the
    model before recovery is saved first, as `model_pruned/` (`extra`, `grids`, `masks` as in save)."""
    if not job.finetuner.enabled:
        return results
    if job.cfg.output.save_model:
        with job.record.stage("save_pruned"):
            where = save_pruned(job.model, job.tokenizer, job.run_dir / "model_pruned", extra=extra, grids=grids,
                                masks=masks)
            job.record["checkpoint_pruned"] = packed.describe(where)
    context = {"teacher": job.teacher, "removed_layers": list(removed_layers)} if job.finetuner.needs_teacher else {}
    with job.record.stage("recover"), (kept or nullcontext()):
        job.record["finetune"] = job.finetuner(job.model, job.tokenizer, job.streams(job.dataset, job.finetuner.split),
                                               seed=job.cfg.seed, run_dir=job.run_dir, **context)
    job.teacher = None
    with job.record.stage("evaluate_recovered"):
        results = job.evaluator(job.model, job.tokenizer, job.eval_sets, job.streams, tag="recovered")
    job.record["recovered"] = results
    log.info("recovered: %s", fmt(results))
    return results


def save(job: Job, extra=None, grids=None, masks=None) -> None:
    """output.save_model (a prune_lab checkpoint; `extra(tmp_dir)` adds files before the rename) and
    output.export=hf|gguf|compressed_tensors (a plain Hugging Face directory, a GGUF file, a pack-quantized
    directory). `grids`: the grids of a quantized model (packed integer weights in the checkpoint;
    output.gguf_type=q4_0|q4_1, compressed_tensors); `masks`: N:M keep-masks (only the kept weights stored)."""
    if job.cfg.output.save_model:
        with job.record.stage("save"):
            where = save_pruned(job.model, job.tokenizer, job.run_dir / "model", extra=extra, grids=grids,
                                masks=masks)
            job.record["checkpoint"] = packed.describe(where)
    if job.cfg.output.export:
        with job.record.stage("export"):
            job.record["export"] = exports.write(job, grids)


def finish(job: Job, results: dict) -> JobResult:
    job.record.write()
    return JobResult(results, model_stats(job.model)["params_total"])
