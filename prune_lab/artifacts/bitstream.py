"""Bit streams of the packed checkpoint: integers of a given width per row, least significant bit first, rows
one after another (the quantized codes of artifacts/packed.py, the N:M offsets of artifacts/nm_index.py)."""
from __future__ import annotations

import numpy as np
import torch

from . import nm_index

CHUNK = 1024                        # rows per step: bounds the bit-plane temporaries (rows·cols·bits bytes)


def _plane_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols, max bits): which bit planes of each code are stored (its row's width)."""
    width = int(bits.max())
    return (torch.arange(width)[None, :] < bits[:, None]).unsqueeze(1).expand(-1, cols, -1)


def pack(codes: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Row-major bit stream of the codes, each row at its own width (least significant bit first)."""
    width = int(bits.max())
    stream = []
    for r in range(0, codes.shape[0], CHUNK):
        c, b = codes[r:r + CHUNK], bits[r:r + CHUNK]
        planes = ((c[..., None] >> torch.arange(width)) & 1).to(torch.uint8)
        stream.append(planes[_plane_mask(b, c.shape[1])].numpy())
    return torch.from_numpy(np.packbits(np.concatenate(stream)))


def unpack(stream: torch.Tensor, bits: torch.Tensor, cols: int) -> torch.Tensor:
    flat = np.unpackbits(stream.numpy())
    out, at = [], 0
    for r in range(0, bits.shape[0], CHUNK):
        mask = _plane_mask(bits[r:r + CHUNK], cols)
        n = int(mask.sum())
        planes = torch.zeros(mask.shape, dtype=torch.int64)
        planes[mask] = torch.from_numpy(flat[at:at + n].astype(np.int64))
        out.append((planes << torch.arange(mask.shape[-1])).sum(-1))
        at += n
    return torch.cat(out)


def pack_offsets(offsets: torch.Tensor, m: int) -> torch.Tensor:
    """The (rows, groups, K) kept offsets of an N:M linear as one stream of ceil(log2 M)-bit numbers."""
    rows = offsets.shape[0]
    return pack(offsets.reshape(rows, -1), torch.full((rows,), nm_index.offset_bits(m)))


def unpack_offsets(stream: torch.Tensor, shape, m: int, kept: int) -> torch.Tensor:
    rows, cols = shape
    return unpack(stream, torch.full((rows,), nm_index.offset_bits(m)), cols // m * kept).reshape(rows, -1, kept)
