"""The unstructured family end to end on the engine: method=sparsegpt|wanda|magnitude x quant, every
architecture (OPT included), statistics, recovery with masks kept, exact reload, bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import ALL_ARCHS, compose_job, run_cli, tiny_model, tiny_overrides, tokens, write_small_corpus
from prune_lab import load_pruned
from prune_lab.core.adapter import layer_views, view_linears
from prune_lab.artifacts.compression import load_compression
from prune_lab.engine import walk
from prune_lab.errors import PruneLabError
from prune_lab.method import SparseGPT, Wanda
from prune_lab.recipes import run
from prune_lab.quant import Mixed, Uniform


def job(tmp_path, arch="llama", *overrides):
    corpus = write_small_corpus(tmp_path)
    return compose_job(*tiny_overrides(arch, tmp_path), "data=text", f"data.train={corpus}/train.txt",
                       f"data.test={corpus}/test.txt", "output.plots=true", *overrides)


def linears(model):
    return {(v.index, p): lin for v in layer_views(model) for p, lin in view_linears(v).items()}


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("method,extra", [("sparsegpt", ["method.sparsity=0.5"]),
                                          ("wanda", ["method.prune_n=2", "method.prune_m=4"])])
def test_every_arch_runs_the_family_with_exact_sparsity(arch, method, extra, tmp_path):
    cfg = job(tmp_path, arch, f"method={method}", *extra, "method.blocksize=16")
    ppl = run(cfg, tmp_path / "run").ppl
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "ok" and ppl == m["pruned"]["ppl/data"] and 1 < ppl < 1e5
    c = m["compression"]
    assert c["sparsity"] == pytest.approx(0.5, abs=1e-3)
    n_linears = 6 if arch == "opt" else 7
    assert len(c["per_layer"]) == 3 and c["total_channels"] > 0
    table = (tmp_path / "run" / "compression.csv").read_text().splitlines()
    assert len(table) == 1 + 3 * n_linears and (tmp_path / "run" / "compression.png").exists()
    assert c["effective_bytes"] < c["dense_bytes"]


def test_mixed_budget_hits_the_average_and_reload_reproduces_the_ppl(tmp_path):
    # llama: the saved lab tokenizer reloads as the same class (a qwen2 config maps it to Qwen2Tokenizer)
    cfg = job(tmp_path, "llama", "method=sparsegpt", "method.sparsity=0.25", "quant=mixed",
              "quant.target_avg_bits=3.5", "output.save_model=true", "method.blocksize=16")
    ppl = run(cfg, tmp_path / "run").ppl
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["compression"]
    assert m["avg_bits"] == pytest.approx(3.5, abs=0.01)
    assert sum(m["bit_histogram"].values()) == m["total_channels"]
    assert len([b for b, n in m["bit_histogram"].items() if n > 0]) >= 2      # really mixed
    assert all(lo <= hi for lo, hi in (layer["importance_range"] for layer in m["per_layer"]))
    path = tmp_path / "run" / "model"
    masks, bits, meta = load_compression(path)
    model = load_pruned(path)
    for key, lin in linears(model).items():
        w = lin.weight
        assert (w[~masks[key]] == 0).all()
        assert ((~masks[key]).float().mean() - 0.25).abs() < 1 / 16     # per block of 16 columns
        for row in range(0, w.shape[0], 7):
            assert len(torch.unique(w[row])) <= 2 ** int(bits[key][row])
    assert meta["weights"] == "packed"           # integer codes + scales + zero points (artifacts/packed.py)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoint"]
    files = sorted(path.rglob("*"))
    assert record["packed_linears"] == 3 * 7 and record["bytes"] == sum(f.stat().st_size for f in files if f.is_file())
    weights = sum(lin.weight.numel() for lin in linears(model).values())
    assert (path / "quantized.safetensors").stat().st_size < weights * 4 * 0.2     # ~3.5 bits of 32, + grids
    from prune_lab.artifacts.checkpoint import refuse_per_layer
    with pytest.raises(PruneLabError, match="packed integer weights"):      # model=hf would miss those weights
        refuse_per_layer(str(path))
    shrink = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model")]
    cfg2 = compose_job(*shrink, "model=pruned", f"model.path={path}", "model.device=cpu", "data=text",
                       f"data.train={tmp_path}/train.txt", f"data.test={tmp_path}/test.txt",
                       "method=sparsegpt", "method.sparsity=0", "method.blocksize=16")
    # the reloaded model re-run through a no-op engine pass (sparsity 0, no quant) keeps its PPL exactly
    assert run(cfg2, tmp_path / "run2").ppl == ppl


def test_recovery_keeps_masks_and_the_quantization_grid(tmp_path):
    cfg = job(tmp_path, "llama", "method=magnitude", "method.sparsity=0.5", "quant=uniform", "quant.bits=3",
              "finetune=full", "finetune.max_steps=3", "finetune.lr=1e-2", "finetune.seq_len=32",
              "finetune.batch_size=2", "finetune.warmup_steps=0", "output.save_model=true")
    run(cfg, tmp_path / "run")
    masks, bits, _ = load_compression(tmp_path / "run" / "model")
    model = load_pruned(tmp_path / "run" / "model")
    for key, lin in linears(model).items():
        assert (lin.weight[~masks[key]] == 0).all() and masks[key].float().mean() == 0.5
        assert all(len(torch.unique(row)) <= 8 for row in lin.weight)


def test_sparsity_zero_without_quant_changes_nothing_and_true_sequential_stages():
    model = tiny_model("llama")
    before = {k: lin.weight.clone() for k, lin in linears(model).items()}
    method = SparseGPT(sparsity=0.0, blocksize=16)
    walk(model, [tokens(2, 16)], method, progress=False)
    for k, lin in linears(model).items():
        torch.testing.assert_close(lin.weight, before[k], rtol=0, atol=1e-6)
    opt_view = layer_views(tiny_model("opt"))[0]
    assert SparseGPT(true_sequential=True).stages(opt_view) == [
        ["attn.q", "attn.k", "attn.v"], ["attn.o"], ["mlp.up"], ["mlp.down"]]
    assert Wanda().stages(opt_view) == [["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]]
    assert not Wanda().needs_gram and Wanda().with_quant(Uniform(4)).needs_gram


def test_sparsegpt_beats_wanda_on_the_layer_objective_of_a_real_walk():
    """Per linear, on the same engine inputs (propagate=dense), SparseGPT's relative error is lower."""
    errs = {}
    for cls in (SparseGPT, Wanda):
        model = tiny_model("llama", intermediate=64)
        method = cls(sparsity=0.5, blocksize=16).with_quant(Uniform(8))   # 8 bits: ~pure pruning error
        recs = walk(model, [tokens(4, 32, seed=s) for s in range(2)], method, progress=False, propagate="dense")
        errs[cls.name] = [info["rel_error"] for r in recs for st in r["stages"] for info in st.values()]
    assert all(a < b for a, b in zip(errs["sparsegpt"], errs["wanda"]))


