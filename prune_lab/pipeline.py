"""The one entry function: load -> score -> allocate -> prune -> (recover) -> evaluate -> record.

Read it top to bottom; every component comes from its config node's `_target_`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .adapter import decoder_linear_params, layer_shapes, layer_views
from .allocator import align_plan, check_alignment
from .atomic import atomic_path
from .cache import ScoreCache, cache_key, model_fingerprint, tokens_fingerprint
from .data import load_named
from .dense import load_dense
from .errors import PruneLabError
from .export import export_hf, shared_shape
from .layer_table import layer_table, write_layer_table
from .plan import PruningPlan
from .prune import apply_plan
from .reconstruct import summarize, write_errors
from .scores import save_scores
from .record import RunRecord
from .study import PlanMemo
from .verify import require_passed, verify_pruning

log = logging.getLogger("prune_lab")
TARGETS = "prune_lab.*"     # the only `_target_`s a job may instantiate (Hydra's execution whitelist)
STRUCTURED, NO_QUANT = "prune_lab.method.Structured", "prune_lab.quant.NoQuant"


def build(node, **kwargs):
    """instantiate(node), surfacing our own PruneLabError instead of Hydra's wrapper."""
    try:
        return instantiate(node, _execution_whitelist_=TARGETS, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, PruneLabError):
            raise e.__cause__ from None
        raise


def model_stats(model) -> dict:
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_decoder_linear": decoder_linear_params(model),
            "num_layers": len(layer_views(model))}


@dataclass
class JobResult:
    """What a job hands back: the final evaluation (after recovery if any) and the model's size."""
    results: dict
    params_total: int

    @property
    def ppl(self) -> float | None:
        """The value sweepers minimise: perplexity on the first evaluated dataset (None if none)."""
        return next((float(v) for k, v in self.results.items() if k.startswith("ppl/")), None)


def run(cfg: DictConfig, run_dir: str | Path, memo: PlanMemo | None = None) -> JobResult:
    """Run one job; metrics.json says running -> ok | failed | interrupted.

    memo (Optuna studies): a plan the study already evaluated is not pruned and evaluated again.
    """
    run_dir = Path(run_dir)
    record = RunRecord(run_dir)
    try:
        result = _recipe(cfg, memo)(cfg, run_dir, record)
    except BaseException as e:
        record.fail(e)
        raise
    record.finish("ok")
    return result


def _recipe(cfg: DictConfig, memo: PlanMemo | None = None):
    """method=structured (default): this module's _run; sparsegpt|wanda|magnitude: unstructured.py."""
    if cfg.method._target_ == STRUCTURED:
        if cfg.quant._target_ != NO_QUANT:
            raise PruneLabError("quant=uniform|mixed needs method=sparsegpt|wanda|magnitude "
                                "(structured pruning does not quantize)")
        return partial(_run, memo=memo)
    from .unstructured import run_unstructured
    return run_unstructured


