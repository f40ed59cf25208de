"""Every config in every group composes and instantiates; typos fail at compose time."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, compose_job

GROUPS = ["model", "data", "importance", "layer_importance", "allocator", "finetune", "eval"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
REQUIRED = {("model", "hf"): ["model.path=/tmp/x"], ("model", "pruned"): ["model.path=/tmp/x"],
            ("model", "gguf"): ["model.path=/tmp/x.gguf"],
            ("importance", "file"): ["importance.path=/tmp/x"],
            ("layer_importance", "file"): ["layer_importance.path=/tmp/x"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_names_its_target(group, option):
    extra = REQUIRED.get((group, option), [])
    if group == "allocator" and option in ("layerwise", "depth"):
        extra.append("layer_importance=activation")
    cfg = compose_job(f"{group}={option}", *extra)
    node = cfg[group]
    if node is None:      # layer_importance=none
        return
    assert "_target_" in node, f"{group}={option} must name its _target_"
    OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("group", ["importance", "allocator", "layer_importance", "data"])
def test_light_components_instantiate(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        if option == "file":      # needs a score file (tests/test_workflow.py)
            continue
        node = compose_job(f"{group}={option}")[group]
        if node is not None:
            assert callable(instantiate(node)) or hasattr(instantiate(node), "text")


def test_misspelt_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="ratoi"):
        compose_job("allocator.ratoi=0.3")


def test_unknown_option_fails_at_compose_time():
    with pytest.raises(Exception, match="taylr"):
        compose_job("importance=taylr")


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_job("allocator.ratio=a_lot")


def test_default_job_is_the_offline_lab_setup():
    cfg = compose_job()
    assert cfg.model._target_ == "prune_lab.model.EmbeddedModel" and cfg.model.name == "lab-llama"
    assert cfg.data._target_ == "prune_lab.data.WikiVital"
    assert cfg.allocator.ratio == 0.25
    assert cfg.eval.ppl.seq_len == 256


@pytest.mark.parametrize("preset,hub_id", [("llama3_8b", "meta-llama/Meta-Llama-3-8B"),
                                            ("llama3_1_8b", "meta-llama/Llama-3.1-8B"),
                                            ("qwen2_5_7b", "Qwen/Qwen2.5-7B"),
                                            ("mistral_7b", "mistralai/Mistral-7B-v0.1"),
                                            ("qwen3_8b", "Qwen/Qwen3-8B")])
def test_model_presets_point_at_the_hub(preset, hub_id):
    cfg = compose_job(f"model={preset}")
    assert cfg.model.path == hub_id and cfg.model.trust_remote_code is False
