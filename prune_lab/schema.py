"""Typed job schema, registered in Hydra's ConfigStore.

Every option file in conf/<group>/ extends its schema here (`/schema/<group>/<name>@_here_`),
so a misspelt key or a wrong type fails at compose time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- model -------------------------------------------------------------------------------
@dataclass
class ModelConf:
    _target_: str = MISSING
    dtype: str = "float32"
    device: str = "auto"                     # auto = cuda if available, else cpu
    attn_implementation: str = "sdpa"        # sdpa | eager
    trust_remote_code: bool = False
    revision: Optional[str] = None
    tokenizer: Optional[str] = None          # defaults to the model's own


@dataclass
class EmbeddedModelConf(ModelConf):
    _target_: str = "prune_lab.model.EmbeddedModel"
    name: str = "lab-llama"


@dataclass
class HFModelConf(ModelConf):
    _target_: str = "prune_lab.model.HFModel"
    path: str = MISSING


@dataclass
class PrunedModelConf(HFModelConf):
    _target_: str = "prune_lab.model.PrunedModel"


@dataclass
class RandomModelConf(ModelConf):
    _target_: str = "prune_lab.model.RandomModel"
    arch: str = "llama"
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 96
    vocab_size: int = 8192
    attention_bias: bool = False
    seed: int = 0


# ---- data --------------------------------------------------------------------------------
@dataclass
class DataConf:
    _target_: str = MISSING


@dataclass
class WikiVitalConf(DataConf):
    _target_: str = "prune_lab.data.WikiVital"
    root: Optional[str] = None


@dataclass
class HubTextConf(DataConf):
    _target_: str = "prune_lab.data.HubText"
    name: str = MISSING
    path: str = MISSING
    config_name: Optional[str] = None
    text_field: str = "text"
    splits: Optional[Dict[str, str]] = None  # ours -> the hub's split names; null = train/validation/test
    data_files: Optional[Dict[str, Any]] = None
    separator: str = "\n\n"
    max_rows: Optional[int] = None


@dataclass
class LocalTextConf(DataConf):
    _target_: str = "prune_lab.data.LocalText"
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None


@dataclass
class CalibrationConf:
    _target_: str = "prune_lab.data.Calibration"
    n_samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    split: str = "train"


# ---- importance ----------------------------------------------------------------------------
@dataclass
class ImportanceConf:
    _target_: str = MISSING


@dataclass
class TaylorConf(ImportanceConf):
    _target_: str = "prune_lab.importance.Taylor"
    second_order: bool = False
    offload: bool = False                    # per-weight fp32 gradient sums in CPU memory
    gradient_checkpointing: bool = False     # recompute decoder layers in the backward pass


@dataclass
class FlapConf(ImportanceConf):
    _target_: str = "prune_lab.importance.Flap"
    engine: Any = "${engine}"                # runs in the engine with the job's engine settings


@dataclass
class FileImportanceConf(ImportanceConf):
    _target_: str = "prune_lab.importance.FromFile"
    path: str = MISSING


@dataclass
class ObsImportanceConf(ImportanceConf):
    _target_: str = "prune_lab.importance.ObsError"
    damp: float = 0.01                       # Gram damping, relative to mean(diag)
    weighted: bool = True                    # weigh output errors by the loss sensitivity E[g²]
    chunks: int = 64                         # greedy steps per layer and projection
    engine: Any = "${engine}"


@dataclass
class LayerImportanceConf:
    _target_: str = MISSING
    n_samples: Optional[int] = None


@dataclass
class FileLayerImportanceConf(LayerImportanceConf):
    _target_: str = "prune_lab.layer_importance.FromFile"
    path: str = MISSING


# ---- allocator -----------------------------------------------------------------------------
@dataclass
class AllocatorConf:
    _target_: str = MISSING
    ratio: float = 0.25
    layer_start: int = 0
    layer_end: Optional[int] = None
    multiple_of: int = 1                     # kept MLP / query widths on multiples of it (1 = any)


@dataclass
class LayerwiseConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.Layerwise"
    strategy: str = "inverse"
    alpha: float = 1.0
    eps: float = 0.01
    log_transform: bool = False
    min_rate: float = 0.0
    max_rate: float = 0.9
    freeze_top_n: int = 0
    distribution: str = "3:7"


@dataclass
class GlobalConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.Global"
    remove_empty_layers: bool = False


@dataclass
class DepthConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.Depth"
    n_layers: Optional[int] = None


@dataclass
class UniformShapeConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.UniformShape"
    max_removed_layers: Optional[int] = None


# ---- method (structured | sparsegpt | wanda | magnitude) and quant (none | uniform | mixed) ---------
@dataclass
class MethodConf:
    _target_: str = MISSING


@dataclass
class UnstructuredConf(MethodConf):
    sparsity: float = 0.5                    # fraction of weights zeroed per layer (ignored when N:M)
    prune_n: int = 0                         # N:M: N zeros in every M consecutive inputs (0 = off)
    prune_m: int = 0
    blocksize: int = 128                     # OBS/GPTQ lazy-update block (columns)
    damp: float = 0.01                       # Hessian damping, fraction of mean diag(H)
    true_sequential: bool = False            # stages q/k/v, o, gate/up, down instead of one per layer


@dataclass
class QuantConf:
    _target_: str = MISSING


@dataclass
class UniformQuantConf(QuantConf):
    _target_: str = "prune_lab.quant.Uniform"
    bits: int = 4
    sym: bool = True
    group_size: Optional[int] = None         # null: one scale per output channel
    bits_options: List[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    act_order: bool = False                  # GPTQ columns by decreasing diag(H), static groups


@dataclass
class MixedQuantConf(QuantConf):
    _target_: str = "prune_lab.quant.Mixed"
    bits_options: List[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    weights: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.15, 0.25, 0.10])
    allocation: str = "budget"               # quantile | budget | threshold3
    target_avg_bits: Optional[float] = 4.0
    thresholds: List[float] = field(default_factory=lambda: [0.5, 1.2])
    sym: bool = True
    group_size: Optional[int] = None
    act_order: bool = False
    score_power: float = 1.0                 # budget: minimise sum score^p * error(bits)


# ---- finetune ------------------------------------------------------------------------------
@dataclass
class FinetuneConf:
    _target_: str = MISSING


@dataclass
class TrainConf(FinetuneConf):
    lr: float = 2e-4
    max_steps: int = 200
    epochs: Optional[int] = None            # if set, overrides max_steps (passes over the split)
    batch_size: int = 8
    seq_len: int = 256
    split: str = "train"
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass
class LoraConf(TrainConf):
    _target_: str = "prune_lab.finetune.LoRA"
    lr: float = 2e-3
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(DECODER_LINEARS))


@dataclass
class FullConf(TrainConf):
    _target_: str = "prune_lab.finetune.Full"
    lr: float = 5e-5


# ---- reconstruct / engine ---------------------------------------------------------------------
@dataclass
class ReconstructConf:
    _target_: str = "prune_lab.reconstruct.Reconstruct"
    mode: str = "none"                       # none | bias | lstsq | obs
    damp: float = 0.01                       # Gram damping, relative to mean(diag)
    fit_bias: bool = False                   # lstsq/obs: affine fit (adds a bias to o_proj/down_proj)
    obs_chunk: int = 0                       # obs: units removed per greedy step (0 = count/64)
    residual: bool = True                    # lstsq/obs: the refit also absorbs the residual-stream drift


@dataclass
class EngineConf:
    _target_: str = "prune_lab.engine.Engine"
    device: str = "auto"                     # compute device of the layer being calibrated
    offload: bool = False                    # keep the other layers and the activations on CPU
    propagate: str = "pruned"                # next layer's inputs from the pruned | dense layer
    progress: bool = True


# ---- eval ----------------------------------------------------------------------------------
@dataclass
class PPLConf:
    datasets: List[str] = field(default_factory=lambda: ["data"])   # "data" = the job's dataset
    split: str = "test"
    seq_len: int = 256
    batch_size: int = 16
    max_windows: Optional[int] = None


@dataclass
class ZeroShotConf:
    tasks: List[str] = MISSING              # lm_eval task names; [] = skip zero-shot
    num_fewshot: int = 0
    batch_size: int = 8
    limit: Optional[int] = None
    include_path: Optional[str] = None       # directory of local task yaml files


@dataclass
class EfficiencyConf:
    prompt_len: int = 128
    gen_tokens: int = 32
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 5
    warmup: int = 1


@dataclass
class EvalConf:
    _target_: str = "prune_lab.eval.Evaluator"
    before: bool = False                     # also evaluate the dense model
    ppl: Optional[PPLConf] = None           # every conf/eval option sets it: the job's objective
    zeroshot: Optional[ZeroShotConf] = None
    efficiency: Optional[EfficiencyConf] = None


# ---- job -----------------------------------------------------------------------------------
class ExportFormat(Enum):
    hf = 1                                   # a plain Hugging Face directory (uniform layer shapes only)


@dataclass
class OutputConf:
    save_model: bool = False
    export: Optional[ExportFormat] = None    # hf: also write run_dir/hf, loadable by from_pretrained
    plots: bool = True
    save_scores: bool = True


@dataclass
class CacheConf:
    enabled: bool = True
    dir: Optional[str] = None               # set in conf/config.yaml (env PRUNE_LAB_CACHE)
    keep_dense: bool = True                 # multirun: keep the dense model + token streams in memory


class Objective(Enum):
    ppl = 1                                  # perplexity (single objective)
    ppl_params = 2                           # (perplexity, remaining parameters): multi-objective studies


@dataclass
class SearchConf:
    """Values an Optuna preset samples and interpolates into the job (conf/experiment/optuna_*)."""
    attn_share: Optional[float] = None      # attention's share of the removed params out of 10
    w_activation: Optional[float] = None    # experiment=optuna_mixed: the five score weights ...
    w_hessian: Optional[float] = None
    w_weight: Optional[float] = None
    w_output: Optional[float] = None
    w_stability: Optional[float] = None
    score_power: Optional[float] = None     # ... and the budget allocation's score power


@dataclass
class JobConf:
    seed: int = 0
    verify: bool = False                     # check pruned logits == dense logits with units zeroed
    model: ModelConf = MISSING
    data: DataConf = MISSING
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    importance: ImportanceConf = MISSING
    layer_importance: Optional[LayerImportanceConf] = None
    allocator: Optional[AllocatorConf] = MISSING     # null (allocator=none): analyse only
    reconstruct: ReconstructConf = MISSING
    engine: EngineConf = field(default_factory=EngineConf)
    finetune: FinetuneConf = MISSING
    eval: EvalConf = MISSING
    output: OutputConf = field(default_factory=OutputConf)
    cache: CacheConf = field(default_factory=CacheConf)
    objective: Objective = Objective.ppl     # what the task function returns to a sweeper
    search: SearchConf = field(default_factory=SearchConf)
    method: MethodConf = MISSING
    quant: QuantConf = MISSING


SCHEMAS = {
    "model": {"embedded": EmbeddedModelConf, "hf": HFModelConf, "pruned": PrunedModelConf,
              "random": RandomModelConf},
    "data": {"wiki_vital": WikiVitalConf, "hub": HubTextConf, "text": LocalTextConf},
    "importance": {"base": ImportanceConf, "taylor": TaylorConf, "flap": FlapConf, "file": FileImportanceConf,
                   "obs": ObsImportanceConf},
    "layer_importance": {"base": LayerImportanceConf, "file": FileLayerImportanceConf},
    "allocator": {"uniform": AllocatorConf, "layerwise": LayerwiseConf, "global": GlobalConf,
                  "depth": DepthConf,
                  "uniform_shape": UniformShapeConf},
    "reconstruct": {"base": ReconstructConf},
    "finetune": {"base": FinetuneConf, "lora": LoraConf, "full": FullConf},
    "eval": {"base": EvalConf},
    "method": {"base": MethodConf, "unstructured": UnstructuredConf},
    "quant": {"base": QuantConf, "uniform": UniformQuantConf, "mixed": MixedQuantConf},
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConf)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