def _run(cfg: DictConfig, run_dir: Path, record: RunRecord, memo: PlanMemo | None = None) -> JobResult:
    torch.manual_seed(cfg.seed)
    # Build every component first, so bad configuration fails before any heavy work.
    loader = build(cfg.model)
    dataset = build(cfg.data)
    calibration = build(cfg.calibration)
    importance = build(cfg.importance)
    layer_importance = build(cfg.layer_importance) if cfg.layer_importance else None
    allocator = build(cfg.allocator) if cfg.allocator else None      # allocator=none: analyse only
    reconstructor, engine = build(cfg.reconstruct), build(cfg.engine)
    finetuner = build(cfg.finetune)
    evaluator = build(cfg.eval, _convert_="all")
    cache = ScoreCache(cfg.cache.dir, enabled=cfg.cache.enabled)
    if allocator is not None and allocator.needs_layer_importance and layer_importance is None:
        raise PruneLabError(f"{type(allocator).__name__.lower()} allocation needs layer importance: "
                            f"set layer_importance=removal or activation")
    prunes = allocator is not None and not allocator.removes_nothing   # ratio 0: evaluate only
    slices_units = prunes and allocator.needs_unit_scores    # depth removes whole layers: nothing to refit
    want_units = allocator is None or slices_units
    want_layers = layer_importance is not None and (allocator is None or prunes)
    recovers = allocator is not None and finetuner.enabled

    with record.stage("load"):
        eval_sets = {n: dataset if n == "data" else load_named(n) for n in evaluator.dataset_names()}
        if want_units or want_layers:
            dataset.text(calibration.split)            # fail fast if unreachable
        for ds in {id(d): d for d in eval_sets.values()}.values():
            ds.text(evaluator.split)
        model, tokenizer, streams, dense_reused = load_dense(loader, cfg)
        torch.manual_seed(cfg.seed)   # the same RNG state whether the dense model came from disk or memory
    record["model"] = {"name": loader.name, "dense": model_stats(model), "dense_reused": dense_reused}
    if slices_units:
        reconstructor.check_calibration(calibration.n_samples * calibration.seq_len, layer_views(model))
    if prunes:
        check_alignment(layer_views(model), allocator.multiple_of)   # multiple_of fits every layer
        allocator.eligible(layer_views(model))      # layer range, eval windows: fail before scoring
    evaluator.check_data(eval_sets, streams)

    if evaluator.before:
        with record.stage("eval_dense"):
            record["dense"] = evaluator(model, tokenizer, eval_sets, streams, tag="dense")
        log.info("dense:  %s", _fmt(record["dense"]))

    scores = layer_scores = None
    record["scores"] = {"reused": None, "layer_reused": None}
    if want_units or want_layers:
        with record.stage("score"):
            cal_stream = streams(dataset, calibration.split)
            record["data_fingerprint"] = {"calibration": dataset.fingerprint(calibration.split)}
            fingerprint = model_fingerprint(model)
            if want_units:
                batches = calibration.batches(cal_stream, cfg.seed)
                key = cache_key(model=fingerprint, tokens=tokens_fingerprint(batches), seed=cfg.seed,
                                importance=OmegaConf.to_container(cfg.importance, resolve=True))
                scores, record["scores"]["reused"] = cache.unit_scores(
                    key, lambda: importance(model, batches, cfg.seed), enabled=importance.cacheable)
                scores.check_finite()
            if want_layers:
                layer_batches = calibration.batches(cal_stream, cfg.seed, layer_importance.n_samples)
                key = cache_key(model=fingerprint, tokens=tokens_fingerprint(layer_batches), seed=cfg.seed,
                                layer=OmegaConf.to_container(cfg.layer_importance, resolve=True))
                layer_scores, record["scores"]["layer_reused"] = cache.layer_scores(
                    key, lambda: layer_importance(model, layer_batches), enabled=layer_importance.cacheable)
        if cfg.output.save_scores:
            save_scores(run_dir / "scores.safetensors", scores, layer_scores)

    views = layer_views(model)
    plan = None
    if allocator is not None:
        with record.stage("allocate"):
            plan = allocator(scores, views, layer_scores) if prunes else PruningPlan()
            if scores is not None:        # widths on multiples of allocator.multiple_of (depth: whole layers)
                plan = align_plan(plan, scores, views, allocator.multiple_of)
            plan.save(run_dir / "plan.csv")
            if allocator.table is not None:
                with atomic_path(run_dir / "unit_table.csv") as tmp:
                    allocator.table.to_csv(tmp, index=False)
        record["plan"] = plan.summary(views)
        log.info("plan:   %d KV groups, %d MLP channels, layers %s removed = %d params (%.2f%% of decoder)",
                 record["plan"]["groups_removed"], record["plan"]["channels_removed"],
                 record["plan"]["layers_removed"], record["plan"]["params_removed"],
                 100 * record["plan"]["achieved_ratio"])
        prior = memo.lookup(plan, model, record.metrics.get("data_fingerprint"), cfg, run_dir) if memo else None
        if prior is not None:    # in a study: a plan it already evaluated is not evaluated again
            record.update(prior.metrics)
            record["model"]["pruned"] = {"params_total": prior.params_total}
            record.write()
            return JobResult(prior.results, prior.params_total)
    write_layer_table(run_dir, layer_table(views, plan, layer_scores),
                      layer_importance.name if layer_scores is not None else None)

    if prunes and reconstructor.enabled:
        with record.stage("reconstruct"):
            batches = calibration.batches(streams(dataset, calibration.split), cfg.seed)
            plan, rows = reconstructor(model, plan, batches, engine)
            plan.save(run_dir / "plan.csv")      # the units actually removed (obs chooses them)
        record["reconstruct"] = {"mode": reconstructor.mode, **engine.describe(), **summarize(rows)}
        write_errors(run_dir, rows, cfg.output.plots)

    if prunes:
        with record.stage("prune"):
            dense_copy = copy.deepcopy(model) if cfg.verify else None
            apply_plan(model, plan)
            if cfg.output.export:
                shared_shape(model)      # output.export=hf refuses a non-uniform model before evaluating
        if dense_copy is not None:
            with record.stage("verify"):
                batch = calibration.batches(streams(dataset, calibration.split), cfg.seed)[0]
                record["verify"] = verify_pruning(model, dense_copy, plan, batch)
            del dense_copy
            require_passed(record["verify"])
    record["model"]["pruned"] = model_stats(model)
    record["model"]["layers"] = layer_shapes(model)

    results = record.metrics.get("dense", {})
    if allocator is not None:
        if prunes or not evaluator.before:
            with record.stage("evaluate"):
                results = evaluator(model, tokenizer, eval_sets, streams, tag="pruned")
        record["pruned"] = results           # ratio 0 with eval.before: the dense results, evaluated once
        log.info("pruned: %s", _fmt(results))
    if recovers:
        with record.stage("recover"):
            record["finetune"] = finetuner(model, tokenizer, streams(dataset, finetuner.split),
                                           seed=cfg.seed, run_dir=run_dir)
        with record.stage("evaluate_recovered"):
            results = evaluator(model, tokenizer, eval_sets, streams, tag="recovered")
        record["recovered"] = results
        log.info("recovered: %s", _fmt(results))

    if cfg.output.save_model and allocator is not None:
        from .checkpoint import save_pruned
        with record.stage("save"):
            save_pruned(model, tokenizer, run_dir / "model")
    if cfg.output.export:
        with record.stage("export"):
            record["export"] = export_hf(model, tokenizer, run_dir / "hf")
    if cfg.output.plots:
        from .plots import write_run_plots
        with record.stage("plots"):
            write_run_plots(run_dir, plan, scores, layer_scores, views_before=views)
    record.write()
    return JobResult(results, record["model"]["pruned"]["params_total"])


def _fmt(results: dict) -> str:
    return "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
