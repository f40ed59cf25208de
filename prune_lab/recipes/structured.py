"""The structured family's recipe (method=structured): load -> score -> allocate -> reconstruct ->
prune -> (quant=uniform|mixed: GPTQ pass) -> evaluate -> (recover -> evaluate) -> save.

Read `run` top to bottom; every component comes from its config node's `_target_`, every stage is a
function below. The unstructured family's recipe is recipes/unstructured.py.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from ..allocator import align_plan, check_alignment
from ..artifacts.compression import save_compression
from ..artifacts.layer_table import layer_table, write_layer_table
from ..artifacts.plots import write_run_plots
from ..artifacts.reconstruct_errors import write_errors
from ..artifacts.scores import save_scores
from ..artifacts.search_plots import write_search_plot
from ..atomic import atomic_path
from ..cache.scores import ScoreCache, cache_key, code_version_part, model_fingerprint, tokens_fingerprint
from ..core.adapter import layer_shapes, layer_views, refuse_emptied
from ..core.executor import apply_plan
from ..core.plan import PruningPlan
from ..core.verify import require_passed, verify_pruning
from ..errors import PruneLabError
from ..reconstruct import summarize
from . import exports
from .compress import quantize_pruned
from .common import (
    Job,
    JobResult,
    build,
    build_job,
    evaluate,
    evaluate_dense,
    finish,
    keep_teacher,
    load,
    model_stats,
    recover,
    save,
)

log = logging.getLogger("prune_lab")


@dataclass
class Parts:
    """The structured components, and what the job does with them."""
    importance: Any
    layer_importance: Any | None      # layer_importance=none: None
    allocator: Any | None             # allocator=none (analyse only): None
    reconstructor: Any
    engine: Any
    quant: Any | None = None          # quant=uniform|mixed: GPTQ over the pruned model

    @property
    def prunes(self) -> bool:          # allocator.ratio=0: evaluate only
        return self.allocator is not None and not self.allocator.removes_nothing

    @property
    def slices_units(self) -> bool:    # allocator=depth removes whole layers: no unit scores, nothing to refit
        return self.prunes and self.allocator.needs_unit_scores

    @property
    def wants_units(self) -> bool:
        return self.allocator is None or self.slices_units

    @property
    def wants_layers(self) -> bool:
        return self.layer_importance is not None and (self.allocator is None or self.prunes)


def run(cfg, run_dir, record, method, memo=None) -> JobResult:
    job = build_job(cfg, run_dir, record)
    parts = build_parts(job)
    load(job, calibrates=parts.wants_units or parts.wants_layers or parts.quant is not None)
    views = layer_views(job.model)                       # the dense model's layers, for every stage below
    check_before_scoring(job, parts, views)
    evaluate_dense(job)
    keep_teacher(job)                  # finetune=distill: the dense model, before anything prunes it in place
    scores, layer_scores = score(job, parts)
    plan = allocate(job, parts, views, scores, layer_scores)
    prior = memo.lookup(plan, job.model, record.metrics.get("data_fingerprint"), cfg, run_dir) if memo else None
    if prior is not None:              # in a study: a plan it already evaluated is not evaluated again
        return reuse(job, prior)
    write_layer_table(run_dir, layer_table(views, plan, layer_scores),
                      parts.layer_importance.name if layer_scores is not None else None)
    plan = reconstruct(job, parts, plan)
    prune(job, parts, plan)
    gptq = extra = None
    if parts.quant is not None and parts.allocator is not None:
        gptq, summary = quantize_pruned(job, parts.quant, parts.engine, record["model"]["dense"])
        extra = lambda tmp: save_compression(tmp, gptq, parts.quant, summary)    # noqa: E731
    results = record.metrics.get("dense", {})
    if parts.allocator is not None:
        if parts.prunes or gptq or not job.evaluator.before:
            results = evaluate(job, tag="pruned")
        record["pruned"] = results     # ratio 0 with eval.before: the dense results, evaluated once
        results = recover(job, results, kept=gptq.kept(job.model) if gptq else None, extra=extra,
                          removed_layers=plan.layers if plan is not None else (),
                          grids=gptq.grids_by_name() if gptq else None)
    save(job, extra=extra, grids=gptq.grids_by_name() if gptq else None)   # packed ints, gguf q4_0|q4_1
    if cfg.output.plots:
        with record.stage("plots"):
            write_run_plots(run_dir, plan, scores, layer_scores, views_before=views)
    return finish(job, results)


def build_parts(job: Job) -> Parts:
    cfg, quant = job.cfg, build(job.cfg.quant)
    parts = Parts(importance=build(cfg.importance),
                  layer_importance=build(cfg.layer_importance) if cfg.layer_importance else None,
                  allocator=build(cfg.allocator) if cfg.allocator else None,
                  reconstructor=build(cfg.reconstruct), engine=build(cfg.engine), quant=quant if quant.enabled else None)
    if parts.allocator is not None and parts.allocator.needs_layer_importance and parts.layer_importance is None:
        raise PruneLabError(f"{type(parts.allocator).__name__.lower()} allocation needs layer importance: "
                            f"set layer_importance=removal or activation")
    if parts.allocator is None:         # analyse only: what needs a pruned model is refused, not skipped
        asked = (("output.save_model", "true", cfg.output.save_model, "save"),
                 ("output.export", exports.export_kind(cfg), cfg.output.export, "export"),
                 ("finetune", type(job.finetuner).__name__.lower(), job.finetuner.enabled, "recover"),
                 ("verify", "true", cfg.verify, "verify"), ("quant", "uniform|mixed", quant.enabled, "quantize"))
        for key, value, on, verb in asked:
            if on:
                raise PruneLabError(f"{key}={value} with allocator=none: an analyse-only job prunes nothing to "
                                    f"{verb} (choose an allocator, or drop {key})")
    return parts


def check_before_scoring(job: Job, parts: Parts, views) -> None:
    """What depends on the model's shape (calibration size, alignment, layer range, what output.export=hf
    can describe) fails before scoring."""
    refuse_emptied(views, scoring=parts.wants_units or parts.wants_layers)
    if parts.wants_layers:
        job.check_calibration(parts.layer_importance.n_samples)
    if parts.slices_units:
        parts.reconstructor.check_calibration(job.calibration.n_samples * job.calibration.seq_len, views)
        if job.cfg.output.export and parts.reconstructor.adds_biases:
            exports.check_loaded(job, parts.reconstructor.adds_biases)
    if parts.prunes:
        check_alignment(views, parts.allocator.multiple_of)      # multiple_of fits every layer
        parts.allocator.eligible(views)      # layer range, eval windows
        parts.allocator.check_calibration(job.calibration.n_samples * job.calibration.seq_len)
    if parts.wants_layers:
        parts.layer_importance.check_model(views)                # layer_importance=file: its layer count


def score(job: Job, parts: Parts):
    """Unit scores and layer importance, each from the score cache when the same model, criterion and
    calibration tokens were scored before; written to scores.safetensors."""
    cfg, record = job.cfg, job.record
    scores = layer_scores = None
    record["scores"] = {"reused": None, "layer_reused": None}
    if not (parts.wants_units or parts.wants_layers):
        return scores, layer_scores
    cache = ScoreCache(cfg.cache.dir, enabled=cfg.cache.enabled)
    with record.stage("score"):
        record["data_fingerprint"] = {"calibration": job.dataset.fingerprint(job.calibration.split)}
        fingerprint = model_fingerprint(job.model)
        origin = {"model": fingerprint}         # scores.safetensors' metadata: what the scores were computed on
        if parts.wants_units:
            batches = job.calibration_batches()
            tokens = tokens_fingerprint(batches)
            key = cache_key(model=fingerprint, tokens=tokens, seed=cfg.seed, **code_version_part(
                parts.importance.version), importance=OmegaConf.to_container(cfg.importance, resolve=True))
            scores, record["scores"]["reused"] = cache.unit_scores(
                key, lambda: parts.importance(job.model, batches, cfg.seed), enabled=parts.importance.cacheable)
            scores.check_finite(f"importance={parts.importance.name}", "fp16 overflow? use model.dtype=bfloat16 "
                                "or float32")          # importance=file checked its file when built
            origin |= parts.importance.origin(fingerprint, tokens)
        if parts.wants_layers:
            layer_batches = job.calibration_batches(parts.layer_importance.n_samples)
            tokens = tokens_fingerprint(layer_batches)
            key = cache_key(model=fingerprint, tokens=tokens, seed=cfg.seed, **code_version_part(
                parts.layer_importance.version), layer=OmegaConf.to_container(cfg.layer_importance, resolve=True))
            layer_scores, record["scores"]["layer_reused"] = cache.layer_scores(
                key, lambda: parts.layer_importance(job.model, layer_batches), enabled=parts.layer_importance.cacheable)
            origin |= parts.layer_importance.origin(tokens)
    if cfg.output.save_scores:
        save_scores(job.run_dir / "scores.safetensors", scores, layer_scores, origin)
    return scores, layer_scores


def allocate(job: Job, parts: Parts, views, scores, layer_scores) -> PruningPlan | None:
    """The plan (plan.csv, unit_table.csv), its widths on multiples of allocator.multiple_of."""
    allocator, record = parts.allocator, job.record
    if allocator is None:
        return None
    if allocator.searches and parts.prunes:      # allocator=search: the plan from the level database
        with record.stage("search"):
            plan = allocator.search(job.model, job.calibration_batches(), parts.engine, scores, views, job.run_dir)
        record["search"] = allocator.summary
        if job.cfg.output.plots:
            write_search_plot(job.run_dir, allocator.summary)
    with record.stage("allocate"):
        if not allocator.searches or not parts.prunes:
            plan = allocator(scores, views, layer_scores) if parts.prunes else PruningPlan()
        if scores is not None:        # depth: whole layers, nothing to align
            plan = align_plan(plan, scores, views, allocator.multiple_of)
        plan.save(job.run_dir / "plan.csv")
        if allocator.table is not None:
            with atomic_path(job.run_dir / "unit_table.csv") as tmp:
                allocator.table.to_csv(tmp, index=False)
    s = record["plan"] = plan.summary(views)
    log.info("plan:   %d KV groups, %d MLP channels, layers %s removed = %d params (%.2f%% of decoder)",
             s["groups_removed"], s["channels_removed"], s["layers_removed"], s["params_removed"],
             100 * s["achieved_ratio"])
    return plan


def reuse(job: Job, prior) -> JobResult:
    job.record.update(prior.metrics)
    job.record["model"]["pruned"] = {"params_total": prior.params_total}
    job.record.write()
    return JobResult(prior.results, prior.params_total)


def reconstruct(job: Job, parts: Parts, plan: PruningPlan | None) -> PruningPlan | None:
    """One engine pass refits o_proj/down_proj of every pruned layer (reconstruct=obs also picks the
    units inside each layer: plan.csv is rewritten with the units actually removed)."""
    if not (parts.prunes and parts.reconstructor.enabled):
        return plan
    with job.record.stage("reconstruct"):
        plan, rows = parts.reconstructor(job.model, plan, job.calibration_batches(), parts.engine)
        plan.save(job.run_dir / "plan.csv")
    job.record["reconstruct"] = {"mode": parts.reconstructor.mode, **parts.engine.describe(), **summarize(rows)}
    write_errors(job.run_dir, rows, job.cfg.output.plots)
    return plan


def prune(job: Job, parts: Parts, plan: PruningPlan | None) -> None:
    """Slice the plan away (verify=true: prove the pruned logits equal the masked dense model's)."""
    if parts.prunes or (job.cfg.verify and plan is not None):     # verify=true at ratio 0: the empty plan
        with job.record.stage("prune"):
            dense_copy = copy.deepcopy(job.model) if job.cfg.verify else None
            apply_plan(job.model, plan)
            exports.check_pruned(job)        # output.export refuses what it cannot write before evaluating
        if dense_copy is not None:
            with job.record.stage("verify"):
                job.record["verify"] = verify_pruning(job.model, dense_copy, plan, job.calibration_batches()[0])
            del dense_copy
            require_passed(job.record["verify"])
    job.record["model"]["pruned"] = model_stats(job.model)
    job.record["model"]["layers"] = layer_shapes(job.model)
