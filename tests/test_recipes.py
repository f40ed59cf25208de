"""The family registry: each family's recipe gives metrics.json the same meaning, honours what it can
(an unstructured model has dense shapes: output.export=hf is a plain HF dir) and refuses what it cannot."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli, text_job, tiny_overrides, tokens
from prune_lab import load_pruned
from prune_lab.recipes import RECIPES, run
from prune_lab.recipes.common import build


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("method,family", [("structured", "structured"), ("sparsegpt", "unstructured"),
                                           ("wanda", "unstructured"), ("magnitude", "unstructured")])
def test_the_recipe_is_chosen_by_the_methods_declared_family(tmp_path, method, family):
    cfg = text_job(tmp_path, f"method={method}")
    assert build(cfg.method).family == family and family in RECIPES


def test_unstructured_export_hf_is_a_plain_hf_dir_with_the_evaluated_weights(tmp_path):
    run(text_job(tmp_path, "method=sparsegpt", "method.blocksize=16", "output.export=hf", "output.save_model=true",
                 "output.plots=false"), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["export"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32).eval()
    saved = load_pruned(tmp_path / "run" / "model").eval()
    batch = tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(plain(batch).logits, saved(batch).logits)
    q = plain.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)          # the 50% mask is in the file


@pytest.mark.parametrize("method", ["structured", "sparsegpt"])
def test_pruned_means_before_recovery_in_both_families(tmp_path, method):
    common = [f"method={method}", "output.plots=false", "cache.enabled=false"]
    if method == "sparsegpt":
        common.append("method.blocksize=16")
    run(text_job(tmp_path, *common), tmp_path / "plain")
    run(text_job(tmp_path, *common, "finetune=lora", "finetune.max_steps=3", "finetune.batch_size=2",
                 "finetune.seq_len=32", "finetune.lr=0.05"), tmp_path / "lora")
    plain, lora = metrics(tmp_path / "plain"), metrics(tmp_path / "lora")
    assert lora["pruned"] == plain["pruned"]                      # after compression, before recovery
    assert lora["recovered"] != lora["pruned"] and "recovered" not in plain


@pytest.mark.parametrize("overrides,line", [
    (["method=sparsegpt", "allocator=global"], "allocator settings plan structured pruning (method=structured); "
     "method=sparsegpt sets its sparsity with method.sparsity or method.prune_n/prune_m: drop the allocator override"),
    (["method=wanda", "verify=true"], "verify=true proves that sliced units equal zeroed ones (method=structured); "
     "method=wanda slices nothing: drop verify=true"),
    (["allocator=none", "output.save_model=true"], "output.save_model=true with allocator=none: an analyse-only "
     "job prunes nothing to save (choose an allocator, or drop output.save_model)"),
])
def test_an_option_a_family_cannot_honour_is_one_line(tmp_path, overrides, line):
    proc = run_cli(*tiny_overrides("llama"), *overrides, run_dir=tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [x for x in proc.stderr.splitlines() if "error" in x.lower()] == [f"prune_lab: error: {line}"]
    assert metrics(tmp_path / "run")["status"] == "failed"
