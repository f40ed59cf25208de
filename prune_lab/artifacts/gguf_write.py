"""output.export=gguf: the pruned model as one GGUF file (the gguf package) that llama.cpp runs as it is.

Which llama.cpp architecture (facts from llama.cpp's src/models/*.cpp and llama-model.cpp):
* every decoder layer of one shape: the model's own, `llama` (Llama, and Mistral: Llama's modeling
  without a sliding window), `qwen2`, `qwen3`. llama.cpp's qwen2 builds q with n_embd rows, so a Qwen2
  whose query heads were pruned is written as `llama` (which reads the optional q/k/v biases too).
* layers that differ (Llama, Mistral, Qwen2): `deci`, whose loader reads head_count, head_count_kv and
  feed_forward_length as per-layer arrays and builds every layer with its own widths (q/k/v biases
  optional, as in every llama.cpp architecture that builds q/k/v through create_tensor_qkv). A layer
  whose attention a plan emptied (plan.attn_blocks) is deci's attention-free layer: head_count and
  head_count_kv 0, no attn_norm / q / k / v / o tensors (the loader creates none), the graph passes the
  layer input straight to the FFN (x + FFN(ffn_norm(x)), what transformers computes with 0 heads);
  refused when layer 0 is one (llama.cpp reads the head size only when layer 0 has heads) or its o_proj
  has a bias (deci drops it). A layer without MLP (plan.mlp_blocks, feed_forward_length 0) is refused:
  deci then skips the rest of the layer and drops its attention output too (src/models/deci.cpp,
  `if (n_ff == 0) continue;` before the layer's output is kept). Qwen3's per-head q/k norms exist in no
  per-layer architecture: refused.
* llama and deci rotate consecutive pairs (LLAMA_ROPE_TYPE_NORM), transformers rotates halves: q/k rows
  (and biases, and a quantized row's grid) are permuted per head as llama.cpp's convert script does;
  qwen2/qwen3 use NEOX rope, the HF order.
* o_proj / down_proj biases a refit added (reconstruct=bias) are read by llama and deci (optional
  attn_output.bias / ffn_down.bias), not by qwen2 / qwen3.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..atomic import atomic_path
from ..core.adapter import head_dim_of, layer_shapes, layer_views, model_family
from ..errors import PruneLabError
from .gguf_read import require_gguf
from .gguf_types import FILE_TYPES, GRID_TYPES, encode
from .gguf_vocab import add_tokenizer, check_tokenizer, tokenizer_metadata

log = logging.getLogger("prune_lab")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
NORM_ROPE = ("llama", "deci")


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type") or params.get("type") or "default"


def check_model(model: nn.Module, tokenizer, refit_biases: str | None = None) -> None:
    """Right after loading: what no GGUF architecture can express, as one line."""
    family = model_family(model)
    if family not in GGUF_ARCH:
        raise PruneLabError(f"output.export=gguf does not support {family} (llama.cpp architectures: "
                            f"{', '.join(sorted(set(GGUF_ARCH)))}): use output.save_model=true")
    if rope_type(model.config) != "default":
        raise PruneLabError(f"output.export=gguf writes plain RoPE only, this model's is "
                            f"'{rope_type(model.config)}': use output.export=hf")
    if refit_biases and family in ("qwen2", "qwen3"):
        raise PruneLabError(f"output.export=gguf: {refit_biases} adds o_proj/down_proj biases, which llama.cpp's "
                            f"{family} does not read: use a refit without biases or output.save_model=true")
    window = getattr(model.config, "sliding_window", None)
    if family == "mistral" and window and window < model.config.max_position_embeddings:
        log.warning("export: Mistral's sliding window (%d) is not written; llama.cpp's llama attends to the "
                    "whole context (the same function up to %d tokens)", window, window)
    check_tokenizer(tokenizer)


def check_blocks(model: nn.Module) -> None:
    """Right after loading, for output.gguf_type=q4_0|q4_1: every decoder linear's rows hold whole blocks."""
    short = sorted({f"{p} ({lin.in_features} columns)" for v in layer_views(model)
                    for p, lin in (("attn", v.attn.q), ("o_proj", v.attn.o), ("mlp", v.mlp.up), ("down_proj", v.mlp.down))
                    if lin.in_features % 32})
    if short:
        raise PruneLabError(f"output.gguf_type=q4_*: GGUF 4-bit blocks hold 32 columns, and {', '.join(short)} "
                            f"do not divide: choose q8_0|f16")


