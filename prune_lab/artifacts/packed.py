"""Packed integer weights of a quantized checkpoint (output.save_model=true after quant=uniform|mixed).

Every quantized decoder linear is stored as its integer codes q, each row at its own bit width (quant=mixed
gives rows different widths; quant=uniform one), packed into a bit stream, plus its grid: a float32 scale
and an integer zero point per (row, group of group_size columns). The weight is scale·(q − zero), the very
float32 operation the quantizer rounded with (quant/grid.py), so `prune_lab.load_pruned` rebuilds the
evaluated weights bit for bit; a linear whose weights do not decode to themselves exactly stays a float
tensor (a warning). File: quantized.safetensors beside model.safetensors, which then lacks those weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("prune_lab")
FILE = "quantized.safetensors"


def _groups(cols: int, group_size: int | None) -> torch.Tensor:
    return torch.arange(cols) // (group_size or cols)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    g = _groups(codes.shape[1], group_size)
    return scale[:, g] * (codes.to(torch.float32) - zero[:, g].to(torch.float32))


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor,
             group_size: int | None) -> torch.Tensor:
    g = _groups(w.shape[1], group_size)
    maxq = (2 ** bits.to(torch.int64) - 1)[:, None]
    q = torch.round(w.float() / scale[:, g]) + zero[:, g]
    return torch.minimum(torch.clamp(q, min=0).to(torch.int64), maxq)


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


def split(tensors: dict[str, torch.Tensor], grids: dict) -> tuple[dict, dict, dict]:
    """(float tensors left, packed tensors, metadata) for the linears in `grids` ({HF weight name: dict(scale,
    zero, bits, group_size)}) whose weights decode exactly."""
    left, packed, meta = dict(tensors), {}, {}
    for name, g in grids.items():
        w = tensors.get(name)
        if w is None:
            continue
        scale, zero, bits = g["scale"].float(), g["zero"].round().to(torch.int64), g["bits"].to(torch.int64)
        codes = codes_of(w, scale, zero, bits, g["group_size"])
        if not torch.equal(dequantize(codes, scale, zero, g["group_size"]).to(w.dtype), w):
            log.warning("checkpoint: %s is not on its recorded grid; stored as floats", name)
            continue
        base = name[: -len(".weight")]
        packed |= {f"{base}.qweight": pack(codes, bits), f"{base}.scales": scale.contiguous(),
                   f"{base}.zeros": zero.to(torch.uint8 if int(bits.max()) <= 8 else torch.int32), f"{base}.bits": bits.to(torch.uint8)}
        meta[name] = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                      "group_size": g["group_size"]}
        del left[name]
    return left, packed, meta


def describe(directory: Path) -> dict:
    """metrics.json's record of a checkpoint: its real size on disk and how many linears are packed."""
    return {"path": str(directory), "bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
            "packed_linears": len(packed_shapes(directory))}


def write(directory: Path, packed: dict, meta: dict) -> None:
    if packed:
        save_file(packed, str(directory / FILE), metadata={"prune_lab_packed": json.dumps(meta)})


def packed_shapes(directory: Path) -> dict[str, tuple]:
    """{weight name: shape} of the packed weights (the safetensors header only), {} without the file."""
    if not (directory / FILE).is_file():
        return {}
    with safe_open(str(directory / FILE), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["prune_lab_packed"])
    return {name: tuple(m["shape"]) for name, m in meta.items()}


def read(directory: Path) -> dict[str, torch.Tensor]:
    """The packed weights, decoded to their saved dtype."""
    if not (directory / FILE).is_file():
        return {}
    out = {}
    with safe_open(str(directory / FILE), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["prune_lab_packed"])
        for name, m in meta.items():
            base = name[: -len(".weight")]
            bits = f.get_tensor(f"{base}.bits").to(torch.int64)
            codes = unpack(f.get_tensor(f"{base}.qweight"), bits, m["shape"][1])
            w = dequantize(codes, f.get_tensor(f"{base}.scales"), f.get_tensor(f"{base}.zeros"), m["group_size"])
            out[name] = w.to(getattr(torch, m["dtype"]))
    return out
