"""output.export=compressed_tensors (issue 20, item 3): a quant=uniform model as compressed-tensors
pack-quantized, the format llm-compressor writes and vLLM serves. transformers + compressed-tensors load the
directory (decompressed on CPU) to prune_lab's logits; the packed tensors are the GPTQ run's own codes and
scales; what the format cannot hold is one line before the work it would waste."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import compose_job, run_cli, tiny_overrides, tokens
from prune_lab import load_pruned
from prune_lab.errors import PruneLabError
from prune_lab.recipes import run

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

FAST = ["output.plots=false", "reconstruct=none", "importance=magnitude", "layer_importance=none"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quant_job(tmp_path, *extra):
    """The tiny llama (MLP 64: every input width a multiple of 32), GPTQ-quantized by quant=uniform, exported."""
    ov = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model.intermediate_size")]
    return compose_job(*ov, "model.intermediate_size=64", *FAST, "method=sparsegpt", "method.sparsity=0",
                       "method.blocksize=16", "quant=uniform", "output.save_model=true",
                       "output.export=compressed_tensors", *extra)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits,sym,group_size", [(4, True, 32), (4, False, 16), (8, False, None)])
def test_the_export_loads_in_transformers_to_the_quantized_models_logits(tmp_path, bits, sym, group_size):
    run(quant_job(tmp_path, f"quant.bits={bits}", f"quant.sym={str(sym).lower()}",
                  f"quant.group_size={'null' if group_size is None else group_size}"), tmp_path / "run")
    out = tmp_path / "run" / "compressed_tensors"
    ours = load_pruned(tmp_path / "run" / "model")           # the evaluated weights, bit for bit (packed.py)
    ids = tokens(2, 24)
    # dequantize=True: compressed-tensors decompresses every linear on CPU while loading
    theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, p in ours.named_parameters():
        assert torch.equal(theirs.get_parameter(name), p), name          # the packed codes decode exactly
    assert torch.equal(logits(theirs, ids), logits(ours, ids))
    if sym:     # as saved (no options): packed modules, decompressed at the first forward
        lazy = AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(logits(lazy, ids), logits(ours, ids), atol=1e-5, rtol=0)

    q = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (q["quant_method"], q["format"], q["quantization_status"], q["ignore"]) == (
        "compressed-tensors", "pack-quantized", "compressed", ["lm_head"])
    assert q["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert (weights["num_bits"], weights["symmetric"], weights["type"], weights["group_size"], weights["strategy"]) == (
        bits, sym, "int", group_size, "group" if group_size else "channel")

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight_packed")
        assert w.dtype == torch.int32 and tuple(w.shape) == (64, 64 * bits // 32)
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight_shape").tolist() == [64, 64]
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight_scale").shape == (64, 64 // (group_size or 64))
        packed_bytes = sum(f.get_tensor(n).nbytes for n in names
                           if any(f".{lin}." in n for lin in LINEARS))
    per_linear = {n.rsplit(".", 1)[1] for n in names if ".q_proj." in n}
    assert per_linear == {"weight_packed", "weight_scale", "weight_shape"} | ({"weight_zero_point"} if not sym else set())
    fp32_bytes = sum(4 * p.numel() for n, p in ours.named_parameters() if any(f".{lin}." in n for lin in LINEARS))
    per_weight = bits + (32 + (0 if sym else bits)) / (group_size or 64)   # codes, float32 scales (+ zero points)
    assert packed_bytes < fp32_bytes * (per_weight + 0.1) / 32 and packed_bytes < 0.3 * fp32_bytes
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["export"]["packed_linears"] == 7 * 3 and metrics["export"]["num_bits"] == bits
    assert metrics["export"]["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")]


def test_a_pruned_then_quantized_uniform_shape_model_is_exported(tmp_path):
    """method=structured allocator=uniform_shape + quant=uniform: one layer shape, quantized after pruning."""
    ov = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model.intermediate_size")]
    cfg = compose_job(*ov, "model.intermediate_size=64", *FAST, "allocator=uniform_shape", "allocator.ratio=0.25",
                      "allocator.multiple_of=16", "quant=uniform", "quant.group_size=16", "output.save_model=true",
                      "output.export=compressed_tensors")
    run(cfg, tmp_path / "run")
    ours = load_pruned(tmp_path / "run" / "model")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "compressed_tensors",
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert theirs.config.num_hidden_layers == ours.config.num_hidden_layers
    ids = tokens(2, 24)
    assert torch.equal(logits(theirs, ids), logits(ours, ids))


def fails(tmp_path, cfg, before: str) -> str:
    with pytest.raises(PruneLabError) as err:
        run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "\n" not in str(err.value)
    assert before not in metrics["timings_s"], metrics["timings_s"]
    assert not (tmp_path / "run" / "compressed_tensors").exists()
    return str(err.value)


@pytest.mark.parametrize("overrides,line,before", [
    ([], "output.export=compressed_tensors writes a quant=uniform model with quant.bits=4 or 8 (W4A16 / W8A16) on "
     "its own grid, and this job has quant=none", "load"),
    (["method=sparsegpt", "quant=mixed"], "and this job has quant=mixed", "load"),
    (["method=sparsegpt", "quant=uniform", "quant.bits=3"], "and this job has quant.bits=3", "load"),
    (["method=sparsegpt", "quant=uniform", "quant.group_size=32"], "output.export=compressed_tensors: "
     "quant.group_size=32 must divide every decoder linear's input width, and mlp.down (48 columns)", "engine"),
    (["quant=uniform"], "output.export=compressed_tensors needs every decoder layer to share one shape", "engine"),
    (["quant=uniform", "reconstruct=bias"], "output.export=compressed_tensors: reconstruct=bias adds biases", "score"),
])
def test_what_the_format_cannot_hold_is_one_line_before_the_work(tmp_path, overrides, line, before):
    fast = [o for o in FAST if not (o.startswith("reconstruct=") and "reconstruct=bias" in overrides)]
    cfg = compose_job(*tiny_overrides("llama", tmp_path), *fast, "output.export=compressed_tensors", *overrides)
    assert line in fails(tmp_path, cfg, before)


def test_an_existing_directory_is_never_overwritten_and_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "run" / "compressed_tensors").mkdir(parents=True)
    with pytest.raises(PruneLabError, match="compressed_tensors already exists"):
        run(quant_job(tmp_path), tmp_path / "run")
    assert not any((tmp_path / "run" / "compressed_tensors").iterdir())
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)          # import compressed_tensors fails
    assert "needs the compressed-tensors package: pip install 'prune_lab[serve]'" in fails(
        tmp_path / "b", quant_job(tmp_path / "b"), "load")


def test_cli_refusal_is_one_line_and_exit_2(tmp_path):
    proc = run_cli(*tiny_overrides("llama"), "output.export=compressed_tensors", "method=sparsegpt", "quant=mixed",
                   run_dir=tmp_path / "run", cache=tmp_path / "cache", timeout=300)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("prune_lab: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "quant=mixed" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "compressed_tensors").exists()
