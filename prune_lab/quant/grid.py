"""The quantization grid: min-max quantizer with one bit width per output row (and scales per group of
input columns), rounding onto it, round-to-nearest of a whole matrix. Pure tensor code; the GPTQ
error feedback that uses it is prune_lab/method/sweep.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PruneLabError

MAX_BITS = 16       # the widest grid a row may get (its levels 2^bits - 1 are exact in float32)


def check_bits_options(bits_options) -> None:
    """The bit widths a row may get (quant.bits_options of every quant option): integers in [1, 16]."""
    if not bits_options or any(int(b) != b or not 1 <= b <= MAX_BITS for b in bits_options):
        raise PruneLabError(f"quant.bits_options must be integers in [1, {MAX_BITS}], got {list(bits_options)}")


@dataclass
class RowQuantizer:
    """Min-max quantizer of a weight matrix with one bit width per output row (channel).

    sym: symmetric grid around 0 (zero point 2^(b-1)); else asymmetric min-max with an integer zero
    point. group_size: scales per group of that many input columns (None = one per row).
    """
    bits: Tensor                      # (rows,) integer bit widths
    sym: bool = True
    group_size: int | None = None

    def params(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, zero, maxq), each (rows, 1), from the columns `w` (rows, cols) of one group."""
        maxq = (2 ** self.bits.to(w.device, torch.float32) - 1)[:, None]
        xmin = w.min(1).values.clamp(max=0)
        xmax = w.max(1).values.clamp(min=0)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        empty = (xmax - xmin) == 0
        xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
        scale = ((xmax - xmin)[:, None] / maxq)
        zero = (maxq + 1) / 2 if self.sym else torch.round(-xmin[:, None] / scale)
        return scale, zero, maxq


@dataclass
class RecordingQuantizer(RowQuantizer):
    """A RowQuantizer that keeps the (scale, zero) of every group it computes. The sweep and round-to-nearest
    compute each group's once, in column order, so `grid()` is the linear's whole grid: (scale, zero), each
    (rows, groups), what output.gguf_type=q4_0|q4_1 writes."""
    seen: list = field(default_factory=list, repr=False)

    def params(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scale, zero, maxq = super().params(w)
        self.seen.append((scale, torch.as_tensor(zero, dtype=scale.dtype, device=scale.device).expand_as(scale)))
        return scale, zero, maxq

    def grid(self) -> tuple[Tensor, Tensor]:
        return torch.cat([s for s, _ in self.seen], 1).cpu(), torch.cat([z for _, z in self.seen], 1).cpu()


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: Tensor) -> Tensor:
    """Round `w` onto the grid scale·(q − zero), q ∈ {0..maxq}; 0 maps to exactly 0."""
    q = torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), maxq)
    return scale * (q - zero)


def quantize_rtn(w: Tensor, quantizer: RowQuantizer) -> Tensor:
    """Round-to-nearest of a whole matrix (no error feedback), group by group."""
    gs = quantizer.group_size or w.shape[1]
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], gs):
        out[:, c:c + gs] = quantize(w[:, c:c + gs], *quantizer.params(w[:, c:c + gs]))
    return out
