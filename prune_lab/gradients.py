"""Streaming gradient statistics for the Taylor criteria (memory-lean, one backward per batch).

Each decoder weight's gradient is folded into its accumulator the moment autograd produces it
(a post-accumulate-grad hook) and then freed, so no full set of `.grad` tensors is ever alive:

* first order: the fp32 sum of gradients per weight (|θ·ḡ| needs the per-weight mean before the
  absolute value), kept on the model's device or, with `offload=True`, in CPU memory (each
  gradient crosses through one reused pinned buffer);
* second order: ½·θ²·E[g²] reduced per unit inside the hook (a few numbers per layer).

`checkpointed(model)` recomputes each decoder layer's activations in the backward pass instead
of storing them (gradient checkpointing), independent of train/eval mode.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .adapter import LayerView
from .scores import UnitScores, unit_terms, zero_scores


class GradientStatistics:
    """Hooks on every decoder linear's parameters; `scores(n_batches)` gives the Taylor unit scores."""

    def __init__(self, views: list[LayerView], second_order: bool = False, offload: bool = False):
        self.views, self.second_order = views, second_order
        self.terms = [(v.index, lin, name, kind, reduce) for v in views
                      for lin, name, kind, reduce in unit_terms(v)]
        self.params = [getattr(lin, name) for _, lin, name, _, _ in self.terms]
        self.grad_sum = {p: torch.zeros(p.shape, dtype=torch.float32, device="cpu" if offload else p.device)
                         for p in self.params}
        self._staging: dict[torch.dtype, torch.Tensor] = {}      # pinned host buffer per grad dtype
        self.fisher = zero_scores(views) if second_order else None
        self._handles = []

    def __enter__(self) -> "GradientStatistics":
        for layer, lin, name, kind, reduce in self.terms:
            p = getattr(lin, name)
            self._handles.append(p.register_post_accumulate_grad_hook(
                functools.partial(self._fold, layer=layer, kind=kind, reduce=reduce)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _fold(self, p: torch.Tensor, layer: int, kind: str, reduce) -> None:
        g = p.grad
        acc = self.grad_sum[p]
        acc.add_(g if acc.device == g.device else self._to_host(g))   # mixed dtypes: one fused pass
        if self.second_order:
            sq = p.detach().to(torch.float32, copy=True).mul_(g).square_()   # (θ·g)², one tensor at a time
            getattr(self.fisher, kind)[layer] += reduce(sq)
        p.grad = None

    def _to_host(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient in host memory, through one reused pinned buffer (fast device-to-host copy)."""
        if g.device.type != "cuda":
            return g.to("cpu")
        need = max(p.numel() for p in self.params)
        buf = self._staging.get(g.dtype)
        if buf is None:
            buf = self._staging[g.dtype] = torch.empty(need, dtype=g.dtype, pin_memory=True)
        return buf[: g.numel()].view(g.shape).copy_(g)

    @torch.no_grad()
    def scores(self, n_batches: int) -> UnitScores:
        """|θ·ḡ| per weight summed per unit (+ ½·θ²·E[g²] with second_order)."""
        out = zero_scores(self.views)
        for layer, lin, name, kind, reduce in self.terms:
            p = getattr(lin, name)
            acc = self.grad_sum[p]
            per_weight = p.detach().to(acc.device, torch.float32, copy=True).mul_(acc).abs_()
            getattr(out, kind)[layer] += (reduce(per_weight) / n_batches).to(p.device)   # |θ·Σg|/n
        if self.second_order:
            for s, f in zip(out.attn + out.mlp, self.fisher.attn + self.fisher.mlp):
                s += 0.5 * f / n_batches
        return out


@contextlib.contextmanager
def checkpointed(layers: nn.ModuleList, enabled: bool = True):
    """Gradient checkpointing of every decoder layer (non-reentrant), in train or eval mode.

    Callers must run the model with use_cache=False (a recomputed layer would update a cache twice).
    """
    if not enabled:
        yield
        return
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward      # back to the class's forward
            else:
                layer.forward = own
