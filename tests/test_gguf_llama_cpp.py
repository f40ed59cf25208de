"""output.export=gguf run by llama.cpp itself (llama-cpp-python): the exported file's logits equal prune_lab's
within fp16 tolerance, for uniform and per-layer (deci) shapes with a removed layer (and an attention-free
layer, plan.attn_blocks), on every architecture
llama.cpp can express; on lab-llama llama.cpp also tokenizes text as prune_lab does.

llama-cpp-python compiles llama.cpp at install (`make llama-cpp`; .ci/run installs it best effort): where it
is absent these tests skip with that reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ARCHS, TINY, lively
from prune_lab.core.executor import apply_plan
from prune_lab.core.plan import PruningPlan
from prune_lab.model import RandomModel

pytest.importorskip("gguf", reason="the gguf package (extra `real`) is not installed")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama-cpp)")
from prune_lab.artifacts.gguf_write import export_gguf  # noqa: E402

KV = {"llama": 4, "mistral": 4, "qwen3": 4, "qwen2": 7}
PLANS = {"uniform": PruningPlan(attn={i: [1] for i in (0, 2, 3)}, mlp={i: [0, 3, 7, 9, 20] for i in (0, 2, 3)},
                                layers=[1]),
         "per-layer": PruningPlan(attn={0: [1], 3: [0, 2]}, mlp={0: [5], 2: [0, 4], 3: [1, 2, 3]}, layers=[1])}
# fp16 tolerance, as verify=true's float16 rtol: 1e-2 x max(1, max |logit|) (llama.cpp keeps its KV cache in f16)
RTOL = {"f32": 1e-2, "f16": 1e-2, "q8_0": 5e-2}


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def close(ours: torch.Tensor, theirs: np.ndarray, rtol: float) -> float:
    diff = float(np.abs(ours.numpy() - theirs).max())
    assert diff <= rtol * max(1.0, float(ours.abs().max())), diff
    return diff


@pytest.fixture(scope="module")
def tokenizer():
    return RandomModel(device="cpu").load_tokenizer()


# a Qwen3 whose layers differ is refused (no llama.cpp architecture has per-layer widths and q/k norms)
@pytest.mark.parametrize("arch,variant", [(a, v) for a in ARCHS for v in PLANS if (a, v) != ("qwen3", "per-layer")])
def test_llama_cpp_runs_the_export_with_prune_labs_logits(arch, variant, tokenizer, tmp_path):
    shape = dict(TINY[arch], num_key_value_heads=KV[arch], num_hidden_layers=4, intermediate_size=48)
    model = apply_plan(lively(RandomModel(**shape, device="cpu").build()).eval(), PLANS[variant])
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert info["architecture"] == ("deci" if variant == "per-layer" else "qwen3" if arch == "qwen3" else "llama")
    ids = torch.randint(0, 8192, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    close(ours, llama_cpp_logits(tmp_path / "m.gguf", ids), RTOL["f16"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_an_attention_free_layer_with_prune_labs_logits(arch, tokenizer, tmp_path):
    """plan.attn_blocks: deci's attention-free layer (head_count 0, no attention tensors)."""
    shape = dict(TINY[arch], num_key_value_heads=KV[arch], num_hidden_layers=4, intermediate_size=48)
    plan = PruningPlan(attn={0: [1]}, mlp={1: [2, 3]}, attn_blocks=[2])
    model = apply_plan(lively(RandomModel(**shape, device="cpu").build()).eval(), plan)
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert info["architecture"] == "deci" and info["head_count"][2] == 0
    ids = torch.randint(0, 8192, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    close(ours, llama_cpp_logits(tmp_path / "m.gguf", ids), RTOL["f16"])


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_lab_llama_per_layer_export_tokenizes_and_computes_as_prune_lab(lab_model, kind, tmp_path):
    model, tokenizer = lab_model
    plan = PruningPlan(attn={0: [1], 5: [0, 2]}, mlp={i: list(range(0, 40 * (i + 1), 3)) for i in range(8)},
                       layers=[9])
    apply_plan(model, plan)
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", kind)
    assert info["architecture"] == "deci" and info["block_count"] == len(model.model.layers)
    text = "The Eiffel Tower is a wrought-iron lattice tower in Paris, built in 1889."
    ids = tokenizer.encode(text, add_special_tokens=False)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    close(ours, llama_cpp_logits(tmp_path / "m.gguf", ids), RTOL[kind])


@pytest.mark.parametrize("sym,kind", [(True, "q4_0"), (False, "q4_1")])
def test_llama_cpp_runs_a_gptq_4_bit_export_with_prune_labs_logits(tmp_path, sym, kind):
    """quant=uniform (GPTQ, 4 bits, groups of 32) written on its own grid: llama.cpp's logits are the quantized
    model's (it rounds the activations to 8 bits for its q4 dot products: q8_0's tolerance)."""
    from test_export_gguf import quant_job
    from prune_lab import load_pruned
    from prune_lab.recipes import run
    run(quant_job(tmp_path, sym, kind, "output.save_model=true"), tmp_path / "run")
    model = load_pruned(tmp_path / "run" / "model").eval()
    ids = torch.randint(0, 8192, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    close(ours, llama_cpp_logits(tmp_path / "run" / "model.gguf", ids), RTOL["q8_0"])


def test_a_pruned_then_gptq_quantized_model_runs_in_llama_cpp_as_per_layer_q4_0(tmp_path):
    """method=structured + quant=uniform: per-layer widths (global allocation on multiples of 32, so every row
    holds whole 4-bit blocks) quantized by GPTQ, written as deci with Q4_0 blocks on GPTQ's own grid."""
    from conftest import compose_job, tiny_overrides
    from prune_lab import load_pruned
    from prune_lab.recipes import run
    ov = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model.intermediate_size")]
    run(compose_job(*ov, "model.intermediate_size=128", "model.num_key_value_heads=4", "output.plots=false",
                    "importance=magnitude", "layer_importance=none", "reconstruct=none", "allocator.ratio=0.3",
                    "allocator.multiple_of=32", "quant=uniform", "quant.group_size=32", "output.save_model=true",
                    "output.export=gguf", "output.gguf_type=q4_0"), tmp_path / "run")
    import json
    export = json.loads((tmp_path / "run" / "metrics.json").read_text())["export"]
    assert export["architecture"] == "deci" and export["tensor_types"]["Q4_0"] == 7 * export["block_count"]
    assert len(set(zip(export["head_count_kv"], export["feed_forward_length"]))) > 1
    model = load_pruned(tmp_path / "run" / "model").eval()
    ids = torch.randint(0, 8192, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    close(ours, llama_cpp_logits(tmp_path / "run" / "model.gguf", ids), RTOL["q8_0"])
