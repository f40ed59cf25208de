"""output.export=compressed_tensors: a quant=uniform model as the `compressed-tensors` pack-quantized format.

That is the format llm-compressor writes for W4A16 / W8A16 and vLLM serves: a plain Hugging Face directory
whose config.json carries a `quantization_config` (quant_method compressed-tensors, format pack-quantized,
one config group: every nn.Linear but lm_head, int weights of quant.bits bits, strategy group with
quant.group_size, or channel when it is null, symmetric or not) and whose decoder linears are stored as
weight_packed (int32, the library's dense packing), weight_scale, weight_shape (+ weight_zero_point, packed,
when asymmetric). The codes, scales and zero points are the GPTQ run's own (the grids the engine recorded):
the library's own compressor packs them and its decompressor must give back the job's weights bit for bit,
else the export stops. Scales stay float32 (the exact grid); a runtime that computes in bf16/fp16 rounds
them as it loads. `AutoModelForCausalLM.from_pretrained(dir)` loads the directory with compressed-tensors
installed (extra `serve`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..atomic import atomic_dir
from ..core.adapter import layer_views, view_linears
from ..errors import PruneLabError
from .export import hf_config, shape_record, write_hf

WHAT = "output.export=compressed_tensors"
FORMAT = "pack-quantized"
BITS = (4, 8)                 # W4A16 / W8A16: the widths vLLM's kernels read (the format itself packs 1..8)


def require():
    """The compressed-tensors package, or one line naming the extra that installs it."""
    try:
        import compressed_tensors
    except ImportError:
        raise PruneLabError(f"{WHAT} needs the compressed-tensors package: pip install 'prune_lab[serve]' "
                            f"(or pip install 'compressed-tensors>=0.20.1,<0.21')") from None
    return compressed_tensors


def check_widths(model: nn.Module, group_size: int | None) -> None:
    """Every decoder linear's input width holds whole groups (the format has no partial last group)."""
    if group_size is None:
        return
    odd = sorted({f"{p} ({lin.in_features} columns)" for v in layer_views(model)
                  for p, lin in view_linears(v).items() if lin.in_features % group_size})
    if odd:
        raise PruneLabError(f"{WHAT}: quant.group_size={group_size} must divide every decoder linear's input "
                            f"width, and {', '.join(odd[:3])} do not: choose a group size that divides them "
                            f"(or null: one scale per row)")


def scheme(bits: int, sym: bool, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, group_size=group_size,
                            strategy="group" if group_size else "channel")
    return QuantizationScheme(targets=["Linear"], weights=args, format=FORMAT)


def compress_linear(name: str, weight, grid: dict, scheme) -> dict:
    """One linear's compressed tensors (local names), from its recorded grid: scale·(q − zero), q ∈ [0, 2^b),
    is the format's scale·(q' − zero') with q' = q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1)) (symmetric: zero' = 0)."""
    from compressed_tensors.compressors import BaseCompressor
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    args = scheme.weights
    state = {"weight": weight.detach().cpu(), "weight_scale": grid["scale"].float().contiguous()}
    if not args.symmetric:
        state["weight_zero_point"] = (grid["zero"].round() - 2 ** (args.num_bits - 1)).to(torch.int8)
    out = compressor.compress(state, scheme)
    decoded = compressor.decompress(out, scheme)["weight"].to(weight.dtype)
    if not torch.equal(decoded, state["weight"]):
        raise PruneLabError(f"{WHAT}: {name} does not decode to its own weights on its recorded grid "
                            f"(max |diff| {float((decoded - state['weight']).abs().max()):.3g}): not written")
    return out


def quantization_config(scheme, ignore: list[str]):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    return QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT, ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED)


def export_pack_quantized(model: nn.Module, tokenizer, path, grids: dict, bits: int, sym: bool,
                          group_size: int | None) -> dict:
    """Write the directory (atomically: complete under its name, or absent); metrics.json `export`."""
    require()
    from compressed_tensors.compressors import ModelCompressor
    config = hf_config(model, WHAT)
    check_widths(model, group_size)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ignore = sorted(n for n in linears if f"{n}.weight" not in grids)
    if set(ignore) - {"lm_head"}:
        raise PruneLabError(f"{WHAT}: {ignore[0]} has no recorded {bits}-bit grid: every decoder linear must be "
                            f"quantized by quant=uniform")
    s = scheme(bits, sym, group_size)
    state = model.state_dict()
    for name in linears.keys() - set(ignore):
        del state[f"{name}.weight"]
        state |= {f"{name}.{k}": v for k, v in
                  compress_linear(name, linears[name].weight, grids[f"{name}.weight"], s).items()}
    with atomic_dir(path) as tmp:
        write_hf(model, tokenizer, tmp, config, state_dict=state)
        ModelCompressor(quantization_config=quantization_config(s, ignore)).update_config(str(tmp))
    return {"path": str(path), "format": f"compressed-tensors {FORMAT}", "num_bits": bits, "symmetric": sym,
            "group_size": group_size, "packed_linears": len(linears) - len(ignore),
            "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), **shape_record(config)}
