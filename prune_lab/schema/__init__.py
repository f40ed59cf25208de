"""Typed job schema, registered in Hydra's ConfigStore.

Every option file in conf/<group>/ extends its schema here (`/schema/<group>/<name>@_here_`),
so a misspelt key or a wrong type fails at compose time. One module per part of the job:
inputs (model, data, calibration), pruning (importance ... engine), compress (method, quant,
finetune), job (eval, output, cache, search, JobConf).
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

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
    "finetune": {"base": FinetuneConf, "lora": LoraConf, "full": FullConf},
    "eval": {"base": EvalConf},
    "method": {"base": MethodConf, "unstructured": UnstructuredConf, "sparsegpt": SparseGPTConf},
    "quant": {"base": QuantConf, "uniform": UniformQuantConf, "mixed": MixedQuantConf},
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore; calling it again replaces them with the same nodes."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConf, replace=True)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node, replace=True)
