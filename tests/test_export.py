"""output.export=hf: every uniform pruned shape, on every architecture, loads with plain
AutoModelForCausalLM.from_pretrained and computes the same logits; lm-eval's HF model, loading the
directory by itself, gives the same log-likelihoods as the in-memory pruned model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY, lively, run_cli, tiny_overrides, tokens
from prune_lab.errors import PruneLabError
from prune_lab.artifacts.export import export_hf
from prune_lab.model import RandomModel
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan

# More KV groups than the conftest shapes, so that removing one leaves a head count that does not
# divide hidden_size (6 of 8 on hidden 64; 12 of 14 on qwen2's 112): the case LlamaConfig refuses.
KV = {"llama": 4, "mistral": 4, "qwen3": 4, "qwen2": 7}
PLANS = {"width": PruningPlan(attn={i: [1] for i in range(3)}, mlp={i: [0, 3, 7, 9, 20] for i in range(3)}),
         "width+depth": PruningPlan(attn={i: [2] for i in (0, 2)}, mlp={i: [5, 6] for i in (0, 2)}, layers=[1])}


def pruned_model(arch: str, plan: PruningPlan, bias: bool = False):
    shape = dict(TINY[arch], num_key_value_heads=KV[arch], num_hidden_layers=3, intermediate_size=48,
                 attention_bias=bias)
    return apply_plan(lively(RandomModel(**shape, device="cpu").build()), plan)


@pytest.fixture(scope="module")
def tokenizer():
    return RandomModel(device="cpu").load_tokenizer()


def padded_batch():
    x = tokens(2, 12, seed=5)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    return x, mask


@pytest.mark.parametrize("variant", list(PLANS))
def test_every_exported_shape_loads_with_plain_transformers(arch, variant, tmp_path):
    model = pruned_model(arch, PLANS[variant])
    info = export_hf(model, None, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    heads = model.model.layers[0].self_attn.q_proj.out_features // config["head_dim"]
    assert (config["num_attention_heads"], config["num_hidden_layers"]) == (heads, len(model.model.layers))
    expected_arch = "MistralForCausalLM" if arch == "llama" else type(model).__name__
    assert info["architecture"] == config["architectures"][0] == expected_arch
    x, mask = padded_batch()
    for impl in ("sdpa", "eager"):
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation=impl).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
            real = mask.bool()                              # padded positions' outputs are arbitrary
            torch.testing.assert_close(plain(x, attention_mask=mask).logits[real],
                                       model(x, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)


# Requests of different lengths, so lm-eval pads its batch; "Answer:" + " a dog" splits inside a word.
REQUESTS = [("The capital of France is", " Paris"), ("Water boils at", " one hundred degrees Celsius"),
            ("Question: Which animal barks?\nAnswer:", " a dog"), ("Once upon a time there", " was")]


def our_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and is-greedy with the in-memory pruned model (lm-eval's split:
    tokenise context+continuation, the continuation is what follows the context's own tokens)."""
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)[len(ctx) - 1:-1]
    cont = torch.tensor(whole[len(ctx):])
    return logp.gather(1, cont[:, None]).sum().item(), bool((logp.argmax(-1) == cont).all())


def lm_eval_loglikelihoods(path) -> list[tuple[float, bool]]:
    """lm-eval's own HF model, loading the directory by itself (plain transformers, no prune_lab)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=str(path), batch_size=len(REQUESTS), device="cpu")
    assert type(lm.model).__module__.startswith("transformers.")
    return lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)],
                            disable_tqdm=True)


def assert_lm_eval_agrees(model, tokenizer, path) -> None:
    got = lm_eval_loglikelihoods(path)
    want = [our_loglikelihood(model, tokenizer, *r) for r in REQUESTS]
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    assert len({round(ll, 3) for ll, _ in want}) == len(REQUESTS)        # distinct: a mix-up would show


@pytest.mark.parametrize("variant", list(PLANS))
def test_lm_eval_hf_model_scores_every_exported_shape(arch, variant, tokenizer, tmp_path):
    model = pruned_model(arch, PLANS[variant])
    export_hf(model, tokenizer, tmp_path / "hf")
    assert_lm_eval_agrees(model, tokenizer, tmp_path / "hf")


@pytest.mark.lab
def test_lm_eval_scores_the_uniform_25_percent_lab_llama_export(lab_model, tmp_path):
    """The issue's case: 16 -> 12 query heads on hidden 256, which LlamaConfig refuses (Mistral export)."""
    model, tokenizer = lab_model
    keep_out = torch.randperm(768, generator=torch.Generator().manual_seed(0))[:192].tolist()
    apply_plan(model, PruningPlan(attn={i: [i % 4] for i in range(12)}, mlp={i: keep_out for i in range(12)}))
    info = export_hf(model, tokenizer, tmp_path / "hf")
    assert (info["architecture"], info["num_attention_heads"], info["intermediate_size"]) == \
        ("MistralForCausalLM", 12, 576)
    assert_lm_eval_agrees(model, tokenizer, tmp_path / "hf")


def test_refusals_are_one_line(tmp_path):
    mixed = pruned_model("llama", PruningPlan(attn={0: [1]}, mlp={2: [1, 2]}))
    with pytest.raises(PruneLabError, match="share one shape") as e:
        export_hf(mixed, None, tmp_path / "a")
    biased = pruned_model("llama", PLANS["width"], bias=True)   # no bias-free twin class to fall back on
    with pytest.raises(PruneLabError, match="transformers refuses the pruned llama shape") as e2:
        export_hf(biased, None, tmp_path / "b")
    assert "\n" not in str(e.value) + str(e2.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_exports_uniform_shape_and_refuses_global(tmp_path):
    tiny = tiny_overrides("llama", tmp_path) + ["output.plots=false", "output.export=hf"]
    ok = run_cli(*tiny, "allocator=uniform_shape", "allocator.max_removed_layers=0",
                 run_dir=tmp_path / "a", cache=tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "hf")
    assert plain.config.intermediate_size == metrics["model"]["layers"][0]["mlp_width"] < 48
    assert metrics["export"]["num_hidden_layers"] == 3

    bad = run_cli(*tiny, "allocator=global", run_dir=tmp_path / "b", cache=tmp_path / "cache")
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("prune_lab: error:")]
    assert len(lines) == 1 and "share one shape" in lines[0]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "b" / "hf").exists()


def test_cli_multiple_of_wider_than_a_layer_fails_before_scoring(tmp_path):
    tiny = tiny_overrides("llama", tmp_path) + ["output.plots=false", "allocator.multiple_of=64"]
    bad = run_cli(*tiny, run_dir=tmp_path / "a", cache=tmp_path / "cache")
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("prune_lab: error:")]
    assert lines == ["prune_lab: error: allocator.multiple_of=64 is larger than layer 0's MLP width 48 or "
                     "query width 64"]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "score" not in metrics["timings_s"]
