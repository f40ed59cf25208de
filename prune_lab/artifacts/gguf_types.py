"""Tensor encodings of a GGUF export: f32, f16, bf16 and q8_0 (llama.cpp's own rounding, gguf.quants), and
q4_0 / q4_1 written exactly on the 4-bit grid a quant=uniform run left (prune_lab's integer codes; the
per-group scale, and for q4_1 the offset −scale·zero, stored as fp16 as GGUF blocks hold them).

Norms and biases (1-D) stay f32, as llama.cpp's convert script writes them. A q8_0 (or q4) matrix whose row
length is not a multiple of 32 (a GGUF block) is written f16 instead; the export records which.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
GRID_TYPES = ("q4_0", "q4_1")


def encode(gguf, t: torch.Tensor, kind: str, grid=None) -> tuple[np.ndarray, object, str]:
    """(array, raw ggml type or None, type name) of one tensor. `grid` = (scale, zero) of a quantized
    linear, each (rows, groups): the weight is written on it (kind q4_0 / q4_1)."""
    arr = t.detach().to(torch.float32).cpu().contiguous().numpy()
    q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or kind == "f32":
        return arr, None, "F32"
    if kind in GRID_TYPES and grid is not None:
        return grid_blocks(t, *grid, kind), getattr(q, kind.upper()), kind.upper()
    if kind == "q8_0" and arr.shape[-1] % BLOCK == 0:
        return gguf.quants.quantize(arr, q.Q8_0), q.Q8_0, "Q8_0"
    if kind == "bf16":
        return gguf.quants.quantize(arr, q.BF16), q.BF16, "BF16"
    return arr.astype(np.float16), None, "F16"


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The integer codes q (0..15) of a weight on its grid w = scale·(q − zero), groups of columns."""
    groups = scale.shape[1]
    size = w.shape[1] // groups
    s = scale.float().repeat_interleave(size, dim=1)
    z = zero.float().expand_as(scale).repeat_interleave(size, dim=1)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 15).to(torch.uint8)


def grid_blocks(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kind: str) -> np.ndarray:
    """GGUF Q4_0 (d, 16 nibble bytes) or Q4_1 (d, m, 16 bytes) blocks of 32 columns, (rows, bytes)."""
    rows, cols = w.shape
    nb = cols // BLOCK
    codes = grid_codes(w, scale, zero).reshape(rows, nb, BLOCK)
    per = nb // scale.shape[1]                      # blocks per quantization group
    d = scale.float().repeat_interleave(per, dim=1)
    z = zero.float().expand_as(scale).repeat_interleave(per, dim=1)
    packed = (codes[..., :16] | (codes[..., 16:] << 4)).numpy()
    heads = [d.numpy().astype(np.float16)]
    if kind == "q4_1":
        heads.append((-d * z).numpy().astype(np.float16))
    if kind == "q4_0":                               # the symmetric grid's zero point is 8: x = d·(q − 8)
        assert bool((z == 8).all()), "q4_0 needs the symmetric 4-bit grid"
    parts = [h.view(np.uint8).reshape(rows, nb, 2) for h in heads] + [packed]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))
