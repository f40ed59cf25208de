"""Recovery bookkeeping: the model before recovery is saved as model_pruned/ (reloads to metrics' `pruned`),
LoRA's default target modules come from the architecture, an unknown one is one line before scoring."""
from __future__ import annotations

import json

import pytest

from conftest import compose_job, run_cli, tiny_model, tiny_overrides, write_small_corpus
from prune_lab.artifacts.compression import load_compression
from prune_lab.finetune import LoRA
from prune_lab.recipes import run


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def corpus_args(tmp_path) -> list[str]:
    corpus = write_small_corpus(tmp_path)
    return ["data=text", f"data.train={corpus}/train.txt", f"data.test={corpus}/test.txt", "output.plots=false"]


@pytest.mark.parametrize("method", ["structured", "sparsegpt"])
def test_the_model_before_recovery_is_saved_and_reloads_to_the_pruned_ppl(tmp_path, method):
    tiny = tiny_overrides("llama", tmp_path)
    extra = ["method=sparsegpt", "method.blocksize=16"] if method == "sparsegpt" else ["allocator=depth",
                                                                                        "allocator.n_layers=1"]
    run(compose_job(*tiny, *corpus_args(tmp_path), *extra, "finetune=lora", "finetune.max_steps=3",
                    "finetune.batch_size=2", "finetune.seq_len=32", "finetune.lr=0.05", "output.save_model=true"),
        tmp_path / "a")
    saved = metrics(tmp_path / "a")
    assert saved["status"] == "ok" and saved["pruned"]["ppl/data"] != saved["recovered"]["ppl/data"]
    assert {"save_pruned", "save"} <= set(saved["timings_s"])
    if method == "sparsegpt":                        # masks and bits beside the weights, as in model/
        assert load_compression(tmp_path / "a" / "model_pruned")[0]
    shrink = [o for o in tiny if not o.startswith("model")]
    for name, key in (("model_pruned", "pruned"), ("model", "recovered")):
        run(compose_job(*shrink, *corpus_args(tmp_path), "model=pruned", f"model.path={tmp_path}/a/{name}",
                        "allocator.ratio=0", "eval.before=true"), tmp_path / name)
        assert metrics(tmp_path / name)["dense"]["ppl/data"] == saved[key]["ppl/data"]     # bit for bit


def test_no_model_pruned_without_recovery(tmp_path):
    run(compose_job(*tiny_overrides("llama", tmp_path), *corpus_args(tmp_path), "allocator=depth",
                    "allocator.n_layers=1", "output.save_model=true"), tmp_path / "a")
    assert (tmp_path / "a" / "model").is_dir() and not (tmp_path / "a" / "model_pruned").exists()


def test_lora_targets_default_to_the_architectures_projections():
    assert LoRA().targets(tiny_model("opt")) == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert LoRA().targets(tiny_model("llama")) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"]
    assert LoRA(target_modules=["q_proj"]).targets(tiny_model("opt")) == ["q_proj"]


def test_an_opt_job_recovers_with_the_default_lora_targets(tmp_path):
    run(compose_job(*tiny_overrides("opt", tmp_path), *corpus_args(tmp_path), "finetune=lora",
                    "finetune.max_steps=2", "finetune.batch_size=2", "finetune.seq_len=32"), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["finetune"]["steps"] == 2 and "recovered" in m


@pytest.mark.parametrize("finetune", ["lora", "distill"])
def test_an_unknown_lora_target_is_one_line_before_scoring(tmp_path, finetune):
    proc = run_cli(*tiny_overrides("opt"), *corpus_args(tmp_path), f"finetune={finetune}",
                   "finetune.target_modules=[q_proj,o_proj]", run_dir=tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and errors[0].startswith("prune_lab: error: finetune.target_modules ['o_proj']")
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "score" not in m.get("timings_s", {})
    assert not (tmp_path / "run" / "scores.safetensors").exists()
