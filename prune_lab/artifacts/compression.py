"""What an unstructured / quantized engine pass did to the model: statistics (per linear, per layer,
overall), the effective size in bytes, and the masks + bit map files.

Checkpoint format (output.save_model=true): the model directory of prune_lab.checkpoint, whose quantized
linears are packed integers + float32 scales + zero points in quantized.safetensors (artifacts/packed.py;
`prune_lab.load_pruned` decodes them to the evaluated model bit for bit), plus
compression.safetensors (per linear "<layer>.<path>.mask" packed bits, row-major, and
"<layer>.<path>.bits" bits per output row) and compression.json (method, quant, shapes, summary).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..core.adapter import layer_views, view_linears

FILE, META = "compression.safetensors", "compression.json"
PACKED = "quantized.safetensors"     # artifacts/packed.py: the quantized linears as packed integers
NM_PACKED = "sparse.safetensors"     # artifacts/sparse.py: N:M float linears, their kept weights only
SCALE_BITS = 16                      # one fp16 scale per (row, group); + a zero point if asymmetric


def bit_histogram(bits: torch.Tensor, options) -> dict[str, int]:
    """Output channels per bit width."""
    return {str(int(b)): int((bits == b).sum()) for b in sorted(options)}


def linear_table(records: list[dict]) -> pd.DataFrame:
    """One row per (layer, linear) from the engine records."""
    rows = [{"layer": r["layer"], "linear": path, **info}
            for r in records for stage in r["stages"] for path, info in stage.items()]
    return pd.DataFrame(rows)


def effective_bits(model, method, quant) -> tuple[int, int]:
    """(bits of the compressed model, bits of the dense model): quantized values of the kept weights,
    mask/index overhead (1 bit per weight unstructured, ceil(log2 M) per kept weight for N:M),
    scales (+ zero points) per row and group; every other parameter at its dtype's width."""
    handled, total = {}, 0
    for view in layer_views(model):
        for path, lin in view_linears(view).items():
            handled[id(lin.weight)] = (view.index, path)
    dense = sum(p.numel() * p.element_size() * 8 for p in model.parameters())
    spec = method.spec
    for p in model.parameters():
        key = handled.get(id(p))
        if key is None:
            total += p.numel() * p.element_size() * 8
            continue
        rows, cols = p.shape
        mask = method.masks.get(key)
        kept = mask.sum(1).double() if mask is not None else torch.full((rows,), float(cols), dtype=torch.float64)
        bits = method.bits.get(key)
        width = bits.double() if bits is not None else torch.full((rows,), p.element_size() * 8.0, dtype=torch.float64)
        total += float((kept * width).sum())
        if mask is not None:
            total += float(kept.sum()) * math.ceil(math.log2(spec.prune_m)) if spec.nm else rows * cols
        if bits is not None:
            groups = math.ceil(cols / (quant.group_size or cols))
            total += groups * (rows * SCALE_BITS + (0 if quant.sym else float(bits.sum())))
    return int(total), int(dense)