def layout(model: nn.Module) -> dict:
    """After pruning: the architecture and the per-layer widths to write, or one line."""
    shapes = layer_shapes(model)
    family, config = model_family(model), model.config
    hd = head_dim_of(config)
    kinds = {(s["q_heads"], s["kv_heads"], s["mlp_width"]) for s in shapes}
    uniform = len(kinds) == 1 and min(min(k) for k in kinds) > 0
    if uniform:
        arch = GGUF_ARCH[family]
        if arch == "qwen2" and shapes[0]["q_heads"] * hd != config.hidden_size:
            arch = "llama"
    elif family == "qwen3":
        raise PruneLabError("output.export=gguf: this Qwen3's layers differ, and llama.cpp's only architecture "
                            "with per-layer widths (deci) has no q/k norms: use allocator=uniform_shape")
    else:
        arch = "deci"
    no_mlp = [i for i, s in enumerate(shapes) if not s["mlp_width"]]
    if no_mlp:
        raise PruneLabError(f"output.export=gguf: layers {no_mlp} have no MLP, and llama.cpp's deci drops such a "
                            f"layer's attention output too (feed_forward_length 0): remove those layers whole "
                            f"or use output.save_model=true")
    no_attn = [i for i, s in enumerate(shapes) if not s["q_heads"]]
    if 0 in no_attn:
        raise PruneLabError("output.export=gguf: layer 0 has no attention, and llama.cpp reads the head size "
                            "only from a layer 0 with heads: use output.save_model=true")
    views = layer_views(model)
    biased = [i for i in no_attn if views[i].attn.o.bias is not None]
    if biased:
        raise PruneLabError(f"output.export=gguf: layers {biased} have no attention but an o_proj bias, which "
                            f"llama.cpp's attention-free deci layer drops: use output.save_model=true")
    if arch in ("qwen2", "qwen3") and any(v.attn.o.bias is not None or v.mlp.down.bias is not None
                                          for v in views):
        raise PruneLabError(f"output.export=gguf: llama.cpp's {arch} reads no o_proj/down_proj biases")
    return {"arch": arch, "head_dim": hd, "q_heads": [s["q_heads"] for s in shapes],
            "kv_heads": [s["kv_heads"] for s in shapes], "mlp_width": [s["mlp_width"] for s in shapes]}


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from transformers' (halves, pairs) order to llama.cpp's (pairs, halves)."""
    if heads == 0:
        return t
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def layer_tensors(view, i: int) -> dict[str, torch.Tensor]:
    """The HF-named tensors of layer i (norms, projections and their biases, q/k norms); an attention-free
    layer (0 heads) has no attention tensors and no attention norm."""
    layer, a, m = view.module, view.attn, view.mlp
    prefix = f"model.layers.{i}"
    out = {}
    linears = (("self_attn.q_proj", a.q), ("self_attn.k_proj", a.k), ("self_attn.v_proj", a.v),
               ("self_attn.o_proj", a.o), ("mlp.gate_proj", m.gate), ("mlp.up_proj", m.up), ("mlp.down_proj", m.down))
    if a.num_heads:
        out[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight
        for short, lin in linears[:4]:
            out |= {f"{prefix}.{short}.{k}": getattr(lin, k) for k in ("weight", "bias") if getattr(lin, k) is not None}
        for short, norm in (("q_norm", a.q_norm), ("k_norm", a.k_norm)):
            if norm is not None:
                out[f"{prefix}.self_attn.{short}.weight"] = norm.weight
    out[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    for short, lin in linears[4:]:
        out |= {f"{prefix}.{short}.{k}": getattr(lin, k) for k in ("weight", "bias") if getattr(lin, k) is not None}
    return out


def model_tensors(model: nn.Module, lay: dict) -> dict[str, torch.Tensor]:
    """Every tensor to write, by HF name, in the order llama.cpp's convert script writes them."""
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight}
    for i, view in enumerate(layer_views(model)):
        out |= layer_tensors(view, i)
    out["model.norm.weight"] = model.model.norm.weight
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        out["lm_head.weight"] = model.lm_head.weight
    return out


