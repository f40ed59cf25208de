"""The recipe of the unstructured family (method=sparsegpt|wanda|magnitude, with quant=none|uniform|mixed):
load -> engine pass (sparsify / quantize layer by layer) -> (recover, masks kept) -> evaluate -> save.

Read it top to bottom; the structured recipe is prune_lab/pipeline.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from .atomic import atomic_path
from .dense import load_dense
from .compression import linear_table, masks_kept, save_compression, summarise, write_tables
from .data import load_named
from .errors import PruneLabError
from .record import RunRecord

log = logging.getLogger("prune_lab")


def run_unstructured(cfg: DictConfig, run_dir: Path, record: RunRecord):
    from .pipeline import JobResult, build, model_stats
    torch.manual_seed(cfg.seed)
    # Build every component first, so bad configuration fails before any heavy work.
    loader = build(cfg.model)
    dataset = build(cfg.data)
    calibration = build(cfg.calibration)
    quant = build(cfg.quant)
    method = build(cfg.method).with_quant(quant)
    engine = build(cfg.engine)
    finetuner = build(cfg.finetune)
    evaluator = build(cfg.eval, _convert_="all")
    if cfg.reconstruct.mode != "none":    # these method yamls select reconstruct=none; an explicit one is refused
        raise PruneLabError(f"reconstruct={cfg.reconstruct.mode} refits structured plans (method=structured); "
                            f"method={method.name} compensates in its own sweep: drop the reconstruct override")

    with record.stage("load"):
        eval_sets = {n: dataset if n == "data" else load_named(n) for n in evaluator.dataset_names()}
        for ds in {id(d): d for d in (dataset, *eval_sets.values())}.values():
            ds.text(calibration.split if ds is dataset else evaluator.split)  # fail fast if unreachable
        model, tokenizer, streams, dense_reused = load_dense(loader, cfg)
        evaluator.check_data(eval_sets, streams)
        torch.manual_seed(cfg.seed)
    record["model"] = {"name": loader.name, "dense": model_stats(model), "dense_reused": dense_reused}

    if evaluator.before:
        with record.stage("eval_dense"):
            record["dense"] = evaluator(model, tokenizer, eval_sets, streams, tag="dense")
        log.info("dense:  %s", _fmt(record["dense"]))

    with record.stage("engine"):
        batches = calibration.batches(streams(dataset, calibration.split), cfg.seed)
        record["data_fingerprint"] = {"calibration": dataset.fingerprint(calibration.split)}
        records = engine.walk(model, batches, method)
    table = linear_table(records)
    summary = summarise(model, method, quant, table)
    record["compression"] = summary
    record["engine"] = {"layer_seconds": [round(r["seconds"], 3) for r in records]}
    log.info("%s: sparsity %.4f, avg bits %s, %d -> %d bytes (%.3fx)", method.name, summary["sparsity"],
             summary["avg_bits"], summary["dense_bytes"], summary["effective_bytes"], summary["size_ratio"])
    if cfg.output.plots:
        write_tables(run_dir, table, summary)
    else:
        with atomic_path(run_dir / "compression.csv") as tmp:
            table.to_csv(tmp, index=False)

    if finetuner.enabled:
        with record.stage("recover"), masks_kept(model, method, quant):
            train_stream = streams(dataset, finetuner.split)
            record["finetune"] = finetuner(model, tokenizer, train_stream, seed=cfg.seed, run_dir=run_dir)

    with record.stage("evaluate"):
        results = evaluator(model, tokenizer, eval_sets, streams, tag=method.name)
    record["pruned"] = results
    log.info("%s: %s", method.name, _fmt(results))

    if cfg.output.save_model:
        from .checkpoint import save_pruned
        with record.stage("save"):
            save_pruned(model, tokenizer, run_dir / "model",     # masks/bits inside, before the rename
                        extra=lambda tmp: save_compression(tmp, method, quant, summary))
    record.write()
    return JobResult(results, model_stats(model)["params_total"])


def _fmt(results: dict) -> str:
    return "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
