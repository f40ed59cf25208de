"""Input statistics of the nn.Linears of one engine stage over calibration tokens (fp32), accumulated
batch by batch: one Accumulator per distinct input (q/k/v share one, gate/up another), one InputStats
per linear whose per-input tensors are the shared ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import PruneLabError

PANEL = 256     # the Gram's upper triangle is accumulated in row panels of this many features


@dataclass
class InputStats:
    """Statistics of one nn.Linear's input features over the calibration tokens (fp32).

    Two streams (X on the dense path, X~ on the modified one): what the refits read of the dense path
    is W₀·C and tr(W₀ D W₀ᵀ) (W₀ = the linear's weight on the dense path), kept as `target` and
    `dense_energy`; the full C and D only when the method declares needs_dense_grams. On one stream
    C == D == G: `cross` and `dense_gram` are the Gram itself and `target`/`dense_energy` stay None
    (w_cross / w_energy compute them from it)."""

    sum: Tensor                       # (in,) sum x
    sum_sq: Tensor                    # (in,) sum x^2
    abs_sum: Tensor                   # (in,) sum |x|
    count: int                        # tokens accumulated (padding excluded)
    gram: Tensor | None = None        # (in, in) sum x~ x~ᵀ on the stream the layer sees
    cross: Tensor | None = None       # (in, in) sum x x~ᵀ, x on the dense path (== gram on one stream)
    dense_gram: Tensor | None = None  # (in, in) sum x xᵀ on the dense path (== gram on one stream)
    dense_sum: Tensor | None = None   # (in,) sum x on the dense path (== sum on one stream)
    resid_cross: Tensor | None = None  # (out, in) sum (h - h~) x~ᵀ: residual-stream drift where the output lands
    resid_sum: Tensor | None = None    # (out,) sum (h - h~)
    target: Tensor | None = None       # (out, in) W₀·C = sum (W₀ x) x~ᵀ (two streams)
    dense_energy: Tensor | None = None  # () sum ||W₀ x||² = tr(W₀ D W₀ᵀ) (two streams)

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> Tensor:
        """Population variance per feature."""
        return (self.sum_sq / max(self.count, 1) - self.mean ** 2).clamp_min(0)

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.count, 1)

    def w_cross(self, w: Tensor) -> Tensor:
        """W₀·C in float64 (`w` = the linear's weight before the method changed it, bias excluded)."""
        return self.target.double() if self.target is not None else w.double() @ self.cross.double()

    def w_energy(self, w: Tensor) -> Tensor:
        """tr(W₀ D W₀ᵀ) = ||W₀ X||² in float64 (a 0-dim tensor)."""
        if self.dense_energy is not None:
            return self.dense_energy.double()
        w = w.double()
        return ((w @ self.dense_gram.double()) * w).sum()


class Accumulator:
    """fp32 accumulators of one input shared by the linears `lins` (path -> nn.Linear on the modified
    layer), fed by forward hooks; the token mask drops padding.

    gram: X~X~ᵀ; cross: two streams (then `dense(path, x, y)` hands each batch's dense-path input x and
    output y of a linear before `add(x~)`). Per linear the two-stream W₀·C is summed from its outputs,
    Σ (y - b) x~ᵀ, when that is cheaper than the shared C (Σ out < in: o_proj, down_proj), else taken
    from C at the end. `residual` paths also get Σ (h - h~) x~ᵀ (res_dense / res_pruned set by hooks)."""

    def __init__(self, lins: dict[str, nn.Linear], gram: bool, cross: bool, device, residual=(),
                 dense_grams: bool = False):
        lin0 = next(iter(lins.values()))
        n = lin0.in_features
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.lins, self.two = lins, cross
        self.sum, self.sum_sq, self.abs_sum, self.count = z(n), z(n), z(n), 0
        self.gram = z(n, n) if gram or cross else None
        outs = sum(lin.out_features for lin in lins.values()) * (1 if lin0.weight.dtype == torch.float32 else 2)
        self.full = cross and (dense_grams or outs > n)     # C itself when cheaper than Σ (W₀x) x~ᵀ
        self.cross = z(n, n) if self.full else None
        self.dense_gram = z(n, n) if cross and dense_grams else None
        self.dense_sum = z(n) if cross else None
        self.target = {p: z(lin.out_features, n) for p, lin in lins.items()} if cross and not self.full else {}
        self.energy = {p: torch.zeros((), dtype=torch.float64, device=device) for p in lins} if cross else {}
        self.resid = {p: (z(lins[p].out_features, n), z(lins[p].out_features)) for p in residual}
        self.dense_x: Tensor | None = None
        self.dense_y: dict[str, Tensor] = {}
        self.res_dense: Tensor | None = None     # set by the residual hooks before each add
        self.res_pruned: Tensor | None = None
        self.seen: Tensor | None = None          # this batch's hook input (siblings must see the same)
        self.dense_seen: Tensor | None = None

    def next_batch(self) -> None:
        self.seen = self.dense_seen = None

    def pruned(self, x: Tensor, mask: Tensor | None) -> None:
        """Hook input of a linear on the modified layer: the first of the siblings adds it."""
        if self.seen is None:
            self.seen = x
            self.add(token_rows(x, mask))
        elif x is not self.seen:
            raise PruneLabError(f"{', '.join(self.lins)} do not share one input tensor: unsupported layer")

    def dense(self, path: str, x: Tensor, y: Tensor, mask: Tensor | None) -> None:
        """Hook input x and output y of linear `path` on the dense path, for the coming add."""
        if self.dense_seen is None:
            self.dense_seen, rows = x, token_rows(x, mask)
            self.dense_sum += rows.sum(0)
            self.dense_x = rows
        elif x is not self.dense_seen:
            raise PruneLabError(f"{', '.join(self.lins)} do not share one input tensor: unsupported layer")
        lin = self.lins[path]
        if path in self.target and y.dtype != torch.float32:     # W₀x in fp32 for W₀·C (bf16 y is rounded)
            y = self.dense_x @ lin.weight.detach().float().T
        else:                                                     # (||W₀x||² is a record: y as it is)
            y = token_rows(y, mask).float()
            y = y if lin.bias is None else y - lin.bias.detach().float()
        self.energy[path] += y.square().sum(dtype=torch.float64)
        if path in self.target:
            self.dense_y[path] = y

    def pruned_hook(self, cur: dict):
        return lambda _mod, inputs, _out: self.pruned(inputs[0], cur["mask"])

    def dense_hook(self, cur: dict, path: str):
        return lambda _mod, inputs, out: self.dense(path, inputs[0], out, cur["mask"])

    def residual_hook(self, cur: dict, slot: str):
        """Forward pre-hook on the norm whose input is the residual stream (slot res_dense / res_pruned)."""
        return lambda _mod, inputs: setattr(self, slot, token_rows(inputs[0], cur["mask"]))

    def take_dense(self) -> tuple:
        """What the dense path left for the coming add (kept for a later stage's pass)."""
        x = self.dense_x if self.cross is not None or self.dense_gram is not None else None
        out = (x, self.dense_y, self.res_dense)
        self.dense_x, self.dense_y, self.res_dense = None, {}, None
        return out

    def give_dense(self, taped: tuple) -> None:
        self.dense_x, self.dense_y, self.res_dense = taped

    def add(self, x: Tensor) -> None:
        self.sum += x.sum(0)
        self.sum_sq += x.pow(2).sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]
        if self.gram is not None:
            add_gram(self.gram, x)
        if self.two:
            d, self.dense_x = self.dense_x, None
            if self.cross is not None:
                self.cross.addmm_(d.T, x)
            if self.dense_gram is not None:
                add_gram(self.dense_gram, d)
            for p, y in self.dense_y.items():
                self.target[p].addmm_(y.T, x)
            self.dense_y = {}
        if self.resid:
            r = self.res_dense - self.res_pruned
            for cross, total in self.resid.values():
                cross.addmm_(r.T, x)
                total += r.sum(0)

    def stats(self) -> dict[str, InputStats]:
        for g in (self.gram, self.dense_gram):
            if g is not None:
                mirror(g)
        single = not self.two
        cross = self.gram if single else self.cross
        out = {}
        for p, lin in self.lins.items():
            target = self.target.get(p)
            if target is None and self.full:
                target = lin.weight.detach().double() @ self.cross.double()
            out[p] = InputStats(self.sum, self.sum_sq, self.abs_sum, self.count, self.gram, cross,
                                self.gram if single else self.dense_gram, self.sum if single else self.dense_sum,
                                *self.resid.get(p, (None, None)), target, self.energy.get(p))
        return out


def add_gram(g: Tensor, x: Tensor) -> None:
    """g += xᵀx on the upper triangle only (row panels of PANEL features; `mirror` fills the rest)."""
    n = x.shape[1]
    for i in range(0, n, PANEL):
        g[i:i + PANEL, i:].addmm_(x[:, i:i + PANEL].T, x[:, i:])


def mirror(g: Tensor) -> None:
    """Copy the upper triangle that add_gram accumulated onto the lower one (below the diagonal panels)."""
    for i in range(0, g.shape[0], PANEL):
        g[i + PANEL:, i:i + PANEL] = g[i:i + PANEL, i + PANEL:].T


def token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return x if mask is None else x[mask.reshape(-1)]


def output_error(w_new: Tensor, g: Tensor, wc: Tensor, energy: Tensor) -> float:
    """||W X - W' X~||² from the statistics: G = X~X~ᵀ, W·C = W X X~ᵀ, energy = ||W X||² (w_new: full
    width, zero columns where removed)."""
    w_new = w_new.detach().double()
    err = energy - 2 * (wc * w_new).sum() + (w_new @ g * w_new).sum()
    return float(err.clamp_min(0))
