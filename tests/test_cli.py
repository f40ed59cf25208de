"""The CLI end to end on tiny models: run dir contents, failure handling, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, GPT2Config

import conftest
from conftest import REPO, compose_job, tiny_overrides
from prune_lab.errors import PruneLabError
from prune_lab.recipes import run


def run_cli(*overrides: str, tmp_path, check: bool = True) -> subprocess.CompletedProcess:
    return conftest.run_cli(*overrides, run_dir=tmp_path / "run", cache=tmp_path / "cache", check=check)


def metrics(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line.lower()]


def test_tiny_job_writes_a_complete_run_dir(tmp_path):
    proc = run_cli(*tiny_overrides("qwen2"), "verify=true", "eval.before=true", "output.plots=false",
                   tmp_path=tmp_path)
    run = tmp_path / "run"
    assert f"run dir: {run} (took " in proc.stdout + proc.stderr
    assert (run / "prune_lab.log").is_file()
    assert (run / ".hydra" / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()
    assert (run / "plan.csv").exists() and (run / "scores.safetensors").exists()
    layers = json.loads((run / "layers.json").read_text())
    assert layers["layer_importance_criterion"] == "activation" and len(layers["layer_importance"]) == 3
    assert {"attn_rate", "mlp_rate", "importance"} <= set(layers["layers"][0])
    assert (run / "layers.csv").read_text().startswith("layer,")
    m = metrics(tmp_path)
    assert m["status"] == "ok"
    assert m["pruned"]["ppl/data"] > 1 and m["dense"]["ppl/data"] > 1
    assert m["verify"]["max_logit_diff"] < 1e-4
    assert abs(m["plan"]["achieved_ratio"] - 0.25) < 0.05
    assert m["model"]["pruned"]["params_decoder_linear"] == (
        m["model"]["dense"]["params_decoder_linear"] - m["plan"]["params_removed"])
    assert {"load", "score", "allocate", "prune", "evaluate", "total"} <= set(m["timings_s"])
    assert m["versions"]["torch"] and m["data_fingerprint"]["calibration"]
    for layer in m["model"]["layers"]:       # GQA ratio 7:1 kept in every layer
        assert layer["q_heads"] == 7 * layer["kv_heads"]


def test_help_lists_groups_options_and_examples_through_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "prune-lab"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "schema" not in text and "layerwise" in text and "global*" in text and "taylor_2nd" in text
    groups = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and "," in line
              and not line.lstrip().startswith("prune-lab")]
    assert groups[:5] == ["model", "data", "importance", "layer_importance", "allocator"]
    assert {"finetune", "eval"} <= set(groups)
    assert groups[-2:] == ["experiment", "hparams_search"] and "hydra" not in groups
    assert sum(line.lstrip().startswith("prune-lab ") for line in text.splitlines()) == 2


def test_bad_input_is_one_line_exit_2_and_a_failed_run(tmp_path):
    proc = run_cli(*tiny_overrides("llama"), "allocator.ratio=1.5", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert lines == ["prune_lab: error: allocator.ratio must be in [0, 1), got 1.5"], proc.stderr[-2000:]
    assert metrics(tmp_path)["status"] == "failed"
    assert "ratio" in metrics(tmp_path)["error"]


@pytest.mark.parametrize("override,message", [
    ("allocator.ratio=-0.1", "ratio must be in [0, 1)"),
    ("allocator=layerwise allocator.distribution=3-7", "distribution must look like 'x:y'"),
    ("allocator=layerwise allocator.distribution=-1:5", "x, y >= 0"),
    ("allocator=layerwise allocator.max_rate=0.1 allocator.ratio=0.5", "cannot be met"),
    ("allocator.layer_end=9", "outside the model"),
    ("data=wikitext2", "unreachable"),
    ("layer_importance=none allocator=depth", "needs layer importance"),
])
def test_bad_input_fails_the_run_with_a_clear_message(override, message, tmp_path):
    cfg = compose_job(*tiny_overrides("llama", tmp_path), *override.split())
    with pytest.raises(PruneLabError) as err:
        run(cfg, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert metrics(tmp_path)["status"] == "failed"


def test_missing_model_or_unknown_architecture_fails_with_one_line(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=8192))
    gpt2.save_pretrained(tmp_path / "gpt2")
    from prune_lab.model import EmbeddedModel
    EmbeddedModel(device="cpu").load_tokenizer().save_pretrained(tmp_path / "gpt2")
    for path, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "gpt2", "unsupported architecture 'gpt2'")):
        cfg = compose_job("model=hf", f"model.path={path}", "model.dtype=float32", f"cache.dir={tmp_path}/cache")
        with pytest.raises(PruneLabError, match=message) as err:
            run(cfg, tmp_path / "run")
        assert "\n" not in str(err.value) and metrics(tmp_path)["status"] == "failed"


def test_typo_fails_at_compose_time(tmp_path):
    proc = run_cli("allocator.ratoi=0.3", tmp_path=tmp_path, check=False)
    assert proc.returncode != 0 and "ratoi" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
