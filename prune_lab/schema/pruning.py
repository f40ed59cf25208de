"""Schemas of structured pruning: importance, layer importance, allocator, reconstruct, engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING


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
    allow_other_model: bool = False          # scores recorded for another model: a warning, not an error


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
    score_norm: str = "none"                 # none: importance / cost | standardize: FLAP's per-layer z-scores


@dataclass
class DepthConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.Depth"
    n_layers: Optional[int] = None


@dataclass
class SearchConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.Search"
    searcher: str = "evolution"              # evolution (EvoPress) | optuna
    fitness: str = "kl"                      # kl (to the dense model) | ppl (on the calibration tokens)
    fitness_tokens: int = 8192
    stages: int = 3
    generations: int = 50
    offspring: int = 16
    sampler: str = "cmaes"                   # searcher=optuna: cmaes | tpe | gp
    mlp_step: float = 0.0625
    damp: float = 0.01
    seed: int = 0
    mutations: int = 3                       # evolution: at most this many level switches per child
    resample: bool = True                    # evolution: each stage's windows drawn anew from the calibration set
    database: str = "memory"                 # memory (CPU) | disk (<run dir>/search_levels/ while it runs)
    rounds: int = 1                          # 2+: the database refit on the last best's pruned path, searched again
    shape: str = "free"                      # free: a level per part | uniform: one shape for all layers (all scored)
    remove_empty_layers: bool = False        # evolution: a mutation may remove a layer's attention or MLP (both: the layer)


@dataclass
class UniformShapeConf(AllocatorConf):
    _target_: str = "prune_lab.allocator.UniformShape"
    max_removed_layers: Optional[int] = None


# ---- reconstruct / engine ---------------------------------------------------------------------
@dataclass
class ReconstructConf:
    _target_: str = "prune_lab.reconstruct.Reconstruct"
    mode: str = "obs"                        # obs | lstsq | bias | none
    damp: float = 0.01                       # Gram damping, relative to mean(diag)
    fit_bias: bool = False                   # lstsq/obs: affine fit (adds a bias to o_proj/down_proj)
    obs_block: int = 0                       # obs: units per OBS step (0 = auto: <= count/64, adaptive; 1 = exact greedy)
    residual: bool = True                    # lstsq/obs: the refit also absorbs the residual-stream drift
    producers: bool = False                  # lstsq/obs: also refit q/k/v, gate/up on the drifted pruned path
    obs_chunk: Optional[int] = None          # renamed obs_block: set, it is an error that says so


@dataclass
class EngineConf:
    _target_: str = "prune_lab.engine.Engine"
    device: str = "auto"                     # compute device of the layer being calibrated
    offload: bool = False                    # keep the other layers and the activations on CPU
    propagate: str = "pruned"                # next layer's inputs from the pruned | dense layer
    progress: bool = True