def arranged(name: str, t: torch.Tensor, lay: dict) -> torch.Tensor:
    """A tensor (or a quantized row's grid) in llama.cpp's row order."""
    if lay["arch"] in NORM_ROPE and (".q_proj." in name or ".k_proj." in name):
        i = int(name.split(".")[2])
        return permute_rows(t, lay["q_heads" if ".q_proj." in name else "kv_heads"][i])
    return t


def export_gguf(model: nn.Module, tokenizer, path, kind: str = "f16", grids: dict | None = None) -> dict:
    """Write `path` (complete, or not there at all). grids: {HF weight name: {scale, zero, group_size, ...}} of
    the linears a quant=uniform run left on a 4-bit grid (kind q4_0 / q4_1)."""
    gguf = require_gguf()
    lay = layout(model)
    config, arch, grids = model.config, lay["arch"], grids or {}
    if kind in GRID_TYPES:
        missing = [f"model.layers.{v.index}.{p}.weight" for v in layer_views(model)   # attention-free: no q_proj
                   for p in ("self_attn.q_proj", "mlp.down_proj")[0 if v.attn.num_heads else 1:]
                   if f"model.layers.{v.index}.{p}.weight" not in grids]
        if missing:
            raise PruneLabError(f"output.gguf_type={kind}: {missing[0]} has no 4-bit grid to write exactly "
                                f"(quantize with quant=uniform, or choose f32|f16|bf16|q8_0)")
    n = len(lay["q_heads"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n)
    types: dict[str, int] = {}
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(f"{getattr(config, '_name_or_path', '') or config.model_type} (prune_lab)")
        w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
        w.add_block_count(n)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        uniform = arch != "deci"
        w.add_feed_forward_length(lay["mlp_width"][0] if uniform else lay["mlp_width"])
        w.add_head_count(lay["q_heads"][0] if uniform else lay["q_heads"])
        w.add_head_count_kv(lay["kv_heads"][0] if uniform else lay["kv_heads"])
        w.add_key_length(lay["head_dim"])
        w.add_value_length(lay["head_dim"])
        w.add_rope_dimension_count(lay["head_dim"])
        rope = getattr(config, "rope_parameters", None) or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_vocab_size(model.model.embed_tokens.weight.shape[0])
        if tokenizer is not None:
            add_tokenizer(w, tokenizer_metadata(tokenizer, model.model.embed_tokens.weight.shape[0]))
        for name, t in model_tensors(model, lay).items():
            base, suffix = name.rsplit(".", 1)
            grid = grids.get(name)
            if grid is not None:
                grid = (arranged(name, grid["scale"], lay), arranged(name, grid["zero"], lay), grid["group_size"])
            data, raw, tname = encode(gguf, arranged(name, t, lay), kind, grid)
            w.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=raw)
            types[tname] = types.get(tname, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"path": str(path), "architecture": arch, "gguf_type": kind, "bytes": path.stat().st_size,
            "tensor_types": dict(sorted(types.items())), "block_count": n, "head_count": lay["q_heads"],
            "head_count_kv": lay["kv_heads"], "feed_forward_length": lay["mlp_width"]}
