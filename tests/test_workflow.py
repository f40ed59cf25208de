"""Two-stage workflow (analyse once, prune many times from the saved scores), separate sample
counts for layer and unit importance, and the dense -> pruned -> recovered bookkeeping. In process."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import text_job, tiny_model
from prune_lab.data import Calibration, LocalText, TokenStreams
from prune_lab.errors import PruneLabError
from prune_lab.layer_importance import Activation
from prune_lab.model import RandomModel
from prune_lab.recipes import run


@pytest.fixture
def job(tmp_path):
    return lambda *extra: text_job(tmp_path, *extra)


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_analyse_once_then_prune_from_the_saved_scores(tmp_path, job):
    analysed = tmp_path / "analyse"
    run(job("allocator=none", "importance=wanda"), analysed)
    m = metrics(analysed)
    assert m["status"] == "ok" and "pruned" not in m and "plan" not in m and "evaluate" not in m["timings_s"]
    assert not (analysed / "plan.csv").exists()
    assert {"score_histogram.png", "layer_importance.png", "layers.csv"} <= {p.name for p in analysed.iterdir()}
    saved = load_file(str(analysed / "scores.safetensors"))
    assert saved["layer"].shape == (3,) and saved["attn.0"].shape == (2,) and saved["mlp.2"].shape == (48,)
    layers = json.loads((analysed / "layers.json").read_text())
    assert layers["layer_importance"] == pytest.approx(saved["layer"].tolist())

    prune = ["allocator=layerwise", "output.plots=false", "cache.enabled=false"]
    run(job(*prune, "importance=file", f"importance.path={analysed}",
            "layer_importance=file", f"layer_importance.path={analysed}/scores.safetensors"), tmp_path / "from_file")
    run(job(*prune, "importance=wanda"), tmp_path / "direct")
    assert (tmp_path / "from_file" / "plan.csv").read_text() == (tmp_path / "direct" / "plan.csv").read_text()
    from_file = metrics(tmp_path / "from_file")
    assert from_file["pruned"] == metrics(tmp_path / "direct")["pruned"]
    assert from_file["scores"] == {"reused": False, "layer_reused": False}

    with pytest.raises(PruneLabError, match="does not exist"):   # at build time, before loading the model
        run(job("importance=file", f"importance.path={tmp_path}/nowhere"), tmp_path / "bad")
    (tmp_path / "not_scores.safetensors").write_text("hello")
    with pytest.raises(PruneLabError, match="not a safetensors score file"):
        run(job("importance=file", f"importance.path={tmp_path}/not_scores.safetensors"), tmp_path / "bad2")


def test_layer_importance_uses_its_own_sample_count(tmp_path, job):
    run(job("allocator=none", "importance=magnitude", "calibration.n_samples=4",
            "layer_importance.n_samples=2", "output.plots=false"), tmp_path / "a")
    got = json.loads((tmp_path / "a" / "layers.json").read_text())["layer_importance"]
    tokenizer = RandomModel().load_tokenizer()
    stream = TokenStreams(tokenizer)(LocalText(train=str(tmp_path / "train.txt")), "train")
    model = tiny_model("llama", layers=3, intermediate=48)
    calibration = Calibration(n_samples=4, seq_len=32, batch_size=2)
    two, four = (Activation()(model, calibration.batches(stream, 0, n)) for n in (2, 4))
    assert sum(b.shape[0] for b in calibration.batches(stream, 0, 2)) == 2
    assert got == pytest.approx(two.tolist(), rel=1e-5)
    assert not torch.allclose(two, four)


def test_recovery_records_pruned_and_recovered(tmp_path, job):
    result = run(job("finetune=lora", "finetune.max_steps=3", "finetune.batch_size=2", "finetune.seq_len=32",
                     "finetune.lr=1e-2", "eval.before=true", "output.plots=false"), tmp_path / "r")
    m = metrics(tmp_path / "r")
    dense, pruned, recovered = (m[k]["ppl/data"] for k in ("dense", "pruned", "recovered"))
    assert len({dense, pruned, recovered}) == 3 and m["finetune"]["steps"] == 3
    assert result.ppl == recovered and result.params_total == m["model"]["pruned"]["params_total"]
    assert {"evaluate", "recover", "evaluate_recovered"} <= set(m["timings_s"])