def test_asymmetric_walk_fits_the_dense_path():
    """method.asymmetric: layer 0 sees X~ == X (identical to the symmetric sweep); later layers fit the
    dense path, so the hidden states leaving the last layer end closer to the dense model's."""
    from conftest import lively
    dense = lively(tiny_model("llama", intermediate=64))
    batches = [tokens(4, 32, seed=s) for s in range(2)]
    _, ref = walk(copy.deepcopy(dense), batches, SparseGPT(sparsity=0.0), progress=False, return_hidden=True)
    models, dist = {}, {}
    for asym in (False, True):
        models[asym] = copy.deepcopy(dense)
        method = SparseGPT(sparsity=0.5, blocksize=16, asymmetric=float(asym), residual=asym)
        assert method.needs_cross == asym and method.needs_residual == asym
        _, out = walk(models[asym], batches, method, progress=False, return_hidden=True)
        dist[asym] = sum(float((a - b).square().sum()) for a, b in zip(out, ref))
    sym, asym = linears(models[False]), linears(models[True])
    assert all(torch.equal(sym[k].weight, asym[k].weight) for k in sym if k[0] == 0)
    assert all(not torch.equal(sym[k].weight, asym[k].weight) for k in sym if k[0] == 2)
    assert dist[True] < 0.8 * dist[False], dist


