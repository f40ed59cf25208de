"""Pruned checkpoints: exact reload on every architecture, plain from_pretrained, bad inputs, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ALL_ARCHS, compose_job, tiny_model, tiny_overrides, tokens
from prune_lab import load_pruned
from prune_lab.core.adapter import decoder_layers, layer_shapes
from prune_lab.artifacts.checkpoint import save_pruned
from prune_lab.errors import CheckpointError, PruneLabError
from prune_lab.model import RandomModel
from prune_lab.core.plan import PruningPlan
from prune_lab.recipes import run
from prune_lab.core.executor import apply_plan

MIXED = PruningPlan(attn={0: [1]}, mlp={2: [1, 5, 7], 3: list(range(20))}, layers=[1])
UNIFORM = PruningPlan(attn={i: [0] for i in range(3)}, mlp={i: list(range(10)) for i in range(3)})


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if x is None else x).logits


def saved(model, plan, tmp_path):
    apply_plan(model, plan)
    save_pruned(model, None, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_reload_is_exact_on_every_arch_with_removed_layer(arch, tmp_path):
    model = tiny_model(arch, layers=4)
    path = saved(model, MIXED, tmp_path)
    reloaded = load_pruned(path)
    assert layer_shapes(reloaded) == layer_shapes(model)
    assert len(decoder_layers(reloaded)) == 3
    assert reloaded.config.prune_lab["removed_layers"] == [1]
    assert torch.equal(logits(reloaded), logits(model))
    # per-layer widths differ, so the top-level config keeps the dense (buildable) head counts
    config = json.loads((path / "config.json").read_text())
    assert config["num_attention_heads"] == model.config.num_attention_heads
    assert [s["mlp_width"] for s in config["prune_lab"]["layers"]] == [48, 45, 28]


def test_reload_keeps_dtype_and_ties_embeddings(tmp_path):
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                  vocab_size=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = saved(model, PruningPlan(mlp={0: [0, 3]}, attn={1: [0]}), tmp_path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()   # stored once
    reloaded = load_pruned(path)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_uniform_prune_loads_with_plain_from_pretrained(arch, tmp_path):
    model = tiny_model(arch, layers=3)
    path = saved(model, UNIFORM, tmp_path)
    config = json.loads((path / "config.json").read_text())
    q_heads = model.config.num_attention_heads // model.config.num_key_value_heads
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) \
        == (q_heads, 1, 38)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(logits(plain), logits(model))
    assert torch.equal(logits(load_pruned(path)), logits(model))


def test_uniform_prune_with_head_count_llama_refuses_loads_as_mistral(tmp_path):
    # 8 q / 4 kv heads on hidden 64: removing one group leaves 6 heads, which LlamaConfig refuses
    model = RandomModel(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                        num_hidden_layers=2, intermediate_size=48, device="cpu").build()
    path = saved(model, PruningPlan(attn={0: [2], 1: [0]}), tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["num_attention_heads"]) == \
        ("mistral", ["MistralForCausalLM"], 6)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path).eval()), logits(model))
    reloaded = load_pruned(path)
    assert reloaded.model.layers[0].self_attn.num_key_value_groups == 2
    assert torch.equal(logits(reloaded), logits(model))


def test_biased_llama_with_refused_head_count_keeps_dense_config(tmp_path):
    model = RandomModel(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                        num_hidden_layers=2, intermediate_size=48, attention_bias=True, device="cpu").build()
    path = saved(model, PruningPlan(attn={0: [2], 1: [0]}), tmp_path)
    assert json.loads((path / "config.json").read_text())["num_attention_heads"] == 8
    assert torch.equal(logits(load_pruned(path)), logits(model))


@pytest.fixture
def checkpoint(tmp_path):
    return saved(tiny_model("llama", layers=4), MIXED, tmp_path)


def edit_manifest(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["prune_lab"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.rename(p.parent / "gone"), "does not exist"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda p: (p / "config.json").write_text("{not json"), "cannot read"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
     "corrupt or truncated"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), "corrupt or truncated"),
    (lambda p: edit_manifest(p, lambda m: m["layers"][1].update(mlp_width=30)), "does not match the weights"),
    (lambda p: edit_manifest(p, lambda m: m["layers"].pop()), "does not match the weights"),
    (lambda p: edit_manifest(p, lambda m: m["layers"][0].update(q_heads=3)), "q_heads=3 in the manifest"),
    (lambda p: edit_manifest(p, lambda m: m["layers"].extend(m["layers"][:1] * 3000)), "lists 3003 decoder layers"),
    (lambda p: edit_manifest(p, lambda m: m["layers"][0].pop("kv_heads")), "malformed manifest"),
    (lambda p: edit_manifest(p, lambda m: m.clear()), "no prune_lab manifest"),
])
def test_bad_checkpoints_fail_with_one_line(checkpoint, damage, message):
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pruned(checkpoint)
    assert "\n" not in str(err.value)


def test_job_recovers_saves_and_reloads_the_same_ppl_in_an_eval_only_job(tmp_path):
    # llama: AutoTokenizer reloads the lab tokenizer as the same class (a qwen2 config maps it to Qwen2Tokenizer)
    tiny = [o.replace("num_hidden_layers=3", "num_hidden_layers=4") for o in tiny_overrides("llama", tmp_path)]
    job = [o for o in tiny if not o.startswith("model")] + ["output.plots=false"]
    run(compose_job(*tiny, "output.plots=false", "allocator=depth", "allocator.n_layers=1", "finetune=lora",
                    "finetune.max_steps=4", "finetune.batch_size=2", "finetune.seq_len=32",
                    "output.save_model=true"), tmp_path / "a")
    saved_run = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved_run["finetune"]["steps"] == 4 and (tmp_path / "a" / "loss.csv").exists()
    model_dir = tmp_path / "a" / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    assert json.loads((model_dir / "config.json").read_text())["prune_lab"]["removed_layers"] != []

    run(compose_job(*job, "model=pruned", f"model.path={model_dir}", "allocator.ratio=0", "eval.before=true"),
        tmp_path / "b")
    reloaded_run = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert reloaded_run["model"]["dense"]["num_layers"] == 3
    assert saved_run["pruned"]["ppl/data"] != saved_run["recovered"]["ppl/data"]
    assert reloaded_run["dense"]["ppl/data"] == saved_run["recovered"]["ppl/data"]   # bit for bit
    # an eval-only job: no scores computed, evaluated once (the dense result is the "pruned" one)
    assert reloaded_run["pruned"] == reloaded_run["dense"]
    assert {"eval_dense", "allocate"} <= set(reloaded_run["timings_s"])
    assert not {"score", "evaluate", "prune"} & set(reloaded_run["timings_s"])

    with pytest.raises(PruneLabError) as err:
        run(compose_job(*job, "model=pruned", f"model.path={tmp_path}/nowhere"), tmp_path / "c")
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_reloaded_checkpoint_tokenises_exactly_as_before(arch, tmp_path):
    """A qwen2 config made AutoTokenizer load the saved lab tokenizer as Qwen2Tokenizer, which splits
    digits one by one: model=pruned must reload the very tokenizer class that was saved."""
    from prune_lab.model import PrunedModel
    tok = RandomModel(arch=arch, device="cpu").load_tokenizer()
    ckpt = save_pruned(tiny_model(arch, layers=1), tok, tmp_path / "ck")
    _, again = PrunedModel(path=str(ckpt), device="cpu").load()
    text = "In 1987, 12345 people read  Übersicht naïve\n\ttabs 3.14159 and 2026-11-23."
    assert type(again) is type(tok) and again.pad_token == tok.pad_token
    assert again(text).input_ids == tok(text).input_ids
    assert again(text).input_ids != [] and len(tok("12345").input_ids) < 5      # digits stay merged


@pytest.mark.parametrize("quant", [None, 4])
def test_nm_sparse_linears_store_only_their_kept_weights_and_reload_bit_for_bit(quant, tmp_path):
    """2:4 (SparseGPT, alone or with 4-bit GPTQ): the kept values (or codes) plus 2-bit offsets, not dense zeros."""
    from prune_lab.engine import walk
    from prune_lab.method import SparseGPT
    from prune_lab.quant import Uniform
    model = tiny_model("llama", intermediate=64)
    method = SparseGPT(prune_n=2, prune_m=4, blocksize=16)
    if quant:
        method.with_quant(Uniform(quant, group_size=16))
    walk(model, [tokens(4, 32, seed=s) for s in range(2)], method, progress=False)
    masks, grids = method.masks_by_name(), method.grids_by_name()
    assert len(masks) == 3 * 7 and all(float(m["mask"].float().mean()) == 0.5 for m in masks.values())
    save_pruned(model, None, tmp_path / "nm", grids=grids, masks=masks)
    save_pruned(model, None, tmp_path / "dense", grids=grids)              # the same model, zeros stored
    reloaded = load_pruned(tmp_path / "nm")
    for name, t in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], t), name
    assert torch.equal(logits(reloaded), logits(model))
    file = "quantized.safetensors" if quant else "sparse.safetensors"
    with safe_open(str(tmp_path / "nm" / file), framework="pt") as f:
        assert "model.layers.0.mlp.up_proj.offsets" in f.keys()
    with safe_open(str(tmp_path / "nm" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k in masks]                     # no dense copy of those weights
    weights = sum(m["mask"].numel() for m in masks.values())
    if quant:       # 4-bit codes of half the weights + 2-bit offsets = 3 bits a weight, vs 4 for every code
        sizes = [(tmp_path / d / file).stat().st_size for d in ("nm", "dense")]
        assert sizes[0] < sizes[1] - weights / 8 + 4096                    # + 21 offset tensors in the header
    else:           # fp32: 2 values + 2 two-bit offsets per 4 weights = 17 bits a weight, vs 32
        assert (tmp_path / "nm" / file).stat().st_size < weights * 4 * 17 / 32 + 8192     # + the header
        dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
        assert (tmp_path / "nm" / "model.safetensors").stat().st_size + (tmp_path / "nm" / file).stat().st_size \
            < dense - weights * 4 * 0.45
