"""Schemas of the unstructured / quantization family (method, quant) and of recovery (finetune)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from omegaconf import MISSING



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
    asymmetric: float = 0.0                  # fraction in [0, 1] of the fit of W'·X~ (pruned path) to W·X (dense)
    residual: bool = False                   # asymmetric: also absorb the residual drift into attn.o / mlp.down


@dataclass
class SparseGPTConf(UnstructuredConf):
    _target_: str = "prune_lab.method.SparseGPT"
    asymmetric: float = 0.25                 # GPTAQ's default (0.5 ties it on lab-llama, README)
    residual: bool = True


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


class QuantScore(Enum):
    lab = 1                                  # the lab's five dimensions, each per output channel (README)
    original = 2                             # the seed SparseGPT-enhanced definitions (allocation.original_dimensions)


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
    quantiles: Optional[List[float]] = None  # quantile: cumulative weight-share boundaries (len(bits_options) - 1)
    layer_avg_bits: Dict[int, float] = field(default_factory=dict)   # {layer: average bits} instead of target_avg_bits
    score: QuantScore = QuantScore.lab       # which definitions of the five dimensions


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
    target_modules: Optional[List[str]] = None   # null: the architecture's decoder projections


@dataclass
class FullConf(TrainConf):
    _target_: str = "prune_lab.finetune.Full"
    lr: float = 5e-5


@dataclass
class DistillConf(TrainConf):
    _target_: str = "prune_lab.finetune.Distill"
    mode: str = "lora"                       # lora | full: what is trained (as finetune=lora / full)
    lr: Optional[float] = None               # null: the mode's default (lora 2e-3, full 5e-5)
    temperature: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_layers: Optional[List[int]] = None    # dense layer indices; null: every layer the student kept
    teacher_topk: Optional[int] = None       # k: KL over the teacher's top-k (precomputed on CPU); null: all
    teacher_correction_steps: int = 0        # n > 0: the teacher first takes n CE-LoRA steps on the split
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None
