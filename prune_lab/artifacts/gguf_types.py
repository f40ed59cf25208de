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
    """(array, raw ggml type or None, type name) of one tensor. `grid` = (scale, zero, group size) of a
    quantized linear, scale and zero (rows, groups): the weight is written on it (kind q4_0 / q4_1)."""
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


def _per(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.float()[:, index]


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The integer codes q (0..15) of a weight on its grid w = scale·(q − zero), groups of group_size columns
    (None: one group per row; the last group may be shorter)."""
    group = torch.arange(w.shape[1]) // (group_size or w.shape[1])
    return torch.clamp(torch.round(w.float() / _per(scale, group)) + _per(zero, group), 0, 15).to(torch.uint8)


def grid_blocks(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
                kind: str) -> np.ndarray:
    """GGUF Q4_0 (d, 16 nibble bytes) or Q4_1 (d, m, 16 bytes) blocks of 32 columns, (rows, bytes); a block
    lies inside one group (group_size a multiple of 32)."""
    rows, cols = w.shape
    nb = cols // BLOCK
    codes = grid_codes(w, scale, zero, group_size).reshape(rows, nb, BLOCK)
    group = torch.arange(nb) * BLOCK // (group_size or cols)
    d, z = _per(scale, group), _per(zero, group)
    if kind == "q4_0" and not bool((z == 8).all()):
        raise ValueError("q4_0 needs the symmetric 4-bit grid (zero point 8)")
    packed = (codes[..., :16] | (codes[..., 16:] << 4)).numpy()
    heads = [d.numpy().astype(np.float16)] + ([(-d * z).numpy().astype(np.float16)] if kind == "q4_1" else [])
    parts = [h.view(np.uint8).reshape(rows, nb, 2) for h in heads] + [packed]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))
