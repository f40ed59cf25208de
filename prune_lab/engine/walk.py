"""The layer-sequential walk (see prune_lab/engine/__init__.py): capture the decoder inputs, then per
layer run the method's stages with input statistics hooked on their linears, apply the method,
and propagate the next layer's inputs on the pruned (or dense) path."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from ..core.adapter import LayerView, layer_container, layer_view, layer_views
from ..errors import PruneLabError
from .capture import capture, to_device
from .hooks import Hooks
from .stats import Accumulator, token_rows

PROPAGATE = ("pruned", "dense")
LINEAR_PATHS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
# the norm whose input is the residual stream that attn.o / mlp.down add into (Llama family, OPT)
RESIDUAL_NORMS = {"attn.o": ("input_layernorm", "self_attn_layer_norm"),
                  "mlp.down": ("post_attention_layernorm", "final_layer_norm")}


def linear_at(view: LayerView, path: str) -> nn.Linear:
    """'attn.o' -> view.attn.o; 'mlp.down' -> view.mlp.down."""
    if path not in LINEAR_PATHS:
        raise PruneLabError(f"unknown linear '{path}': use one of {', '.join(LINEAR_PATHS)}")
    part, name = path.split(".")
    return getattr(getattr(view, part), name)


def _run(layer: nn.Module, x: Tensor, kwargs: dict, device) -> Tensor:
    out = layer(x.to(device), **to_device(kwargs, device))
    return out[0] if isinstance(out, tuple) else out


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
    needs_cross = method.needs_cross and propagate == "pruned"
    residual = needs_cross and method.needs_residual
    dense_in = list(pruned_in) if needs_cross else None
    records = []
    bar = tqdm(views, desc="engine", disable=not progress, leave=False)
    for view in bar:
        i, layer = view.index, view.module
        t0 = time.perf_counter()
        layer.to(device)
        dense_layer = copy.deepcopy(layer) if needs_cross else None
        kw = [k[i] for k in kwargs]
        dense_out = None
        stage_records = []
        for stage in method.stages(view):
            accs = {p: Accumulator(linear_at(view, p), method.needs_gram, needs_cross, device,
                                   residual and p in RESIDUAL_NORMS) for p in stage}
            outs = _stage_pass(layer, dense_layer, view, accs, pruned_in, dense_in, kw, masks, device,
                               want_out=dense_out is None and (propagate == "dense" or needs_cross))
            if outs is not None:
                dense_out = [o.to(store) for o in outs]
            stage_records.append(method.apply(i, view, {p: a.stats() for p, a in accs.items()}) or {})
            del accs
        if propagate == "pruned":
            next_in = [_run(layer, x, k, device).to(store) for x, k in zip(pruned_in, kw)]
            if needs_cross:
                dense_in = dense_out if dense_out is not None else \
                    [_run(dense_layer, x, k, device).to(store) for x, k in zip(dense_in, kw)]
        else:
            next_in = dense_out if dense_out is not None else \
                [_run(layer, x, k, device).to(store) for x, k in zip(pruned_in, kw)]
        pruned_in = next_in
        del dense_layer
        if offload:
            layer.to(homes[i])
        records.append({"layer": i, "seconds": time.perf_counter() - t0, "stages": stage_records})
    return (records, pruned_in) if return_hidden else records


def _stage_pass(layer, dense_layer, view, accs, pruned_in, dense_in, kw, masks, device, want_out):
    """Run one stage's calibration pass; returns the dense outputs if `want_out` (else None).

    With two streams the unmodified copy runs first on the dense input of each batch to hand each
    accumulator its dense-path x, then the (partly modified) layer runs on the pruned input.
    """
    current = {"mask": None, "dense": False}

    def make_hook(acc):
        def hook(_mod, inputs, _out):
            x = token_rows(inputs[0], current["mask"])
            if current["dense"]:
                acc.dense_x = x
            else:
                acc.add(x)
        return hook

    outs = [] if want_out else None
    with Hooks() as hooks:
        for path, acc in accs.items():
            hooks.add(linear_at(view, path).register_forward_hook(make_hook(acc)))
            if dense_layer is not None:
                dense_view = layer_view(view.index, dense_layer, view.attn.head_dim)
                hooks.add(linear_at(dense_view, path).register_forward_hook(make_hook(acc)))
            if acc.resid_cross is not None:
                for mod, slot in ((layer, "res_pruned"), (dense_layer, "res_dense")):
                    hooks.add(_residual_norm(mod, path).register_forward_pre_hook(_residual_hook(acc, current, slot)))
        for b, (x, k) in enumerate(zip(pruned_in, kw)):
            current["mask"] = masks[b]
            if dense_layer is not None:
                current["dense"] = True
                y = _run(dense_layer, dense_in[b], k, device)
                current["dense"] = False
                if want_out:
                    outs.append(y)
            y = _run(layer, x, k, device)
            if want_out and dense_layer is None:
                outs.append(y)
    return outs


def _residual_norm(layer: nn.Module, path: str) -> nn.Module:
    for name in RESIDUAL_NORMS[path]:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise PruneLabError(f"cannot find the residual stream of {path} in {type(layer).__name__}")


def _residual_hook(acc, current, slot):
    def hook(_mod, inputs):
        setattr(acc, slot, token_rows(inputs[0], current["mask"]))
    return hook
