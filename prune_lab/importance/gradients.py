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

from ..core.adapter import LayerView
from ..core.scores import UnitScores
from ..engine.hooks import Hooks
from .units import Term, unit_terms, zero_scores

# Elements per row block of the CPU elementwise work (1 MiB of fp32). A whole-tensor mixed-dtype op
# on CPU materialises a full-size fp32 temporary in fresh pages at every call; blocks of 2^18 elements
# stay in cache and in reused memory: 3-4x faster hooks on the ~1B shape (experiments/results/lean_grad.md).
CPU_BLOCK = 1 << 18


def row_blocks(t: torch.Tensor) -> list[slice]:
    """Row ranges for elementwise work on `t`: ~CPU_BLOCK elements each on CPU, one range on a GPU."""
    if t.device.type != "cpu" or t.dim() < 2:
        return [slice(None)]
    step = max(1, CPU_BLOCK // t[0].numel())
    return [slice(start, start + step) for start in range(0, t.shape[0], step)]


def blockwise(term: Term, rows: list[slice], per_weight) -> torch.Tensor:
    """term.reduce of a per-weight tensor produced row block by row block (per_weight(rows) -> fp32)."""
    if term.axis is None or len(rows) == 1:
        return term.reduce(per_weight(rows[0]))
    if term.axis == 1:                                      # per-row sums: each block gives its rows
        return term.units(torch.cat([per_weight(r).sum(1) for r in rows]))
    total = per_weight(rows[0]).sum(0)                      # per-column sums: add the blocks up
    for r in rows[1:]:
        total += per_weight(r).sum(0)
    return term.units(total)


class GradientStatistics:
    """Hooks on every decoder linear's parameters; `scores(n_batches)` gives the Taylor unit scores."""

    def __init__(self, views: list[LayerView], second_order: bool = False, offload: bool = False):
        self.views, self.second_order = views, second_order
        self.terms = [(v.index, t) for v in views for t in unit_terms(v)]
        self.params = [t.param for _, t in self.terms]
        self.grad_sum = {p: torch.zeros(p.shape, dtype=torch.float32, device="cpu" if offload else p.device)
                         for p in self.params}
        self._staging: dict[torch.dtype, torch.Tensor] = {}      # pinned host buffer per grad dtype
        self.fisher = zero_scores(views) if second_order else None
        self._hooks = Hooks()

    def __enter__(self) -> "GradientStatistics":
        for layer, term in self.terms:
            self._hooks.add(term.param.register_post_accumulate_grad_hook(
                functools.partial(self._fold, layer=layer, term=term)))
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @torch.no_grad()
    def _fold(self, p: torch.Tensor, layer: int, term: Term) -> None:
        g = p.grad
        acc = self.grad_sum[p]
        src = g if acc.device == g.device else self._to_host(g)
        for rows in row_blocks(acc):
            acc[rows].add_(src[rows])                       # fp32 += grad dtype: the cast fused
        if self.second_order:
            theta = p.detach()
            square = lambda rows: theta[rows].to(torch.float32, copy=True).mul_(g[rows]).square_()  # noqa: E731
            getattr(self.fisher, term.kind)[layer] += blockwise(term, row_blocks(theta), square)  # Σ(θ·g)²
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
        for layer, term in self.terms:
            p = term.param
            theta, acc = p.detach(), self.grad_sum[p]

            def per_weight(rows, theta=theta, acc=acc):
                return theta[rows].to(acc.device, torch.float32, copy=True).mul_(acc[rows]).abs_()
            getattr(out, term.kind)[layer] += (blockwise(term, row_blocks(acc), per_weight)
                                               / n_batches).to(p.device)      # |θ·Σg|/n
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
