"""Unit importance criteria (twin of conf/importance/*.yaml).

Each criterion maps (model, calibration batches) -> UnitScores. Gradient criteria run one
forward/backward per batch for all layers at once; accumulators are fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import decoder_layers, layer_views
from .errors import PruneLabError
from .gradients import GradientStatistics, checkpointed
from .scores import UnitScores, reduce_to_units
from .obs_importance import ObsError  # noqa: F401  (importance=obs)


def _decoder_linears(views):
    for v in views:
        yield from (v.attn.q, v.attn.k, v.attn.v, v.attn.o, *v.mlp.inputs, v.mlp.down)


def _param(lin, name):
    return getattr(lin, name)


class Importance:
    """Base class. `cacheable`: the pipeline may keep the scores in the score cache."""

    cacheable = True
    name = "importance"

    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        raise NotImplementedError


class Magnitude(Importance):
    """L1 norm of every weight of the unit: sum |θ|."""

    name = "magnitude"

    @torch.no_grad()
    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        return reduce_to_units(layer_views(model), lambda lin, n: _param(lin, n).abs())


class Random(Importance):
    """Uniform random unit scores from the job seed (the baseline every criterion must beat)."""

    name = "random"

    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        gen = torch.Generator().manual_seed(seed)
        views = layer_views(model)
        return UnitScores([torch.rand(v.attn.num_kv_heads, generator=gen) for v in views],
                          [torch.rand(v.mlp.width, generator=gen) for v in views])


class Taylor(Importance):
    """First-order Taylor |θ·g| (g = mean gradient over calibration batches).

    With second_order=True adds ½·θ²·E[g²] (diagonal Fisher), accumulated per unit batch by batch
    so no full-size second-moment copy is kept. Gradients are folded into fp32 accumulators as
    autograd produces them and freed at once (prune_lab/gradients.py); `offload=True` keeps the
    per-weight accumulators in CPU memory and `gradient_checkpointing=True` recomputes each decoder
    layer's activations in the backward pass: together they leave the weights, one layer's
    activations and one layer's gradients on the device.
    """

    def __init__(self, second_order: bool = False, offload: bool = False,
                 gradient_checkpointing: bool = False):
        self.second_order, self.offload = second_order, offload
        self.gradient_checkpointing = gradient_checkpointing
        self.name = "taylor_2nd" if second_order else "taylor"

    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        views = layer_views(model)
        saved_flags = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        stats = GradientStatistics(views, self.second_order, self.offload)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in stats.params:
            p.requires_grad_(True)
        model.eval()
        try:
            with stats, checkpointed(decoder_layers(model), self.gradient_checkpointing):
                for batch in tqdm(batches, desc=self.name, leave=False):
                    batch = batch.to(model.device)
                    model(batch, labels=batch, use_cache=False).loss.backward()
        finally:
            for p, flag in saved_flags.items():
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)
        return stats.scores(len(batches))


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

        handles = [lin.register_forward_hook(hook) for lin in linears]
        try:
            for batch in tqdm(batches, desc=self.name, leave=False):
                model(batch.to(model.device))
        finally:
            for h in handles:
                h.remove()
        norms = {lin: s.sqrt() for lin, s in sq.items()}

        def per_weight(lin, name):
            p = _param(lin, name).float().abs()
            if name == "bias":    # a bias sees a constant input of 1 per token
                return p * torch.sqrt(torch.tensor(float(sum(b.numel() for b in batches))))
            return p * norms[lin]
        return reduce_to_units(views, per_weight)


class _Fluctuation:
    """Engine method: one stage with the two consumers; keeps their input stats, changes nothing."""

    needs_gram = needs_cross = needs_residual = False

    def __init__(self):
        self.stats: dict[int, dict] = {}

    def stages(self, view):
        return [["attn.o", "mlp.down"]]

    def apply(self, index, view, stats):
        self.stats[index] = stats
        return {}


class Flap(Importance):
    """FLAP's fluctuation: per input feature of o_proj/down_proj, var(x) · ||W[:, j]||² (the output
    variance the unit carries, which a bias cannot restore), summed over a GQA group's G·head_dim
    columns. Computed in the layer-sequential engine without gradients (dense path)."""

    name = "flap"

    def __init__(self, engine=None):
        self.engine = engine

    @torch.no_grad()
    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        from .engine import Engine
        method = _Fluctuation()
        (self.engine or Engine(str(model.device))).walk(model, batches, method, propagate="dense")
        attn, mlp = [], []
        for v in layer_views(model):
            s = method.stats[v.index]
            o = s["attn.o"].var * v.attn.o.weight.float().pow(2).sum(0)
            attn.append(o.reshape(v.attn.num_kv_heads, -1).sum(1).cpu())
            mlp.append((s["mlp.down"].var * v.mlp.down.weight.float().pow(2).sum(0)).cpu())
        return UnitScores(attn, mlp)


class FromFile(Importance):
    """Unit scores saved by an earlier run (scores.safetensors; a run dir also works): analyse once,
    prune many times. Shapes are checked against the model by the allocator."""

    cacheable = False
    name = "file"

    def __init__(self, path: str):
        self.path = scores_file(path, "scores.safetensors")

    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        try:
            scores = UnitScores.load(self.path)
        except Exception as e:     # not a safetensors file
            raise PruneLabError(f"'{self.path}' is not a unit-score file: {type(e).__name__}") from None
        if not scores.attn:
            raise PruneLabError(f"'{self.path}' holds no unit scores (attn.<i>/mlp.<i> tensors)")
        return scores


def scores_file(path: str, default_name: str) -> Path:
    """`path`, or `path/default_name` when path is a run dir; fails at build time if missing."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise PruneLabError(f"score file '{p}' does not exist (run an analyse job first: allocator=none)")
    return p