@pytest.mark.parametrize("overrides,match", [
    (["method=sparsegpt", "method.sparsity=1.0"], r"\[0, 1\)"),
    (["method=magnitude", "method.prune_n=2"], "both"),
    (["method=wanda", "method.prune_n=4", "method.prune_m=2"], "N <= M"),
    (["method=sparsegpt", "quant=uniform", "quant.bits=5"], "bits_options"),
    (["method=sparsegpt", "quant=mixed", "quant.target_avg_bits=9"], "outside"),
    (["method=sparsegpt", "quant=mixed", "quant.weights=[0,0,0,0,0]"], "positive sum"),
    (["method=sparsegpt", "method.damp=0"], "damp"),
    (["method=sparsegpt", "method.asymmetric=0"], "needs method.asymmetric > 0"),
    (["method=sparsegpt", "method.asymmetric=1.5"], r"asymmetric must be in \[0, 1\]"),
])
def test_bad_input_fails_before_heavy_work(overrides, match, tmp_path):
    cfg = job(tmp_path, "llama", *overrides)
    with pytest.raises(PruneLabError, match=match):
        run(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and "load" not in m["timings_s"]


@pytest.mark.parametrize("overrides,line", [           # the bad-input list, through the real CLI
    (["method=sparsegpt", "method.sparsity=-0.1"], "method.sparsity must be in [0, 1), got -0.1"),
    (["method=wanda", "method.prune_n=4", "method.prune_m=2"], "N:M needs N <= M, got 4:2"),
    (["method=sparsegpt", "quant=uniform", "quant.bits=5"], "quant.bits=5 is not one of quant.bits_options [2, 3, 4, 6, 8]"),
    (["method=sparsegpt", "quant=mixed", "quant.bits_options=[2,4]", "quant.target_avg_bits=4.5"],
     "quant.target_avg_bits=4.5 is outside [2, 4], the range of quant.bits_options"),
    (["method=sparsegpt", "quant=mixed", "quant.weights=[0,0,0,0,0]"],
     "quant.weights must be 5 non-negative numbers (activation/hessian/weight/output/stability) with a positive "
     "sum, got [0.0, 0.0, 0.0, 0.0, 0.0]"),
])
def test_cli_bad_input_is_one_line_and_exit_2(overrides, line, tmp_path):
    proc = run_cli(*tiny_overrides("llama"), *overrides, run_dir=tmp_path / "run", cache=tmp_path / "cache",
                   timeout=300)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert lines == [f"prune_lab: error: {line}"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_mixed_allocation_over_a_stage_of_real_statistics():
    model = tiny_model("qwen3", intermediate=96)
    method = SparseGPT(sparsity=0.0, blocksize=16).with_quant(Mixed(target_avg_bits=5.0))
    walk(model, [tokens(4, 32)], method, progress=False)
    for layer in range(3):
        keys = [k for k in method.bits if k[0] == layer]
        cols = torch.cat([torch.full((len(method.bits[k]),), float(linears(model)[k].in_features)) for k in keys])
        bits = torch.cat([method.bits[k] for k in keys]).float()
        assert ((bits * cols).sum() / cols.sum()).item() == pytest.approx(5.0, abs=0.01)


def test_optuna_mixed_preset_searches_weights_at_the_bit_budget(tmp_path):
    from test_sweeps import cli, completed, compose_with_hydra, load_study, study_args
    cfg = compose_with_hydra("hparams_search=optuna_mixed", "search.w_hessian=0.7")
    assert list(cfg.quant.weights) == [0.25, 0.7, 0.15, 0.25, 0.10] and cfg.quant.score_power == 1.0
    assert cfg.method._target_ == "prune_lab.method.SparseGPT" and cfg.quant.allocation == "budget"
    grid = compose_with_hydra("experiment=sweep_sparsity_bits")
    assert dict(grid.hydra.sweeper.params) == {"method.sparsity": "0.0,0.25,0.5", "quant.target_avg_bits": "3.0,4.0,5.0"}
    write_small_corpus(tmp_path)
    job = [*tiny_overrides("llama", tmp_path), "data=text", f"data.train={tmp_path}/train.txt",
           f"data.test={tmp_path}/test.txt", "method.blocksize=16", "quant.group_size=16"]
    cli(tmp_path, *study_args(tmp_path, "optuna_mixed"), *job, "hydra.sweeper.n_trials=2",
        "quant.target_avg_bits=3.5", f"hydra.sweep.dir={tmp_path}/sweep")
    trials = completed(load_study(tmp_path))
    assert len(trials) == 2 and len({t.value for t in trials}) == 2
    for m in (tmp_path / "sweep").glob("*/metrics.json"):
        assert json.loads(m.read_text())["compression"]["avg_bits"] == pytest.approx(3.5, abs=0.01)


@pytest.mark.parametrize("method,quant", [("magnitude", []), ("sparsegpt", ["quant=uniform", "quant.group_size=16"])])
def test_a_2_4_checkpoint_stores_the_kept_weights_and_reloads_to_the_same_ppl(tmp_path, method, quant):
    cfg = job(tmp_path, "llama", f"method={method}", "method.prune_n=2", "method.prune_m=4", "method.blocksize=16",
              *quant, "output.save_model=true", "output.plots=false")
    ppl = run(cfg, tmp_path / "run").ppl
    path = tmp_path / "run" / "model"
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoint"]
    assert record["bytes"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert (record["packed_linears"], record["nm_sparse_linears"]) == ((3 * 7, 0) if quant else (0, 3 * 7))
    masks, _, meta = load_compression(path)
    assert meta["nm_packed"]
    model = load_pruned(path)
    for key, lin in linears(model).items():
        assert (lin.weight[~masks[key]] == 0).all() and masks[key].float().mean() == 0.5
    from prune_lab.artifacts.checkpoint import refuse_per_layer
    with pytest.raises(PruneLabError, match="packed integer weights" if quant else "N:M-packed weights"):
        refuse_per_layer(str(path))                       # model=hf would miss those weights
    shrink = [o for o in tiny_overrides("llama", tmp_path) if not o.startswith("model")]
    cfg2 = compose_job(*shrink, "model=pruned", f"model.path={path}", "model.device=cpu", "data=text",
                       f"data.train={tmp_path}/train.txt", f"data.test={tmp_path}/test.txt",
                       "method=sparsegpt", "method.sparsity=0", "method.blocksize=16", "output.plots=false")
    assert run(cfg2, tmp_path / "run2").ppl == ppl        # a no-op engine pass over the reloaded weights
