"""Pruned checkpoints: safetensors + config.json with a per-layer manifest + tokenizer.

transformers cannot build layers of different widths from a config (and its
`ignore_mismatched_sizes` silently re-initialises), so `load_pruned` builds the dense
architecture, slices every layer to its manifest widths with the pruning executor, then loads
the weights strictly. A model whose layers share one shape gets a top-level config that plain
`AutoModelForCausalLM.from_pretrained` loads (prune_lab/export.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ..atomic import atomic_dir
from ..core.adapter import (
    added_biases,
    check_supported,
    head_dim_of,
    layer_shapes,
    layer_views,
)
from ..core.executor import ensure_bias, prune_attention, prune_mlp
from ..errors import CheckpointError, PruneLabError
from .export import plain_config
from . import packed, sparse
from .manifest import check_index

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = 1


def _no_init():
    """Skip random initialisation of the skeleton: every weight is overwritten by the checkpoint."""
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:
        return contextlib.nullcontext()


# ---- save ----------------------------------------------------------------------------------
def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without aliases (tied embeddings): first name wins, the rest map to it.
    Tensors are not copied (the checkpoint writer and the size estimate both use this)."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach()
    return tensors, aliases


def manifest_of(model: nn.Module) -> dict:
    """Per-layer shapes read off the weights, plus the removed layers the executor recorded."""
    recorded = getattr(model.config, "prune_lab", None) or {}
    return {"format": FORMAT, "head_dim": head_dim_of(model.config),
            "layers": layer_shapes(model), "removed_layers": list(recorded.get("removed_layers", [])),
            "added_biases": added_biases(model)}


def export_config(model: nn.Module, manifest: dict):
    """The config to write: the plain pruned shape when every layer shares one (prune_lab/export.py),
    else the dense head counts (buildable), with the per-layer manifest either way."""
    try:
        config = plain_config(model)
    except PruneLabError:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
    config.prune_lab = manifest
    config.dtype = next(model.parameters()).dtype
    return config


def save_pruned(model: nn.Module, tokenizer, path: str | Path, extra=None, grids=None, masks=None) -> Path:
    """Write model.safetensors, config.json (with `prune_lab` manifest) and the tokenizer.

    Written into a temporary sibling that is renamed to `path` when complete (replacing an older
    checkpoint there), so a kill or a full disk never leaves a half-written checkpoint.
    extra(tmp_dir), if given, writes further files into it before the rename. grids: the quantized linears'
    grids ({HF weight name: scale, zero, bits, group_size}): their weights are stored as packed integers
    (artifacts/packed.py). masks ({HF weight name: mask, prune_m}, N:M keep-masks): only the kept weights are
    stored, with their offsets (artifacts/sparse.py; packed.py for quantized ones).
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG).is_file():
        raise CheckpointError(f"'{path}' exists and is not a checkpoint: refusing to replace it")
    manifest = manifest_of(model)
    tensors, aliases = unique_state_dict(model)
    tensors, ints, ints_meta = packed.split({k: t.to("cpu").contiguous() for k, t in tensors.items()}, grids or {}, masks)
    tensors, nm, nm_meta = sparse.split(tensors, masks or {})
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "prune_lab_aliases": json.dumps(aliases)})
        packed.write(tmp, ints, ints_meta)
        sparse.write(tmp, nm, nm_meta)
        export_config(model, manifest).save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return path


