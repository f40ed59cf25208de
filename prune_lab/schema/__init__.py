"""Typed job schema, registered in Hydra's ConfigStore.

Every option file in conf/<group>/ extends its schema here (`/schema/<group>/<name>@_here_`),
so a misspelt key or a wrong type fails at compose time. One module per part of the job:
inputs (model, data, calibration), pruning (importance ... engine), compress (method, quant,
finetune), job (eval, output, cache, search, JobConf).
"""
from __future__ import annotations

import os
from dataclasses import fields, is_dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..errors import PruneLabError

# every schema class, importable as prune_lab.schema.<Name> as before the split
from .compress import *  # noqa: F401,F403
from .inputs import *  # noqa: F401,F403
from .job import *  # noqa: F401,F403
from .pruning import *  # noqa: F401,F403

SCHEMAS = {
    "model": {"embedded": EmbeddedModelConf, "hf": HFModelConf, "pruned": PrunedModelConf,
              "random": RandomModelConf, "gguf": GGUFModelConf, "packaged_gguf": PackagedGGUFModelConf},
    "data": {"wiki_vital": WikiVitalConf, "hub": HubTextConf, "text": LocalTextConf},
    "importance": {"base": ImportanceConf, "taylor": TaylorConf, "flap": FlapConf, "file": FileImportanceConf,
                   "obs": ObsImportanceConf},
    "layer_importance": {"base": LayerImportanceConf, "file": FileLayerImportanceConf},
    "allocator": {"uniform": AllocatorConf, "layerwise": LayerwiseConf, "global": GlobalConf, "search": SearchConf,
                  "depth": DepthConf,
                  "uniform_shape": UniformShapeConf},
    "reconstruct": {"base": ReconstructConf},
    "finetune": {"base": FinetuneConf, "lora": LoraConf, "full": FullConf, "distill": DistillConf},
    "eval": {"base": EvalConf},
    "method": {"base": MethodConf, "unstructured": UnstructuredConf, "sparsegpt": SparseGPTConf},
    "quant": {"base": QuantConf, "uniform": UniformQuantConf, "mixed": MixedQuantConf},
}

TRUSTED_ENV = "PRUNE_LAB_TRUSTED_TARGETS"


def trusted_targets() -> tuple[str, ...]:
    """The `_target_`s a job may instantiate (Hydra's execution whitelist): prune_lab's own, plus the
    patterns of $PRUNE_LAB_TRUSTED_TARGETS ("mypkg.*,other.Class") for components of your own."""
    return ("prune_lab.*", *filter(None, (t.strip() for t in os.environ.get(TRUSTED_ENV, "").split(","))))


def unknown_key(full_key: str, known) -> str:
    """The one line for a key its schema lacks (`allocator.ratoi`), naming the keys it has."""
    group = full_key.rpartition(".")[0] or "the job"
    return f"unknown key '{full_key}': {group} takes {', '.join(k for k in known if not k.startswith('_'))}"


def check_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key of a composed job is one its schema declares. `allocator.ratoi=0.3` fails at compose
    time; `+allocator.ratoi=0.3` appends past the schema and fails here (PruneLabError, before any work)."""
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        known = [f.name for f in fields(schema)]
        for key in node:
            if key not in known:
                raise PruneLabError(unknown_key(f"{prefix}{key}", known))
    for key in node:
        if not (OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key)) \
                and isinstance(node[key], DictConfig):
            check_keys(node[key], f"{prefix}{key}.")


def register() -> None:
    """Store the schemas in Hydra's ConfigStore; calling it again replaces them with the same nodes."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConf, replace=True)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node, replace=True)
