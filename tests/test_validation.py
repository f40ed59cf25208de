"""Checks that can fail: verify's verdict, eval settings and data, NaN perplexity, corrupt weights,
dataset names, zero-shot tasks and a checkpoint's own code -- all caught before any scoring."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import compose_job, tiny_model, tiny_overrides, write_small_corpus
from prune_lab.recipes import structured as pipeline
from prune_lab.data import CONF_DATA
from prune_lab.errors import DataUnavailable, PruneLabError
from prune_lab.eval import Evaluator
from prune_lab.eval.ppl import perplexity
from prune_lab.model import HFModel, PrunedModel, RandomModel
from prune_lab.recipes import run


def small_job(tmp_path, *extra):
    corpus = write_small_corpus(tmp_path)
    return compose_job(*tiny_overrides("llama", tmp_path), "data=text", f"data.train={corpus}/train.txt",
                       f"data.test={corpus}/test.txt", "output.plots=false", *extra)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_verify_prints_a_verdict_and_fails_the_run_beyond_the_tolerance(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="prune_lab"):
        run(small_job(tmp_path, "verify=true"), tmp_path / "good")
    good = metrics(tmp_path / "good")
    assert good["status"] == "ok" and good["verify"]["passed"] is True
    assert good["verify"]["dtype"] == "float32" and good["verify"]["max_logit_diff"] < 1e-5
    assert any("verify:" in r.getMessage() and "PASS" in r.getMessage() for r in caplog.records)

    apply = pipeline.apply_plan

    def wrong_apply(model, plan):             # a pruning bug: one kept weight changes
        apply(model, plan)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[:, 0] += 0.5
    monkeypatch.setattr(pipeline, "apply_plan", wrong_apply)
    with pytest.raises(PruneLabError, match="verify failed: .* over the float32 tolerance"):
        run(small_job(tmp_path, "verify=true"), tmp_path / "bad")
    bad = metrics(tmp_path / "bad")
    assert bad["status"] == "failed" and bad["verify"]["passed"] is False
    assert "evaluate" not in bad["timings_s"]


@pytest.mark.parametrize("override, message", [
    ("eval.ppl.seq_len=1", "seq_len must be >= 2"),
    ("eval.ppl.batch_size=0", "batch_size must be >= 1"),
    ("eval.ppl.max_windows=-1", "max_windows must be >= 1"),
    ("eval.ppl.prefix_windows=[0]", "prefix_windows must be distinct window counts >= 1"),
    ("eval.ppl.max_windows=3 eval.ppl.prefix_windows=[4]", "exceeds eval.ppl.max_windows=3"),
    ("eval.ppl.datasets=[]", "datasets is empty"),
    ("eval.ppl.datasets=[data,wikitext3]", "unknown dataset 'wikitext3'"),
    ("allocator.layer_start=2 allocator.layer_end=1", "empty or negative"),
])
def test_config_only_errors_fail_when_components_are_built(tmp_path, override, message):
    with pytest.raises(PruneLabError, match=message):
        run(compose_job(*tiny_overrides("llama", tmp_path), *override.split()), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "load" not in m["timings_s"]      # before the model is loaded


def test_a_dataset_name_is_never_a_path(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "evil.yaml").write_text(f"_target_: os.makedirs\nname: {marker}\n")
    relative = os.path.relpath(tmp_path / "evil", CONF_DATA)
    with pytest.raises(PruneLabError, match="unknown dataset"):
        run(compose_job(*tiny_overrides("llama", tmp_path), f"eval.ppl.datasets=[data,'{relative}']"),
            tmp_path / "run")
    assert not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("eval.ppl.seq_len=100000", "fewer than eval.ppl.seq_len=100000"),
    ("eval.ppl.max_windows=null eval.ppl.prefix_windows=[100000]", "prefix_windows: 100000 windows asked"),
    ("allocator.layer_end=9", "outside the model's 3 layers"),
    ("data.test=EMPTY", "an empty split"),
])
def test_errors_that_need_the_model_or_data_come_before_scoring(tmp_path, override, message):
    (tmp_path / "empty.txt").write_text("")
    override = override.replace("EMPTY", str(tmp_path / "empty.txt"))
    with pytest.raises(PruneLabError, match=message):
        run(small_job(tmp_path, *override.split()), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "load" in m["timings_s"] and "score" not in m["timings_s"]


def test_nan_perplexity_is_an_error_not_a_result(tmp_path):
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    stream = torch.randint(0, 8192, (256,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PruneLabError, match="NaN"):
        perplexity(model, stream, seq_len=32, batch_size=4, progress=False)
    evaluator = Evaluator(ppl={"datasets": ["data"], "split": "test", "seq_len": 32, "batch_size": 4,
                               "max_windows": None})
    with pytest.raises(PruneLabError, match="NaN"):
        evaluator(model, None, {"data": object()}, lambda dataset, split: stream)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_model("llama", layers=1).save_pretrained(path)
    RandomModel(device="cpu").load_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_safetensors_under_model_hf_is_one_line(hf_dir, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "header": b"\xff" * 16 + data[16:],
                         "empty": b""}[damage])
    with pytest.raises(PruneLabError, match="corrupt or truncated safetensors") as err:
        HFModel(path=str(broken), device="cpu").load()
    assert "\n" not in str(err.value)


EVIL = "import pathlib\npathlib.Path({marker!r}).mkdir(parents=True, exist_ok=True)\n"


def test_model_pruned_runs_no_checkpoint_code_unless_trusted_for_it(tmp_path):
    from prune_lab.artifacts.checkpoint import save_pruned
    ckpt = save_pruned(tiny_model("llama", layers=1), RandomModel(device="cpu").load_tokenizer(), tmp_path / "ck")
    ran = tmp_path / "ran"
    for part, base in (("config", "LlamaConfig"), ("modeling", "LlamaForCausalLM"),
                       ("tokenization", "PreTrainedTokenizerFast")):
        (ckpt / f"{part}_evil.py").write_text(EVIL.format(marker=str(ran / part)) +
                                              f"from transformers import {base}\nclass Evil{part}({base}):\n"
                                              f"    pass\n")
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "config_evil.Evilconfig", "AutoModelForCausalLM": "modeling_evil.Evilmodeling"}
    (ckpt / "config.json").write_text(json.dumps(config))
    tok = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok.update(auto_map={"AutoTokenizer": [None, "tokenization_evil.Eviltokenization"]},
               tokenizer_class="Eviltokenization")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok))

    with pytest.raises(PruneLabError, match="ships its own Python code.*trust_remote_code=true") as err:
        PrunedModel(path=str(ckpt), device="cpu").load()
    assert "\n" not in str(err.value) and not ran.exists()
    model, tokenizer = PrunedModel(path=str(ckpt), device="cpu", trust_remote_code=True).load()
    assert type(tokenizer).__name__ == "Eviltokenization"          # asked for, on this model
    assert sorted(p.name for p in ran.iterdir()) == ["tokenization"]   # never the model or config code


def fake_lm_eval(monkeypatch, known: list[str], data_error: Exception | None):
    """lm_eval stand-in: a task index and a task builder that fails like the hub offline."""
    calls = []

    class TaskManager:
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = list(known)

    def get_task_dict(tasks, task_manager):
        calls.append(list(tasks))
        if data_error is not None:
            raise data_error
        return {t: object() for t in tasks}
    lm_eval = types.ModuleType("lm_eval")
    models, hf, tasks = (types.ModuleType(f"lm_eval.{n}") for n in ("models", "models.huggingface", "tasks"))
    hf.HFLM, tasks.TaskManager, tasks.get_task_dict = object, TaskManager, get_task_dict
    for name, module in {"lm_eval": lm_eval, "lm_eval.models": models, "lm_eval.models.huggingface": hf,
                         "lm_eval.tasks": tasks}.items():
        monkeypatch.setitem(sys.modules, name, module)
    from prune_lab.eval import zeroshot
    monkeypatch.setattr(zeroshot, "_RESOLVED", {})
    return calls


@pytest.mark.parametrize("tasks, data_error, error, message", [
    ("[hellaswg]", None, PruneLabError, "unknown lm-eval task 'hellaswg' \\(did you mean hellaswag"),
    ("[hellaswag]", ConnectionError("Couldn't reach the Hub"), DataUnavailable, "unreachable.*Offline"),
])
def test_zero_shot_tasks_are_resolved_when_the_evaluator_is_built(tmp_path, monkeypatch, tasks, data_error,
                                                                  error, message):
    calls = fake_lm_eval(monkeypatch, ["hellaswag", "piqa"], data_error)
    with pytest.raises(error, match=message):
        run(compose_job(*tiny_overrides("llama", tmp_path), "eval=zeroshot", f"eval.zeroshot.tasks={tasks}"),
            tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "load" not in m["timings_s"]      # no model loaded, nothing scored
    assert calls == ([] if data_error is None else [["hellaswag"]])
