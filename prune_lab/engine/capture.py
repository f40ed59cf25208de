"""Capture of what a model passes its decoder layers: recorder modules stand in for the layers; an
attention stand-in lets the engine rerun a layer whose attention changed only in o_proj."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from ..core.adapter import layer_container
from ..errors import PruneLabError


class _StopCapture(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, computes nothing."""

    def __init__(self, index: int, last: bool, attention_type: str | None, sink: list):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise PruneLabError("decoder layer called with positional extras: unsupported model")
        self.sink.append((hidden_states, kwargs))
        if self.last:
            raise _StopCapture
        return hidden_states


class AttentionStandIn(nn.Module):
    """Stands in for a layer's self_attn: o_proj applied to the o_proj inputs `z` kept from an earlier
    pass of the same batch (valid while nothing before o_proj has changed since)."""

    def __init__(self, o_proj: nn.Module, z: Tensor):
        super().__init__()
        self.o_proj, self.z = o_proj, z

    def forward(self, *args, **kwargs):
        return self.o_proj(self.z), None


def split_batch(batch) -> tuple[Tensor, Tensor | None]:
    """A batch is input ids [B, T] or a mapping with input_ids and an optional attention_mask."""
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    return batch, None


@torch.no_grad()
def capture(model: nn.Module, batches, device, store) -> tuple[list, list, list]:
    """Hidden states entering layer 0 (on `store`), per-layer kwargs (per batch) and token masks."""
    container = layer_container(model)          # model.model (model.model.decoder on OPT)
    layers = container.layers
    hidden, kwargs, masks = [], [], []
    sink: list = []
    recorders = nn.ModuleList(_Recorder(i, i == len(layers) - 1, getattr(layer, "attention_type", None), sink)
                              for i, layer in enumerate(layers))
    container.layers = recorders
    try:
        for batch in batches:
            ids, attn_mask = split_batch(batch)
            sink.clear()
            try:
                model.model(input_ids=ids.to(device),
                            attention_mask=None if attn_mask is None else attn_mask.to(device),
                            use_cache=False)
            except _StopCapture:
                pass
            hidden.append(sink[0][0].to(store))
            kwargs.append([kw for _, kw in sink])
            masks.append(None if attn_mask is None else attn_mask.bool().to(device))
    finally:
        container.layers = layers
    return hidden, kwargs, masks


def to_device(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
