"""reconstruct=obs is the default: the default job runs the engine; the paths that prune nothing, the
unstructured methods and the score cache compose with it; on lab-llama it reaches the measured PPL."""
from __future__ import annotations

import json

import pytest

from conftest import compose_job, text_job
from prune_lab.errors import PruneLabError
from prune_lab.recipes import run
from prune_lab.core.plan import PruningPlan


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_the_default_job_refits_with_obs(tmp_path):
    assert compose_job().reconstruct.mode == "obs"
    run(text_job(tmp_path, "output.plots=false"), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["reconstruct"]["mode"] == "obs" and "reconstruct" in m["timings_s"]
    assert m["reconstruct"]["mlp_err_after"] < m["reconstruct"]["mlp_err_before"]
    rows = (tmp_path / "run" / "reconstruct.csv").read_text().splitlines()[1:]
    removed = {(int(r.split(",")[0]), r.split(",")[1]): int(r.split(",")[2]) for r in rows}
    plan = PruningPlan.load(tmp_path / "run" / "plan.csv")      # the units obs chose, counts as planned
    assert removed == {**{(i, "attn"): len(u) for i, u in plan.attn.items()},
                       **{(i, "mlp"): len(u) for i, u in plan.mlp.items()}}
    assert m["plan"]["groups_removed"] + m["plan"]["channels_removed"] == sum(removed.values()) > 0


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_unstructured_methods_select_no_reconstruction_and_refuse_an_explicit_one(method, tmp_path):
    assert compose_job(f"method={method}").reconstruct.mode == "none"
    assert compose_job("hparams_search=optuna_mixed").reconstruct.mode == "none"
    with pytest.raises(PruneLabError, match="refits structured plans"):     # before loading anything
        run(text_job(tmp_path, f"method={method}", "reconstruct=obs"), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "load" not in m["timings_s"]


@pytest.mark.parametrize("extra", [("allocator=none",), ("allocator.ratio=0",),
                                   ("allocator=depth", "allocator.n_layers=1")])
def test_jobs_that_slice_no_units_need_no_engine_pass(extra, tmp_path):
    """Nothing to refit: no engine pass, and no minimum calibration length (1 x 32 tokens < 64 here)."""
    run(text_job(tmp_path, "output.plots=false", "calibration.n_samples=1", *extra), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and not (tmp_path / "run" / "reconstruct.csv").exists()
    assert "reconstruct" not in m or not any(k.endswith("_err_after") for k in m["reconstruct"])


def test_the_reconstruct_mode_does_not_invalidate_cached_scores(tmp_path):
    run(text_job(tmp_path, "output.plots=false"), tmp_path / "obs")
    run(text_job(tmp_path, "output.plots=false", "reconstruct=lstsq", "reconstruct.damp=0.1"), tmp_path / "lstsq")
    assert metrics(tmp_path / "lstsq")["scores"] == {"reused": True, "layer_reused": True}


@pytest.mark.lab
def test_the_default_lab_llama_job_reaches_the_measured_perplexity(tmp_path):
    """`make run`'s job (importance=obs, global 25%, reconstruct=obs with the residual drift): 48.93 measured;
    49.01 with importance=taylor (the default before), 50.95 with taylor and no reconstruction (dense 48.13)."""
    job = compose_job(f"cache.dir={tmp_path}/cache", "output.plots=false", "output.save_scores=false",
                      "engine.progress=false")
    result = run(job, tmp_path / "run")
    assert result.ppl == pytest.approx(48.93, abs=0.02)
