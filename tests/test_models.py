"""Model loaders: embedded, local HF dirs, hub ids offline, unsupported architectures."""
from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import ALL_ARCHS, LAB_MODEL, tiny_model
from prune_lab.core.adapter import layer_views
from prune_lab.errors import PruneLabError, UnsupportedArchitecture
from prune_lab.model import EmbeddedModel, HFModel


def test_embedded_lab_llama_loads_offline():
    model, tok = EmbeddedModel(device="cpu").load()
    views = layer_views(model)
    assert len(views) == 12 and sum(p.numel() for p in model.parameters()) == 11_147_520
    assert (views[0].attn.num_heads, views[0].attn.num_kv_heads, views[0].attn.head_dim) == (16, 4, 16)
    assert tok.pad_token is not None and len(tok) == 8192


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_local_hf_dir_loads_every_family(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / arch)
    EmbeddedModel(device="cpu").load_tokenizer().save_pretrained(tmp_path / arch)
    loaded, _ = HFModel(str(tmp_path / arch), device="cpu", dtype="float32").load()
    assert loaded.config.model_type == arch
    assert [v.attn.num_kv_heads for v in layer_views(loaded)] == [v.attn.num_kv_heads for v in layer_views(model)]


def test_missing_model_path_is_one_clear_line(tmp_path):
    with pytest.raises(PruneLabError, match="does not exist") as err:
        HFModel(str(tmp_path / "nope"), device="cpu").load()
    assert "\n" not in str(err.value)


def test_hub_id_offline_fails_clearly():
    with pytest.raises(PruneLabError, match="hub is unreachable"):
        HFModel("meta-llama/Meta-Llama-3-8B", device="cpu").load()


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=8192))
    gpt2.save_pretrained(tmp_path / "gpt2")
    EmbeddedModel(device="cpu").load_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitecture, match="llama, mistral, qwen2, qwen3"):
        HFModel(str(tmp_path / "gpt2"), device="cpu").load()


def test_lab_model_is_a_copy_of_the_shared_one():
    assert (LAB_MODEL / "model.safetensors").stat().st_size > 20_000_000
    assert (LAB_MODEL / "README.md").exists()
