"""Pruning executor: applies a PruningPlan to a model in place (slicing, never masking)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .adapter import (
    AttentionView,
    MLPView,
    decoder_layers,
    layer_container,
    layer_shapes,
    layer_views,
)
from .plan import PruningPlan


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, rows.to(w.device)).contiguous(),
                                    requires_grad=lin.bias.requires_grad)
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    lin.out_features, lin.in_features = w.shape


def _keep(n: int, removed: list[int]) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.as_tensor(removed, dtype=torch.long)] = False
    return mask.nonzero().squeeze(1)


def head_rows(groups: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Row indices of whole groups: group g owns rows [g*r, (g+1)*r)."""
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group)).reshape(-1)


def prune_attention(view: AttentionView, removed_groups: list[int]) -> None:
    """Remove whole GQA groups: a KV head with its G query heads; the Q:KV ratio is kept."""
    keep = _keep(view.num_kv_heads, removed_groups)
    g, hd = view.group_size, view.head_dim
    q_rows, kv_rows = head_rows(keep, g * hd), head_rows(keep, hd)
    _slice_linear(view.q, rows=q_rows)
    _slice_linear(view.k, rows=kv_rows)
    _slice_linear(view.v, rows=kv_rows)
    _slice_linear(view.o, cols=q_rows)
    module = view.module
    if g:                                  # read by eager / padded attention paths; an emptied attention
        module.num_key_value_groups = g    # (0 heads, plan.attn_blocks) keeps its ratio: never 0/0
    for attr, value in (("num_heads", view.num_heads), ("num_key_value_heads", view.num_kv_heads)):
        if hasattr(module, attr):
            setattr(module, attr, value)


def prune_mlp(view: MLPView, removed_channels: list[int]) -> None:
    """Remove MLP channels: gate row + up row (or OPT's fc1 row) + down column."""
    keep = _keep(view.width, removed_channels)
    for lin in view.inputs:
        _slice_linear(lin, rows=keep)
    _slice_linear(view.down, cols=keep)
    if hasattr(view.module, "intermediate_size"):
        view.module.intermediate_size = len(keep)


def remove_layers(model: nn.Module, removed: list[int]) -> None:
    """Depth pruning: drop whole decoder layers, renumber layer_idx, update the config."""
    if not removed:
        return
    container = layer_container(model)
    layers = container.layers
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    container.layers = nn.ModuleList(layers[i] for i in kept)
    for new_idx, layer in enumerate(container.layers):
        for mod in (layer, getattr(layer, "self_attn", None)):
            if mod is not None and hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    if getattr(config, "max_window_layers", None) is not None:  # qwen2: first N layers use full attention
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)


def record_manifest(model: nn.Module, plan: PruningPlan) -> None:
    """Keep the per-layer shapes and the removed layers (as indices of the original model) on the config."""
    previous = sorted((getattr(model.config, "prune_lab", None) or {}).get("removed_layers", []))
    # plan.layers index the model this plan was made for, which may already miss `previous`
    original_count = len(decoder_layers(model)) + len(plan.layers) + len(previous)
    surviving = [i for i in range(original_count) if i not in previous]
    removed = sorted(set(previous) | {surviving[i] for i in plan.layers})
    model.config.prune_lab = {"layers": layer_shapes(model), "removed_layers": removed}


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    views = layer_views(model)
    plan.validate(views)
    for i, groups in plan.attn.items():
        prune_attention(views[i].attn, groups)
    for i, channels in plan.mlp.items():
        prune_mlp(views[i].mlp, channels)
    for i in plan.attn_blocks:             # the whole attention: 0 heads (the o_proj bias, if any, stays)
        prune_attention(views[i].attn, list(range(views[i].attn.num_kv_heads)))
    for i in plan.mlp_blocks:              # the whole MLP: width 0
        prune_mlp(views[i].mlp, list(range(views[i].mlp.width)))
    remove_layers(model, plan.layers)
    record_manifest(model, plan)
    return model


@torch.no_grad()
def zero_units(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """The masked twin of apply_plan: zero the o-columns / down-columns of the planned units.

    A model pruned by the plan must give the same logits as this one (the equivalence check).
    """
    views = layer_views(model)
    for i, groups in plan.attn.items():
        a = views[i].attn
        a.o.weight[:, head_rows(torch.as_tensor(groups), a.group_size * a.head_dim)] = 0
    for i, channels in plan.mlp.items():
        views[i].mlp.down.weight[:, torch.as_tensor(channels)] = 0
    for i in plan.attn_blocks:             # every unit of the block: its weight, not its bias
        views[i].attn.o.weight.zero_()
    for i in plan.mlp_blocks:
        views[i].mlp.down.weight.zero_()
    for i in plan.layers:
        for lin in (views[i].attn.o, views[i].mlp.down):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return model


def ensure_bias(lin: nn.Linear) -> None:
    """Give a bias-free linear a zero bias (Llama/Qwen o_proj and down_proj have none)."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                            device=lin.weight.device), requires_grad=lin.weight.requires_grad)