# ---- load ----------------------------------------------------------------------------------
def read_config(path: Path):
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"'{path}' is not a prune_lab checkpoint: {name} is missing")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / CONFIG}: {_first_line(e)}") from e
    manifest = getattr(config, "prune_lab", None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise CheckpointError(f"{path / CONFIG} has no prune_lab manifest: load it with model=hf")
    keys = {"q_heads", "kv_heads", "mlp_width"}
    # an emptied attention (plan.attn_blocks) has 0 query and 0 KV heads, an emptied MLP width 0
    if not manifest["layers"] or any(not isinstance(s, dict) or set(s) != keys or
                                     not all(isinstance(s[k], int) and s[k] >= 0 for k in keys) or
                                     (s["q_heads"] == 0) != (s["kv_heads"] == 0)
                                     for s in manifest["layers"]):
        raise CheckpointError(f"{path / CONFIG}: malformed manifest (each layer needs {sorted(keys)} >= 0, "
                              f"q_heads and kv_heads both 0 or both positive)")
    return config, manifest


def refuse_per_layer(path: str) -> None:
    """model=hf of a prune_lab checkpoint whose layers differ in shape (or that added biases): transformers
    cannot build it from config.json, its manifest can (model=pruned)."""
    try:
        manifest = json.loads((Path(path).expanduser() / CONFIG).read_text()).get("prune_lab") or {}
        layers = manifest.get("layers") or []
    except (OSError, ValueError, AttributeError):     # no such file, not JSON, not a manifest: not ours
        return
    what = ("per-layer shapes or added biases" if len({json.dumps(s, sort_keys=True) for s in layers}) > 1 or
            manifest.get("added_biases") else packed.stored(Path(path).expanduser()))
    if what:
        raise CheckpointError(f"'{path}' is a prune_lab checkpoint with {what}: load it with model=pruned "
                              f"model.path={path}")


def weight_shapes(file: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """Tensor shapes and aliases from the safetensors header (reads no weights)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("prune_lab_aliases", "{}"))
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: corrupt or truncated safetensors ({_first_line(e)})") from e
    return shapes, aliases


def build_skeleton(config, manifest: dict, dtype, attn_implementation: str) -> nn.Module:
    """The dense architecture at the checkpoint's depth, sliced to each layer's manifest widths."""
    config.num_hidden_layers = len(manifest["layers"])
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.tie_weights()   # skipped with the initialisation; follows config.tie_word_embeddings
    check_supported(model)
    with torch.no_grad():
        for view, shape in zip(layer_views(model), manifest["layers"]):
            attn, mlp = view.attn, view.mlp
            kv, width = shape["kv_heads"], shape["mlp_width"]
            if shape["q_heads"] != kv * attn.group_size or kv > attn.num_kv_heads or width > mlp.width:
                raise CheckpointError(
                    f"manifest layer {view.index} ({shape}) does not fit the config "
                    f"({attn.num_heads} q / {attn.num_kv_heads} kv heads, mlp {mlp.width})")
            if kv < attn.num_kv_heads:
                prune_attention(attn, list(range(kv, attn.num_kv_heads)))
            if width < mlp.width:
                prune_mlp(mlp, list(range(width, mlp.width)))
    return model


def add_biases(model: nn.Module, shapes: dict) -> None:
    """Give the skeleton's o_proj/down_proj the biases the file holds (added by reconstruction)."""
    modules = dict(model.named_modules())
    for name in shapes:
        owner = name[: -len(".bias")] if name.endswith(("o_proj.bias", "down_proj.bias")) else None
        if owner in modules and modules[owner].bias is None:
            ensure_bias(modules[owner])


def check_weights(model: nn.Module, shapes: dict, aliases: dict, where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes) - set(aliases))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        names = ", ".join((missing + extra)[:3])
        raise CheckpointError(f"manifest does not match the weights in {where}: "
                              f"{len(missing)} tensors missing, {len(extra)} unexpected ({names})")
    for name, shape in shapes.items():
        if expected[name] != shape:
            raise CheckpointError(f"manifest does not match the weights in {where}: {name} is "
                                  f"{list(shape)} in the file but {list(expected[name])} by the manifest")


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                attn_implementation: str = "sdpa") -> nn.Module:
    """Rebuild a model saved by `save_pruned`, exactly (strict load, every shape checked)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a directory")
    config, manifest = read_config(path)
    shapes, aliases = weight_shapes(path / WEIGHTS)
    shapes |= packed.packed_shapes(path) | sparse.sparse_shapes(path)     # packed integers, N:M kept weights
    check_index(manifest, shapes, path / WEIGHTS)       # before building anything of the manifest's size
    try:
        model = build_skeleton(config, manifest, dtype or config.dtype, attn_implementation)
    except PruneLabError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot build the model from {path / CONFIG}: {_first_line(e)}") from e
    add_biases(model, shapes)
    check_weights(model, shapes, aliases, path / WEIGHTS)
    try:
        state = load_file(str(path / WEIGHTS)) | packed.read(path) | sparse.read(path)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / WEIGHTS}: corrupt or truncated ({_first_line(e)})") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    untied = [k for k in missing if k not in aliases or not _same_tensor(model, k, aliases[k])]
    if untied or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not fill the model: missing {untied[:3]}")
    model.config.prune_lab = manifest
    return model.to(device).eval()


def _same_tensor(model: nn.Module, a: str, b: str) -> bool:
    sd = model.state_dict()
    return sd[a].data_ptr() == sd[b].data_ptr()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
