"""method=structured quant=uniform|mixed: prune (with reconstruction), then GPTQ over the pruned model in one
engine pass; metrics record the parameter ratio, average bits and bytes against the dense model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_job, text_job, tiny_overrides
from prune_lab import load_pruned
from prune_lab.artifacts.compression import load_compression
from prune_lab.core.adapter import layer_views, view_linears
from prune_lab.recipes import run


def job(tmp_path, *overrides):
    return text_job(tmp_path, "output.plots=false", *overrides)


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("quant", [["quant=uniform", "quant.bits=4", "quant.group_size=16"],
                                   ["quant=mixed", "quant.target_avg_bits=3.5"]])
def test_structured_pruning_then_gptq_in_one_job(tmp_path, quant):
    run(job(tmp_path, "allocator.ratio=0.25", *quant, "output.save_model=true"), tmp_path / "both")
    run(job(tmp_path, "allocator.ratio=0.25"), tmp_path / "pruned")
    both, pruned = metrics(tmp_path / "both"), metrics(tmp_path / "pruned")
    assert both["status"] == "ok" and {"reconstruct", "prune", "engine"} <= set(both["timings_s"])
    assert both["model"]["layers"] == pruned["model"]["layers"]          # the same pruned shapes
    c = both["compression"]
    target = 4.0 if quant[0] == "quant=uniform" else 3.5
    assert c["method"] == "gptq" and c["avg_bits"] == pytest.approx(target, abs=0.02) and c["sparsity"] == 0
    dense_params = both["model"]["dense"]["params_total"]
    assert c["param_ratio_vs_dense"] == pytest.approx(both["model"]["pruned"]["params_total"] / dense_params)
    assert c["decoder_param_ratio_vs_dense"] == pytest.approx(1 - both["plan"]["achieved_ratio"])
    assert c["decoder_param_ratio_vs_dense"] < 0.8
    assert c["dense_model_bytes"] == dense_params * 4                   # fp32
    assert c["size_ratio_vs_dense"] == pytest.approx(c["effective_bytes"] / c["dense_model_bytes"])
    assert c["size_ratio_vs_dense"] < c["size_ratio"] <= 1             # smaller than the pruned fp32 model
    assert both["pruned"]["ppl/data"] != pruned["pruned"]["ppl/data"]
    # the checkpoint holds the pruned shapes with every row on its grid, and reloads
    model = load_pruned(tmp_path / "both" / "model")
    _, bits, _ = load_compression(tmp_path / "both" / "model")
    for v in layer_views(model):
        for p, lin in view_linears(v).items():
            b = bits[(v.index, p)]
            for row in range(0, lin.weight.shape[0], 5):
                groups = -(-lin.weight.shape[1] // 16) if quant[0] == "quant=uniform" else 1   # short last group
                limit = 2 ** int(b[row]) * groups
                assert len(torch.unique(lin.weight[row])) <= limit


def test_one_job_equals_pruning_then_quantizing_the_saved_model(tmp_path):
    """The combined job's GPTQ pass is method=sparsegpt method.sparsity=0's, on the pruned model's own path:
    the same weights as a second job that quantizes the first job's saved pruned model."""
    q = ["quant=uniform", "quant.bits=4", "quant.group_size=16", "quant.act_order=true"]
    run(job(tmp_path, "allocator.ratio=0.25", *q, "output.save_model=true"), tmp_path / "both")
    run(job(tmp_path, "allocator.ratio=0.25", "output.save_model=true"), tmp_path / "pruned")
    shrink = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model")]
    run(compose_job(*shrink, "model=pruned", f"model.path={tmp_path}/pruned/model", "model.device=cpu", "data=text",
                    f"data.train={tmp_path}/train.txt", f"data.test={tmp_path}/test.txt", "output.plots=false",
                    "method=sparsegpt", "method.sparsity=0", *q, "output.save_model=true"), tmp_path / "then")
    one, two = load_pruned(tmp_path / "both" / "model"), load_pruned(tmp_path / "then" / "model")
    ref = two.state_dict()
    assert all(torch.allclose(v, ref[k], atol=1e-6) for k, v in one.state_dict().items())
    assert metrics(tmp_path / "both")["pruned"]["ppl/data"] == pytest.approx(
        metrics(tmp_path / "then")["pruned"]["ppl/data"], rel=1e-5)


def test_quantized_structured_recovery_keeps_the_grid(tmp_path):
    run(job(tmp_path, "allocator.ratio=0.25", "quant=uniform", "quant.bits=3", "finetune=full",
            "finetune.max_steps=2", "finetune.lr=1e-2", "finetune.batch_size=2", "finetune.seq_len=32",
            "output.save_model=true"), tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert m["status"] == "ok" and m["recovered"] != m["pruned"]
    for name in ("model", "model_pruned"):
        model = load_pruned(tmp_path / "run" / name)
        for v in layer_views(model):
            for lin in view_linears(v).values():
                assert all(len(torch.unique(row)) <= 8 for row in lin.weight)


def test_an_analyse_only_job_refuses_a_quant_in_one_line(tmp_path):
    from prune_lab.errors import PruneLabError
    with pytest.raises(PruneLabError) as err:
        run(job(tmp_path, "allocator=none", "quant=uniform"), tmp_path / "run")
    assert str(err.value) == ("quant=uniform|mixed with allocator=none: an analyse-only job prunes nothing to "
                              "quantize (choose an allocator, or drop quant)")
    assert metrics(tmp_path / "run")["status"] == "failed"


def test_the_pareto_overlay_expands_to_the_nine_jobs_of_the_grid():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from test_sweeps import compose_with_hydra
    sweep = compose_with_hydra("experiment=pareto_size_ppl")
    assert sweep.hydra.sweep.dir.startswith("multirun/pareto_size_ppl/")
    params = [f"{k}={v}" for k, v in sweep.hydra.sweeper.params.items()]
    jobs, = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert len(jobs) == 9
    seen = set()
    for overrides in jobs:
        cfg = compose_with_hydra("experiment=pareto_size_ppl", *overrides)
        quant = cfg.quant._target_.rsplit(".", 1)[1]
        bits = {"NoQuant": 16, "Uniform": cfg.quant.get("bits"), "Mixed": cfg.quant.get("target_avg_bits")}[quant]
        assert quant == "NoQuant" or cfg.quant.group_size == 128
        assert quant != "Mixed" or cfg.quant.allocation == "budget"
        assert cfg.allocator._target_ == "prune_lab.allocator.Global" and cfg.output.plots is False
        seen.add((cfg.allocator.ratio, quant, bits))
    assert seen == {(r, q, b) for r in (0.0, 0.25, 0.5) for q, b in (("NoQuant", 16), ("Uniform", 4), ("Mixed", 3.5))}
