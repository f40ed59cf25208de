"""N:M-sparse float weights of a checkpoint stored compactly (output.save_model=true after
method=sparsegpt|wanda|magnitude with method.prune_n/prune_m and no quant): per linear the K = M − N kept
weights of every group of M inputs, in the model's dtype, and their offsets in their groups as one bit stream
(artifacts/nm_index.py; 2:4 in fp32: 2·32 + 2·2 bits per 4 weights, 17 bits a weight instead of 32).
`prune_lab.load_pruned` scatters them back: every kept value bit for bit, the pruned ones 0 (a −0.0 left by
masking comes back +0.0, the same value). A mask that is not N:M, or a pruned weight that is not 0, keeps the
linear dense. File: sparse.safetensors beside model.safetensors, which then lacks those weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import nm_index
from .bitstream import pack_offsets, unpack_offsets

FILE = "sparse.safetensors"
KEY = "prune_lab_sparse"


def split(tensors: dict[str, torch.Tensor], masks: dict) -> tuple[dict, dict, dict]:
    """(dense tensors left, sparse tensors, metadata) for the float linears in `masks` ({HF weight name:
    dict(mask, prune_m)}) still in `tensors` (artifacts/packed.py took the quantized ones)."""
    left, sparse, meta = dict(tensors), {}, {}
    for name, entry in masks.items():
        w, mask, m = tensors.get(name), entry["mask"], entry["prune_m"]
        offsets = nm_index.kept_offsets(mask, m) if w is not None and w.shape == mask.shape else None
        if offsets is None or not bool((w[~mask] == 0).all()):
            continue
        base = name[: -len(".weight")]
        sparse |= {f"{base}.values": nm_index.gather(w, offsets, m).contiguous(),
                   f"{base}.offsets": pack_offsets(offsets, m)}
        meta[name] = {"shape": list(w.shape), "prune_m": m, "kept": offsets.shape[-1]}
        del left[name]
    return left, sparse, meta


def write(directory: Path, sparse: dict, meta: dict) -> None:
    if sparse:
        save_file(sparse, str(directory / FILE), metadata={KEY: json.dumps(meta)})


def _meta(f) -> dict:
    return json.loads((f.metadata() or {})[KEY])


def sparse_shapes(directory: Path) -> dict[str, tuple]:
    """{weight name: dense shape} of the N:M-packed weights (the header only), {} without the file."""
    if not (directory / FILE).is_file():
        return {}
    with safe_open(str(directory / FILE), framework="pt") as f:
        return {name: tuple(m["shape"]) for name, m in _meta(f).items()}


def read(directory: Path) -> dict[str, torch.Tensor]:
    """The N:M-packed weights, dense again."""
    if not (directory / FILE).is_file():
        return {}
    out = {}
    with safe_open(str(directory / FILE), framework="pt") as f:
        for name, m in _meta(f).items():
            base = name[: -len(".weight")]
            offsets = unpack_offsets(f.get_tensor(f"{base}.offsets"), m["shape"], m["prune_m"], m["kept"])
            out[name] = nm_index.scatter(f.get_tensor(f"{base}.values"), offsets, m["prune_m"], m["shape"][1])
    return out
