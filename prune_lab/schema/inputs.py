"""Schemas of what a job reads: model, data, calibration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import MISSING


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
class GGUFModelConf(ModelConf):
    _target_: str = "prune_lab.model.GGUFModel"
    path: str = MISSING                      # a .gguf file (needs the `real` extra: pip install 'prune_lab[real]')
    cache_dir: Optional[str] = "${cache.dir}"   # converted HF weights cached under <cache_dir>/gguf/
    use_cache: bool = "${cache.enabled}"  # type: ignore[assignment]  # false: convert on every load


@dataclass
class PackagedGGUFModelConf(ModelConf):
    _target_: str = "prune_lab.model.PackagedGGUFModel"
    distribution: str = MISSING              # the installed Python package that ships the file
    file: str = MISSING                      # its path inside that package
    version: Optional[str] = None            # the version the preset was measured with (a warning if not)
    cache_dir: Optional[str] = "${cache.dir}"
    use_cache: bool = "${cache.enabled}"  # type: ignore[assignment]


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
    allow_overlap: bool = False
