"""Plain Hugging Face export (output.export=hf) of a model whose decoder layers share one shape.

The directory loads with `AutoModelForCausalLM.from_pretrained` (and so in lm-eval, vLLM, TGI):
config.json carries the pruned head counts, MLP width and depth. LlamaConfig refuses a hidden size
that is not a multiple of the head count (e.g. lab-llama 16 -> 12 query heads on hidden 256),
although LlamaForCausalLM computes such shapes fine (head_dim is explicit). Mistral's modeling is
Llama's without biases (same RMSNorm, SiLU MLP, RoPE parameters, GQA) and its config has no such
check, so a bias-free Llama of such a shape is exported as MistralForCausalLM with
sliding_window=null: the same function, checked logit for logit by tests/test_export.py.
"""
from __future__ import annotations

import logging

import torch.nn as nn
from transformers import MistralConfig

from ..atomic import atomic_dir
from ..core.adapter import (
    NO_GATE_FAMILIES,
    added_biases,
    decoder_layers,
    head_dim_of,
    layer_shapes,
    layer_views,
    model_family,
)
from ..errors import PruneLabError

log = logging.getLogger("prune_lab")


def shared_shape(model: nn.Module, what: str = "output.export=hf") -> dict:
    """The one (q heads, KV heads, MLP width) of every layer, or a one-line refusal (`what` names the export)."""
    shapes = layer_shapes(model)
    distinct = {tuple(s.values()) for s in shapes}
    if len(distinct) != 1:
        raise PruneLabError(
            f"{what} needs every decoder layer to share one shape, but this model has "
            f"{len(distinct)} (KV heads x MLP width: {sorted((k, w) for _, k, w in distinct)[:4]}...): "
            f"use allocator=uniform_shape, or output.save_model=true (prune_lab checkpoint)")
    return shapes[0]


def check_family(model: nn.Module, what: str = "output.export=hf") -> None:
    """Known right after loading: the families a plain HF config (output.export=hf) cannot describe."""
    if model_family(model) in NO_GATE_FAMILIES:
        raise PruneLabError(f"{what} does not support {model.config.model_type}: its config derives "
                            f"head_dim from hidden_size / heads, so it cannot state pruned head counts "
                            f"(use output.save_model=true)")


def check_bias_refit(model: nn.Module, refit: str, what: str = "output.export=hf") -> None:
    """Known right after loading: a refit with biases (reconstruct=bias, reconstruct.fit_bias=true) adds
    o_proj/down_proj biases where this architecture builds none."""
    lacking = sorted({short for v in layer_views(model) for short, lin in (("o_proj", v.attn.o), ("down_proj", v.mlp.down))
                      if lin.bias is None})
    if lacking:
        raise PruneLabError(f"{what}: {refit} adds biases to {lacking}, which {type(model).__name__} "
                            f"does not build: use output.save_model=true (a prune_lab checkpoint keeps them) "
                            f"or a refit without biases")


def plain_config(model: nn.Module, what: str = "output.export=hf"):
    """A config transformers builds this exact model from (same class when it accepts the shape)."""
    shape = shared_shape(model, what)
    config = model.config
    check_family(model, what)
    if added_biases(model):
        raise PruneLabError(f"{what}: reconstruction added biases to {added_biases(model)}, which "
                            f"{type(model).__name__} does not build: save with output.save_model=true")
    values = {**config.to_dict(), "num_attention_heads": shape["q_heads"],
              "num_key_value_heads": shape["kv_heads"], "intermediate_size": shape["mlp_width"],
              "head_dim": head_dim_of(config), "num_hidden_layers": len(decoder_layers(model))}
    values.pop("prune_lab", None)
    try:
        out = type(config).from_dict(values)
        out.architectures = list(config.architectures or [type(model).__name__])
        return out
    except Exception as e:  # noqa: BLE001 - transformers raises its own validation error classes
        refusal = str(e).strip().splitlines()[-1].strip()
    biased = config.to_dict().get("attention_bias") or config.to_dict().get("mlp_bias")
    if config.model_type != "llama" or biased:
        raise PruneLabError(f"transformers refuses the pruned {config.model_type} shape "
                            f"({shape['q_heads']} query / {shape['kv_heads']} KV heads, hidden "
                            f"{config.hidden_size}): {refusal}")
    fields = set(MistralConfig.__dataclass_fields__) - {"sliding_window"}
    out = MistralConfig(**{k: v for k, v in values.items() if k in fields}, sliding_window=None)
    out.architectures = ["MistralForCausalLM"]
    return out


def hf_config(model: nn.Module, what: str = "output.export=hf"):
    """plain_config with the model's dtype and the `prune_lab` provenance block of an export."""
    config = plain_config(model, what)
    if config.model_type != model.config.model_type:
        log.warning("export: %s refuses %d heads on hidden %d; written as the equivalent %s",
                    type(model.config).__name__, config.num_attention_heads, config.hidden_size,
                    config.architectures[0])
    config.dtype = next(model.parameters()).dtype
    recorded = getattr(model.config, "prune_lab", None) or {}
    config.prune_lab = {"exported_from": model.config.model_type,
                        "removed_layers": list(recorded.get("removed_layers", []))}
    return config


def write_hf(model: nn.Module, tokenizer, directory, config, state_dict: dict | None = None) -> None:
    """model.safetensors (tied weights once; `state_dict` in place of the model's own), config.json,
    generation config and tokenizer, into an existing directory."""
    architectures = list(config.architectures)
    dense_config, model.config = model.config, config     # save_pretrained writes model.config
    try:
        model.save_pretrained(directory, state_dict=state_dict)
    finally:
        model.config = dense_config
    config.architectures = architectures                   # save_pretrained names the in-memory class
    config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def shape_record(config) -> dict:
    return {"architecture": config.architectures[0], "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size}


def export_hf(model: nn.Module, tokenizer, path) -> dict:
    """Write model.safetensors (tied weights once), config.json, generation config and tokenizer."""
    config = hf_config(model)
    with atomic_dir(path) as tmp:                          # complete, or not there at all
        write_hf(model, tokenizer, tmp, config)
    return {"path": str(path), **shape_record(config)}
