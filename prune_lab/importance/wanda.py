"""importance=wanda."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.adapter import layer_views
from ..core.scores import UnitScores
from ..engine.hooks import Hooks
from .base import Importance
from .units import reduce_to_units


def _decoder_linears(views):
    for v in views:
        yield from (v.attn.q, v.attn.k, v.attn.v, v.attn.o, *v.mlp.inputs, v.mlp.down)


class Wanda(Importance):
    """|θ|·‖x‖: weight magnitude times the L2 norm of its input feature over calibration tokens."""

    name = "wanda"

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        views = layer_views(model)
        linears = list(_decoder_linears(views))
        sq = {lin: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
              for lin in linears}

        def hook(lin, inputs, _out):
            x = inputs[0].detach().float()
            sq[lin] += x.reshape(-1, x.size(-1)).pow(2).sum(0)

        with Hooks() as hooks:
            for lin in linears:
                hooks.add(lin.register_forward_hook(hook))
            for batch in tqdm(batches, desc=self.name, leave=False):
                model(batch.to(model.device))
        norms = {lin: s.sqrt() for lin, s in sq.items()}

        def per_weight(term):
            p = term.param.float().abs()
            if term.name == "bias":    # a bias sees a constant input of 1 per token
                return p * torch.sqrt(torch.tensor(float(sum(b.numel() for b in batches))))
            return p * norms[term.lin]
        return reduce_to_units(views, per_weight)
