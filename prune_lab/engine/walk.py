"""The layer-sequential walk (see prune_lab/engine/__init__.py): capture the decoder inputs, then per
layer run the method's stages (layer.py: hooks, the dense copy, taping and replay), apply the method,
and propagate the next layer's inputs on the pruned (or dense) path."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.adapter import layer_container, layer_views
from ..errors import PruneLabError
from .capture import capture
from .layer import LayerRun

PROPAGATE = ("pruned", "dense")


@torch.no_grad()
def walk(model: nn.Module, batches, method, *, device="cpu", offload: bool = False,
         propagate: str = "pruned", progress: bool = True, return_hidden: bool = False):
    """Walk the decoder layer by layer (see the module docstring). Returns the per-layer records
    (and the hidden states leaving the last layer when return_hidden=True)."""
    if propagate not in PROPAGATE:
        raise PruneLabError(f"engine.propagate must be one of {PROPAGATE}, got '{propagate}'")
    device = torch.device(device)
    store = torch.device("cpu") if offload else device
    views = layer_views(model)
    container = layer_container(model)
    layers = container.layers
    homes = [next(layer.parameters()).device for layer in layers]
    if offload:
        container.layers = nn.ModuleList()
        model.model.to(device)           # embeddings, rotary, final norm only
        container.layers = layers
    else:
        model.to(device)
    try:
        pruned_in, kwargs, masks = capture(model, batches, device, store)
    finally:
        if offload:
            container.layers = nn.ModuleList()
            model.model.to(homes[0])
            container.layers = layers
    two = method.needs_cross and propagate == "pruned"
    dense_in = pruned_in if two else None        # `dense_in is pruned_in`: no layer modified yet, one stream
    records = []
    for view in tqdm(views, desc="engine", disable=not progress, leave=False):
        t0 = time.perf_counter()
        view.module.to(device)
        run = LayerRun(view, [k[view.index] for k in kwargs], masks, device, store)
        stage_records, pruned_in, dense_in = run.walk(method, two, propagate, pruned_in, dense_in)
        if offload:
            view.module.to(homes[view.index])
        records.append({"layer": view.index, "seconds": time.perf_counter() - t0, "stages": stage_records,
                        "forwards": run.forwards / max(len(pruned_in), 1)})
    return (records, pruned_in) if return_hidden else records
