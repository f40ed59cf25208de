"""Run a model's decoder from layer `begin` on kept inputs: layers before it stand in (computing
nothing, the last of them returning the kept input of layer `begin`), so the model's own embedding,
masks, rotary tables, final norm and head are used as in a full forward on every architecture."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...core.adapter import layer_container


class _StandIn(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):        # the model picks each layer's mask by it
            self.attention_type = layer.attention_type
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.value is None else self.value


class Prefix:
    def __init__(self, model: nn.Module):
        self.model = model
        self.container = layer_container(model)
        self.n_layers = len(self.container.layers)

    @torch.no_grad()
    def run(self, batch: torch.Tensor, begin: int, kept: list | None) -> tuple[torch.Tensor, list]:
        """(final hidden states, the input of every layer). `kept`: the inputs of layers < begin
        (required when begin > 0; its entries are reused, not copied)."""
        layers = self.container.layers
        inputs: list = list(kept[:begin]) if begin else []
        hooks = [layer.register_forward_pre_hook(self._keep(inputs), with_kwargs=True)
                 for layer in list(layers)[begin:]]
        stand = [_StandIn(layer) for layer in list(layers)[:begin]]
        if begin:
            stand[-1].value = kept[begin]
        try:
            if begin:
                self.container.layers = nn.ModuleList(stand + list(layers)[begin:])
            hidden = self.model.model(input_ids=batch, use_cache=False).last_hidden_state
        finally:
            self.container.layers = layers
            for h in hooks:
                h.remove()
        return hidden, inputs

    @staticmethod
    def _keep(inputs: list):
        def hook(module, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])
        return hook
