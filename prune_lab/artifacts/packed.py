"""Packed integer weights of a quantized checkpoint (output.save_model=true after quant=uniform|mixed).

Every quantized decoder linear is stored as its integer codes q, each row at its own bit width (quant=mixed
gives rows different widths; quant=uniform one), packed into a bit stream, plus its grid: a float32 scale
and an integer zero point per (row, group of group_size columns). The weight is scale·(q − zero), the very
float32 operation the quantizer rounded with (quant/grid.py), so `prune_lab.load_pruned` rebuilds the
evaluated weights bit for bit; a linear whose weights do not decode to themselves exactly stays a float
tensor (a warning). An N:M-sparse quantized linear (method.prune_n/prune_m) stores only the codes of its kept
weights, plus their offsets in their groups (artifacts/nm_index.py): 2:4 at 4 bits is 3 bits per weight.
File: quantized.safetensors beside model.safetensors, which then lacks those weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import nm_index, sparse
from .bitstream import pack, pack_offsets, unpack, unpack_offsets

log = logging.getLogger("prune_lab")
FILE = "quantized.safetensors"


def _groups(cols: int, group_size: int | None) -> torch.Tensor:
    return torch.arange(cols) // (group_size or cols)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
               at: torch.Tensor | None = None, cols: int | None = None) -> torch.Tensor:
    """scale·(q − zero) of every code; `at` (rows, n): the column of each code in a matrix of `cols` columns
    (the kept weights of an N:M linear), else the codes are the whole rows."""
    if at is None:
        g = _groups(codes.shape[1], group_size)
        return scale[:, g] * (codes.to(torch.float32) - zero[:, g].to(torch.float32))
    g = at // (group_size or cols)
    return scale.gather(1, g) * (codes.to(torch.float32) - zero.to(torch.float32).gather(1, g))


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor,
             group_size: int | None) -> torch.Tensor:
    g = _groups(w.shape[1], group_size)
    maxq = (2 ** bits.to(torch.int64) - 1)[:, None]
    q = torch.round(w.float() / scale[:, g]) + zero[:, g]
    return torch.minimum(torch.clamp(q, min=0).to(torch.int64), maxq)


def split(tensors: dict[str, torch.Tensor], grids: dict, masks: dict | None = None) -> tuple[dict, dict, dict]:
    """(float tensors left, packed tensors, metadata) for the linears in `grids` ({HF weight name: dict(scale,
    zero, bits, group_size)}) whose weights decode exactly; those in `masks` ({HF weight name: dict(mask,
    prune_m)}, N:M keep-masks) store their kept codes only."""
    left, packed, meta, masks = dict(tensors), {}, {}, masks or {}
    for name, g in grids.items():
        w = tensors.get(name)
        if w is None:
            continue
        scale, zero, bits = g["scale"].float(), g["zero"].round().to(torch.int64), g["bits"].to(torch.int64)
        codes = codes_of(w, scale, zero, bits, g["group_size"])
        if not torch.equal(dequantize(codes, scale, zero, g["group_size"]).to(w.dtype), w):
            log.warning("checkpoint: %s is not on its recorded grid; stored as floats", name)
            continue
        base, m = name[: -len(".weight")], masks.get(name, {}).get("prune_m")
        offsets = nm_index.kept_offsets(masks[name]["mask"], m) if m else None
        if offsets is not None and bool((w[~masks[name]["mask"]] == 0).all()):     # the pruned weights are 0
            codes, m_meta = nm_index.gather(codes, offsets, m), {"prune_m": m, "kept": offsets.shape[-1]}
            packed[f"{base}.offsets"] = pack_offsets(offsets, m)
        else:
            m_meta = {}
        packed |= {f"{base}.qweight": pack(codes, bits), f"{base}.scales": scale.contiguous(),
                   f"{base}.zeros": zero.to(torch.uint8 if int(bits.max()) <= 8 else torch.int32), f"{base}.bits": bits.to(torch.uint8)}
        meta[name] = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."),
                      "group_size": g["group_size"], **m_meta}
        del left[name]
    return left, packed, meta


def describe(directory: Path) -> dict:
    """metrics.json's record of a checkpoint: its real size on disk, how many linears are packed integers and
    how many N:M-sparse float ones store only their kept weights."""
    return {"path": str(directory), "bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
            "packed_linears": len(packed_shapes(directory)), "nm_sparse_linears": len(sparse.sparse_shapes(directory))}


def stored(directory: Path) -> str | None:
    """What a checkpoint keeps outside model.safetensors (a plain HF load would miss it), or None."""
    files = {FILE: "packed integer weights", sparse.FILE: "N:M-packed weights"}
    found = [f"{what} ({f})" for f, what in files.items() if (directory / f).is_file()]
    return " and ".join(found) or None


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
            bits, cols = f.get_tensor(f"{base}.bits").to(torch.int64), m["shape"][1]
            grid = (f.get_tensor(f"{base}.scales"), f.get_tensor(f"{base}.zeros"), m["group_size"])
            if "prune_m" not in m:
                w = dequantize(unpack(f.get_tensor(f"{base}.qweight"), bits, cols), *grid)
            else:                     # N:M: the kept codes, scattered back to their columns
                offsets = unpack_offsets(f.get_tensor(f"{base}.offsets"), m["shape"], m["prune_m"], m["kept"])
                at = nm_index.columns(offsets, m["prune_m"])
                kept = dequantize(unpack(f.get_tensor(f"{base}.qweight"), bits, at.shape[1]), *grid, at=at, cols=cols)
                w = nm_index.scatter(kept, offsets, m["prune_m"], cols)
            out[name] = w.to(getattr(torch, m["dtype"]))
    return out
