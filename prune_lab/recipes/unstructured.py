"""The unstructured family's recipe (method=sparsegpt|wanda|magnitude, with quant=none|uniform|mixed):
load -> engine pass (sparsify / quantize layer by layer) -> evaluate -> (recover, masks and grids
kept -> evaluate) -> save.

Read `run` top to bottom; the structured family's recipe is recipes/structured.py.
"""
from __future__ import annotations

import logging

from ..artifacts.compression import save_compression
from ..core.adapter import layer_views
from ..errors import PruneLabError
from . import exports
from .compress import compress
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
    recover,
    save,
)

log = logging.getLogger("prune_lab")


def run(cfg, run_dir, record, method, memo=None) -> JobResult:
    job = build_job(cfg, run_dir, record)
    quant = build(cfg.quant)
    method.with_quant(quant)
    engine = build(cfg.engine)
    refuse_structured_options(cfg, method)
    load(job, calibrates=True)
    method.check_model(layer_views(job.model))     # N:M against the layers' widths, before any work
    quant.check_model(layer_views(job.model))      # quant.layer_avg_bits' layers
    exports.check_pruned(job)                      # the shapes are final: what output.export needs of them
    evaluate_dense(job)
    keep_teacher(job)                              # finetune=distill: the dense model, before the engine pass
    summary = compress(job, method, quant, engine)
    results = evaluate(job, tag=method.name)
    extra = lambda tmp: save_compression(tmp, method, quant, summary)     # noqa: E731  masks/bits beside the weights
    results = recover(job, results, kept=method.kept(job.model), extra=extra, grids=method.grids_by_name(),
                      masks=method.masks_by_name())
    save(job, extra=extra, grids=method.grids_by_name(),   # packed integers, output.gguf_type=q4_0|q4_1, ...
         masks=method.masks_by_name())                     # N:M: the kept weights only
    return finish(job, results)


def refuse_structured_options(cfg, method) -> None:
    """Options of the structured family that this one cannot honour: one line each, before any work.
    (The method yamls select reconstruct=none and allocator=none; only an explicit one gets here.)"""
    if cfg.reconstruct.mode != "none":
        raise PruneLabError(f"reconstruct={cfg.reconstruct.mode} refits structured plans (method=structured); "
                            f"method={method.name} compensates in its own sweep: drop the reconstruct override")
    if cfg.allocator is not None:
        raise PruneLabError(f"allocator settings plan structured pruning (method=structured); method={method.name} "
                            f"sets its sparsity with method.sparsity or method.prune_n/prune_m: drop the allocator override")
    if cfg.verify:
        raise PruneLabError(f"verify=true proves that sliced units equal zeroed ones (method=structured); "
                            f"method={method.name} slices nothing: drop verify=true")