def summarise(model, method, quant, table: pd.DataFrame) -> dict:
    """metrics.json's `compression` block."""
    weights = table["rows"] * table["cols"]
    out: dict = {"method": method.name, "total_channels": int(table["rows"].sum()),
                 "sparsity": float((table["sparsity"] * weights).sum() / weights.sum()),
                 "zeros": float((table["zeros"] * weights).sum() / weights.sum()), "avg_bits": None}
    if method.bits:
        cols = table.set_index(["layer", "linear"])["cols"]
        bits = torch.cat(list(method.bits.values()))
        widths = torch.cat([torch.full((len(b),), float(cols[k])) for k, b in method.bits.items()])
        out.update(bit_histogram=bit_histogram(bits, quant.bits_options),
                   avg_bits=float((bits * widths).sum() / widths.sum()))
    per_layer = []
    for layer, t in table.groupby("layer"):
        w = t["rows"] * t["cols"]
        entry = {"layer": int(layer), "sparsity": float((t["sparsity"] * w).sum() / w.sum())}
        if t["avg_bits"].notna().all():
            entry["avg_bits"] = float((t["avg_bits"] * w).sum() / w.sum())
        if t["importance_min"].notna().all():
            entry["importance_range"] = [float(t["importance_min"].min()), float(t["importance_max"].max())]
        if t["rel_error"].notna().all():
            entry["rel_error"] = float(t["rel_error"].mean())
        per_layer.append(entry)
    out["per_layer"] = per_layer
    eff, dense = effective_bits(model, method, quant)
    out.update(effective_bytes=eff // 8, dense_bytes=dense // 8, size_ratio=eff / dense)
    return out


def save_compression(path: Path, method, quant, summary: dict) -> None:
    tensors, shapes = {}, {}
    for (layer, p), mask in method.masks.items():
        tensors[f"{layer}.{p}.mask"] = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))
        shapes[f"{layer}.{p}"] = list(mask.shape)
    for (layer, p), bits in method.bits.items():
        tensors[f"{layer}.{p}.bits"] = bits.to(torch.int8)
    save_file(tensors, str(path / FILE))
    meta = {"method": method.name, "sparsity": method.spec.sparsity, "prune_n": method.spec.prune_n,
            "prune_m": method.spec.prune_m, "quant": type(quant).__name__.lower(),
            "sym": quant.sym, "group_size": quant.group_size,
            "weights": "packed" if (path / PACKED).is_file() else "dequantized", "mask_shapes": shapes,
            "nm_packed": (path / NM_PACKED).is_file() or (path / PACKED).is_file() and method.spec.nm,
            "summary": summary}
    (path / META).write_text(json.dumps(meta, indent=2, default=str))


def load_compression(path: str | Path) -> tuple[dict, dict, dict]:
    """(masks {(layer, path): bool}, bits {(layer, path): int64 per row}, metadata) of a checkpoint."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    tensors = load_file(str(path / FILE))
    masks, bits = {}, {}
    for name, shape in meta["mask_shapes"].items():
        layer, p = name.split(".", 1)
        flat = np.unpackbits(tensors[f"{name}.mask"].numpy())[: int(np.prod(shape))]
        masks[(int(layer), p)] = torch.from_numpy(flat.astype(bool)).reshape(shape)
    for name, t in tensors.items():
        if name.endswith(".bits"):
            layer, p = name[: -len(".bits")].split(".", 1)
            bits[(int(layer), p)] = t.to(torch.int64)
    return masks, bits, meta


def write_tables(run_dir: Path, table: pd.DataFrame, summary: dict) -> None:
    """compression.csv (per linear) and compression.png (per-layer bits and sparsity, bit histogram)."""
    with atomic_path(run_dir / "compression.csv") as tmp:
        table.to_csv(tmp, index=False)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = pd.DataFrame(summary["per_layer"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].bar(layers["layer"], layers["sparsity"], color="tab:gray")
    axes[0].set(title="sparsity per layer", xlabel="layer", ylim=(0, 1))
    if "avg_bits" in layers:
        axes[1].bar(layers["layer"], layers["avg_bits"], color="tab:blue")
        axes[1].set(title=f"average bits per layer (overall {summary['avg_bits']:.2f})", xlabel="layer")
        hist = summary["bit_histogram"]
        axes[2].bar([int(k) for k in hist], list(hist.values()), color="tab:orange")
        axes[2].set(title=f"channels per bit width ({summary['total_channels']} channels)", xlabel="bits")
    else:
        axes[1].axis("off")
        axes[2].axis("off")
    fig.suptitle(f"{summary['method']}: {summary['effective_bytes'] / 2**20:.2f} MiB effective vs "
                 f"{summary['dense_bytes'] / 2**20:.2f} MiB dense")
    fig.tight_layout()
    with atomic_path(run_dir / "compression.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
