"""importance=obs: unit scores from what a refit cannot recover (reconstruction-aware global allocation).

Per layer, on the dense path in the engine, greedy structured OBS removes the GQA groups of o_proj and
the channels of down_proj one after another (with the optimal refit of the rest after each removal);
a unit's score is the output error it was removed at (made non-decreasing along the greedy order, so
the allocator takes each layer's units in that order). Errors are weighted per output feature by the
loss sensitivity E[g²] of that feature (g = d loss / d projection output, one backward per batch), so
that errors of different layers are on the scale of the loss: ½ Σ_o E[g_o²]·||δ_o||².
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..core.adapter import layer_views
from ..core.scores import UnitScores
from ..engine import Engine, LayerMethod
from ..engine.hooks import Hooks
from ..errors import PruneLabError
from ..reconstruct import refit
from .base import Importance


def output_sensitivity(model, batches) -> dict[int, dict[str, torch.Tensor]]:
    """Σ over tokens of (d loss / d output)² of every o_proj and down_proj, per output feature."""
    views = layer_views(model)
    acc = {v.index: {} for v in views}

    def make(index, kind):
        def fwd(_m, _i, out):
            def grad_hook(g):
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                acc[index][kind] = acc[index].get(kind, 0) + g2
            out.register_hook(grad_hook)
        return fwd
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with Hooks() as hooks:
            for v in views:
                hooks.add(v.attn.o.register_forward_hook(make(v.index, "attn")))
                hooks.add(v.mlp.down.register_forward_hook(make(v.index, "mlp")))
            embed = model.get_input_embeddings()
            for batch in tqdm(batches, desc="sensitivity", leave=False):
                batch = batch.to(model.device)
                x = embed(batch).detach().requires_grad_(True)     # a leaf that needs grad: the graph is built
                model(inputs_embeds=x, labels=batch).loss.backward()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return acc


class _GreedyErrors(LayerMethod):
    """Engine method: Gram of the o_proj/down_proj inputs -> greedy OBS error of every unit."""

    needs_gram = True

    def __init__(self, damp: float, weights, chunks: int):
        self.damp, self.weights, self.chunks = damp, weights, chunks
        self.attn: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}

    def stages(self, view):
        return [["attn.o", "mlp.down"]]

    @torch.no_grad()
    def apply(self, index, view, stats):
        a = view.attn
        for kind, lin, n, width, out in (("attn", a.o, a.num_kv_heads, a.group_size * a.head_dim, self.attn),
                                         ("mlp", view.mlp.down, view.mlp.width, 1, self.mlp)):
            g = stats["attn.o" if kind == "attn" else "mlp.down"].gram.double()
            f = self.weights[index][kind] if self.weights is not None else None
            chunk = max(1, (n - 1) // self.chunks)
            order, errors = refit.obs_select(lin.weight, g, n, width, n - 1, self.damp, chunk, f)
            errors = torch.tensor(errors, dtype=torch.float64).cummax(0).values
            score = torch.full((n,), float(errors[-1]) * 2 + 1e-30, dtype=torch.float64)
            score[torch.tensor(order)] = errors
            out[index] = score.float().cpu()
        return {}


class ObsError(Importance):
    """importance=obs (see the module docstring)."""

    name = "obs"
    version = 2          # refit.obs_select rewritten in 2ff3081 (lazy block downdates): older entries not trusted

    def __init__(self, damp: float = 0.01, weighted: bool = True, chunks: int = 64, engine=None):
        if chunks < 1:
            raise PruneLabError(f"importance.chunks must be >= 1 (greedy steps per layer and projection), got {chunks}")
        if not (damp > 0 and math.isfinite(damp)):
            raise PruneLabError(f"importance.damp must be a finite number > 0 (relative Gram damping), got {damp}")
        self.damp, self.weighted, self.chunks, self.engine = damp, weighted, chunks, engine

    def __call__(self, model, batches, seed: int = 0) -> UnitScores:
        weights = output_sensitivity(model, batches) if self.weighted else None
        method = _GreedyErrors(self.damp, weights, self.chunks)
        (self.engine or Engine(str(model.device))).walk(model, batches, method, propagate="dense")
        n = len(layer_views(model))
        return UnitScores([method.attn[i] for i in range(n)], [method.mlp[i] for i in range(n)])
