"""The engine-pass compression stage both families use: the unstructured family's sparsify/quantize
pass, and method=structured quant=uniform|mixed's GPTQ pass over the already pruned (and refit) model."""
from __future__ import annotations

import logging

from ..artifacts.compression import linear_table, summarise, write_tables
from ..atomic import atomic_path
from ..core.adapter import decoder_linear_params
from ..method import SparseGPT
from .common import Job

log = logging.getLogger("prune_lab")


def compress(job: Job, method, quant, engine) -> dict:
    """One engine pass; metrics.json `compression`, compression.csv (+ compression.png)."""
    with job.record.stage("engine"):
        batches = job.calibration_batches()
        job.record["data_fingerprint"] = {"calibration": job.dataset.fingerprint(job.calibration.split)}
        records = engine.walk(job.model, batches, method)
    table = linear_table(records)
    summary = job.record["compression"] = summarise(job.model, method, quant, table)
    job.record["engine"] = {"layer_seconds": [round(r["seconds"], 3) for r in records]}
    log.info("%s: sparsity %.4f, avg bits %s, %d -> %d bytes (%.3fx)", method.name, summary["sparsity"],
             summary["avg_bits"], summary["dense_bytes"], summary["effective_bytes"], summary["size_ratio"])
    if job.cfg.output.plots:
        write_tables(job.run_dir, table, summary)
    else:
        with atomic_path(job.run_dir / "compression.csv") as tmp:
            table.to_csv(tmp, index=False)
    return summary


def quantize_pruned(job: Job, quant, engine, dense: dict):
    """method=structured with a quant: GPTQ over every linear of the pruned model in one engine pass — the
    sweep method=sparsegpt method.sparsity=0 runs, with its defaults (GPTAQ-style asymmetric calibration
    towards the unquantized pruned model's outputs), so one job equals pruning, saving, then quantizing the
    saved model. metrics.json `compression` adds the size against the dense model (`dense`: its model_stats;
    at the same dtype)."""
    gptq = SparseGPT(sparsity=0.0).with_quant(quant)
    gptq.name = "gptq"
    summary = compress(job, gptq, quant, engine)
    width = next(job.model.parameters()).element_size()
    summary["dense_model_bytes"] = dense["params_total"] * width
    summary["size_ratio_vs_dense"] = summary["effective_bytes"] / summary["dense_model_bytes"]
    summary["param_ratio_vs_dense"] = sum(p.numel() for p in job.model.parameters()) / dense["params_total"]
    summary["decoder_param_ratio_vs_dense"] = decoder_linear_params(job.model) / dense["params_decoder_linear"]
    log.info("pruned + quantized: %d -> %d bytes (%.3fx of the dense model)", summary["dense_model_bytes"],
             summary["effective_bytes"], summary["size_ratio_vs_dense"])
    return gptq, summary
