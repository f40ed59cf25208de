"""The positions an N:M keep-mask keeps: of every M consecutive inputs of a row exactly K = M − N, each
stored as its offset in its group at ceil(log2 M) bits (2:4: two 2-bit offsets per four weights). Pure tensor
code for the packed checkpoint (artifacts/packed.py, artifacts/sparse.py)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def offset_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def kept_offsets(mask: Tensor, m: int) -> Tensor | None:
    """(rows, cols // m, K) offsets of the kept inputs of every group, ascending; None when the mask does not
    keep the same K in every group (not N:M)."""
    rows, cols = mask.shape
    if cols % m:
        return None
    groups = mask.reshape(rows, cols // m, m)
    counts = groups.sum(-1)
    k = int(counts.flatten()[0]) if counts.numel() else 0
    if k in (0, m) or not bool((counts == k).all()):
        return None
    return torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :k]


def columns(offsets: Tensor, m: int) -> Tensor:
    """(rows, groups·K) column of every kept weight."""
    rows, groups, k = offsets.shape
    return (offsets + m * torch.arange(groups)[None, :, None]).reshape(rows, groups * k)


def gather(w: Tensor, offsets: Tensor, m: int) -> Tensor:
    return w.gather(1, columns(offsets, m))


def scatter(values: Tensor, offsets: Tensor, m: int, cols: int) -> Tensor:
    """The dense matrix: the kept values at their columns, 0 elsewhere."""
    out = torch.zeros(values.shape[0], cols, dtype=values.dtype)
    return out.scatter_(1, columns(offsets, m), values)
