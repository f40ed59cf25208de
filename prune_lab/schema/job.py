"""Schemas of evaluation, output, cache and search, and the whole job (JobConf)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from omegaconf import MISSING

from .compress import FinetuneConf, MethodConf, QuantConf
from .inputs import CalibrationConf, DataConf, ModelConf
from .pruning import (
    AllocatorConf,
    EngineConf,
    ImportanceConf,
    LayerImportanceConf,
    ReconstructConf,
)


# ---- eval ----------------------------------------------------------------------------------
@dataclass
class PPLConf:
    datasets: List[str] = field(default_factory=lambda: ["data"])   # "data" = the job's dataset
    split: str = "test"
    seq_len: int = 256
    batch_size: int = 16
    max_windows: Optional[int] = None
    prefix_windows: List[int] = field(default_factory=list)   # also the PPL of the first n windows, same pass


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
    gguf = 2                                 # one GGUF file for llama.cpp (per-layer widths: arch deci)
    compressed_tensors = 3                   # quant=uniform 4|8-bit as compressed-tensors pack-quantized (vLLM)


class GGUFType(Enum):
    f32 = 1
    f16 = 2
    bf16 = 3
    q8_0 = 4                                 # llama.cpp's 8-bit blocks of 32
    q4_0 = 5                                 # exactly a quant=uniform 4-bit symmetric grid (group size % 32 == 0)
    q4_1 = 6                                 # ... or asymmetric


@dataclass
class OutputConf:
    save_model: bool = False
    export: Optional[ExportFormat] = None    # hf: run_dir/hf for from_pretrained; gguf: model.gguf;
    #                                          compressed_tensors: run_dir/compressed_tensors
    gguf_type: Optional[GGUFType] = None     # output.export=gguf's tensor type (null = f16)
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
    """Values an Optuna preset samples and interpolates into the job (conf/hparams_search/optuna_*)."""
    attn_share: Optional[float] = None      # attention's share of the removed params out of 10
    w_activation: Optional[float] = None    # hparams_search=optuna_mixed: the five score weights ...
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
