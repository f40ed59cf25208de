"""Reconstruction: lstsq/bias/OBS against slow references, masked == sliced, checkpoints, bad input."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import lively, tiny_model, tiny_overrides, tokens
from prune_lab.reconstruct import refit
from prune_lab.core.adapter import layer_views
from prune_lab.artifacts.checkpoint import save_pruned
from prune_lab.engine import Engine
from prune_lab.errors import PruneLabError
from prune_lab.importance import Flap
from prune_lab.core.plan import PruningPlan
from prune_lab.core.executor import apply_plan
from prune_lab.reconstruct import Reconstruct
from test_cli import error_lines, metrics, run_cli

PLAN = PruningPlan(attn={0: [1], 2: [0]}, mlp={0: [0, 5, 17], 1: list(range(0, 48, 3)), 2: [3, 4]})
CPU = Engine("cpu", progress=False)


def calib(n=6, length=24, seed=7):
    return [tokens(2, length, seed=seed + i) for i in range(n // 2)]


def hooked(model, batches, lin_of):
    xs = []
    h = lin_of(model).register_forward_hook(lambda _m, i, _o: xs.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(xs)


def refit_model(arch="llama", mode="lstsq", plan=PLAN, engine=CPU, **kw):
    dense = lively(tiny_model(arch))
    model = copy.deepcopy(dense)
    kw.setdefault("residual", False)
    final, rows = Reconstruct(mode, damp=0.01, **kw)(model, plan, calib(), engine)
    return dense, model, final, rows


@pytest.mark.parametrize("fit_bias", [False, True])
def test_lstsq_matches_a_slow_solve_on_the_pruned_path(fit_bias):
    """Layer 1 down_proj: W'_K = W X X~_Kᵀ (X~_K X~_Kᵀ + λI)⁻¹ from the token matrices of the dense model
    and of the reconstructed (masked) model itself, which is the pruned path."""
    dense, model, _, _ = refit_model(fit_bias=fit_bias)
    down = lambda m: layer_views(m)[1].mlp.down  # noqa: E731
    x, xt = hooked(dense, calib(), down).T, hooked(model, calib(), down).T   # features x tokens
    keep = torch.tensor([j for j in range(48) if j not in PLAN.mlp[1]])
    w = down(dense).weight.double()
    xk = xt[keep]
    if fit_bias:
        ones = torch.ones(1, x.shape[1], dtype=torch.float64)
        x, xk, w = torch.cat([x, ones]), torch.cat([xk, ones]), torch.cat([w, torch.zeros(w.shape[0], 1)], 1)
    h = xk @ xk.T
    expected = w @ x @ xk.T @ torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(len(h)))
    got = down(model).weight.double()
    torch.testing.assert_close(got[:, keep], expected[:, : len(keep)], atol=2e-4, rtol=1e-3)
    assert got[:, PLAN.mlp[1]].abs().max() == 0
    if fit_bias:
        torch.testing.assert_close(down(model).bias.double(), expected[:, -1], atol=2e-4, rtol=1e-3)


def test_refit_lowers_the_output_error_and_lstsq_beats_bias():
    single = Engine("cpu", propagate="dense", progress=False)
    _, _, _, bias_rows = refit_model(mode="bias", engine=single)
    _, _, _, ls_rows = refit_model(mode="lstsq", engine=single, fit_bias=True)
    for b, ls in zip(bias_rows, ls_rows):
        assert (b["layer"], b["kind"]) == (ls["layer"], ls["kind"])
        assert b["err_after"] <= b["err_before"] + 1e-9
        assert ls["err_after"] <= b["err_after"] + 1e-9
        assert ls["err_after"] < 0.9 * ls["err_before"]


def test_bias_mode_is_flap_compensation_on_the_dense_path():
    """propagate=dense: b = W[:, R] E[x_R] with x the dense inputs of down_proj."""
    dense, model, _, _ = refit_model(mode="bias", engine=Engine("cpu", propagate="dense", progress=False))
    down = lambda m: layer_views(m)[1].mlp.down  # noqa: E731
    x = hooked(dense, calib(), down)
    removed = PLAN.mlp[1]
    expected = down(dense).weight.double()[:, removed] @ x[:, removed].mean(0)
    torch.testing.assert_close(down(model).bias.double(), expected, atol=1e-5, rtol=1e-4)


def brute_force_obs(w, h, width, removed):
    """Increase of ||W - W'||_H² when adding each candidate block to `removed`, with the optimal refit."""
    def err(blocks):
        cut = refit.block_columns(torch.tensor(sorted(blocks), dtype=torch.long), width)
        keep = torch.tensor([j for j in range(w.shape[1]) if j not in set(cut.tolist())])
        w2 = torch.zeros_like(w)
        w2[:, keep] = w @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])
        return float(((w - w2) @ h * (w - w2)).sum())
    base = err(removed) if removed else 0.0
    return {b: err(removed + [b]) - base for b in range(w.shape[1] // width) if b not in removed}


@pytest.mark.parametrize("width", [1, 3])
def test_obs_greedy_steps_equal_brute_force(width):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5 * width, 40, generator=gen, dtype=torch.float64)
    x[1] *= 0.1
    g, w = x @ x.T, torch.randn(6, 5 * width, generator=gen, dtype=torch.float64)
    damp = 1e-3
    h = g + damp * g.diagonal().mean() * torch.eye(len(g), dtype=torch.float64)
    removed, errors = refit.obs_select(w, g, 5, width, 3, damp)
    done = []
    for block, e in zip(removed, errors):
        brute = brute_force_obs(w, h, width, done)
        assert block == min(brute, key=brute.get)
        assert e == pytest.approx(brute[block], rel=1e-6)
        done.append(block)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_obs_chooses_units_keeps_counts_and_the_executor_matches(arch):
    dense, model, final, rows = refit_model(arch, mode="obs")
    for i in PLAN.attn:
        assert len(final.attn[i]) == len(PLAN.attn[i])
    for i in PLAN.mlp:
        assert len(final.mlp[i]) == len(PLAN.mlp[i])
    assert final.mlp != PLAN.mlp                     # OBS picked other channels than the scores
    assert all(r["err_after"] <= r["err_before"] + 1e-9 for r in rows)
    pruned = apply_plan(copy.deepcopy(model), final)   # the masked model carries zeros where removed
    with torch.no_grad():
        a, b = pruned(tokens(2, 20)).logits, model(tokens(2, 20)).logits
    assert (a - b).abs().max().item() < 1e-5


def test_singular_gram_is_damped_never_nan():
    g = torch.zeros(6, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    out = refit.lstsq(w @ g, g, torch.arange(4), 0.01)
    assert torch.isfinite(out).all()
    removed, errors = refit.obs_select(w, g, 6, 1, 2, 0.01)
    assert len(removed) == 2 and all(map(lambda e: e == e, errors))


@pytest.mark.parametrize("mode", ["lstsq", "obs"])
def test_dead_inputs_make_singular_grams_that_stay_finite(mode):
    """Half of every layer's MLP channels never fire (gate and up rows zero): the down_proj Gram is singular;
    damping keeps the refit finite, and OBS removes dead channels, which carry nothing (the error left,
    ~1e-4, is the damping's shrinkage of the kept columns)."""
    dense = lively(tiny_model())
    with torch.no_grad():
        for v in layer_views(dense):
            v.mlp.gate.weight[24:] = 0
            v.mlp.up.weight[24:] = 0
    model = copy.deepcopy(dense)
    plan = PruningPlan(mlp={i: list(range(20, 30)) for i in range(3)})
    final, rows = Reconstruct(mode, damp=0.01)(model, plan, calib(), CPU)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(r["err_before"]) and math.isfinite(r["err_after"]) for r in rows)
    if mode == "obs":                    # the greedy OBS takes the dead channels first: nothing is lost
        assert all(set(final.mlp[i]) <= set(range(24, 48)) for i in range(3))
        assert all(r["err_after"] < 1e-3 for r in rows)


def test_bias_checkpoint_reloads_exactly(tmp_path):
    from prune_lab import load_pruned
    _, model, final, _ = refit_model(mode="bias")
    apply_plan(model, final)
    save_pruned(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["prune_lab"]["added_biases"] == ["o_proj", "down_proj"]
    back = load_pruned(tmp_path / "ckpt")
    assert layer_views(back)[0].attn.o.bias is not None
    with torch.no_grad():
        assert torch.equal(back(tokens()).logits, model(tokens()).logits)


def test_flap_scores_equal_a_hooked_forward():
    model = lively(tiny_model("qwen3"))
    scores = Flap(CPU)(model, calib())
    v = layer_views(model)[2]
    x_o, x_d = hooked(model, calib(), lambda m: layer_views(m)[2].attn.o), hooked(model, calib(), lambda m: layer_views(m)[2].mlp.down)
    o = x_o.var(0, unbiased=False) * v.attn.o.weight.double().pow(2).sum(0)
    d = x_d.var(0, unbiased=False) * v.mlp.down.weight.double().pow(2).sum(0)
    torch.testing.assert_close(scores.attn[2].double(), o.reshape(2, -1).sum(1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores.mlp[2].double(), d, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["bias", "obs"])
def test_cli_verify_proves_the_executor_with_compensated_weights(mode, tmp_path):
    run_cli(*tiny_overrides("qwen2"), "calibration.n_samples=8", f"reconstruct={mode}", "verify=true",
            "importance=flap", "reconstruct.damp=0.05", tmp_path=tmp_path)
    m = metrics(tmp_path)
    assert m["status"] == "ok" and m["verify"]["max_logit_diff"] < 1e-5
    assert m["reconstruct"]["mode"] == mode and m["reconstruct"]["mlp_err_after"] < m["reconstruct"]["mlp_err_before"]
    assert (tmp_path / "run" / "reconstruct.csv").exists() and (tmp_path / "run" / "reconstruct_error.png").exists()


@pytest.mark.parametrize("override,message", [
    ("reconstruct.damp=0", "reconstruct.damp must be in (0, 1)"),
    ("reconstruct.damp=-0.5", "reconstruct.damp must be in (0, 1)"),
    ("calibration.n_samples=1", "needs at least 64 calibration tokens"),
    ("reconstruct.obs_block=-1", "reconstruct.obs_block must be >= 0"),
    ("reconstruct.obs_chunk=3", "reconstruct.obs_chunk is now reconstruct.obs_block"),
])
def test_bad_reconstruct_input_is_one_line_exit_2(override, message, tmp_path):
    proc = run_cli(*tiny_overrides("llama"), override, tmp_path=tmp_path, check=False)     # the default: obs
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in error_lines(proc) if line.startswith("prune_lab: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert metrics(tmp_path)["status"] == "failed"


def test_bad_damp_and_mode_raise_at_build():
    with pytest.raises(PruneLabError, match="damp"):
        Reconstruct("lstsq", damp=-1)
    with pytest.raises(PruneLabError, match="mode"):
        Reconstruct("magic")


def test_residual_refit_absorbs_the_drift_of_the_residual_stream():
    """residual=true, layer 1 down_proj: W'_K = (W X + (R - R~)) X~_Kᵀ (X~_K X~_Kᵀ + λI)⁻¹ where R, R~ are the
    residual streams down_proj adds into (inputs of post_attention_layernorm) on the dense / pruned path."""
    dense, model, _, _ = refit_model(residual=True)
    down = lambda m: layer_views(m)[1].mlp.down  # noqa: E731
    norm = lambda m: layer_views(m)[1].module.post_attention_layernorm  # noqa: E731
    x, xt = hooked(dense, calib(), down).T, hooked(model, calib(), down).T
    r, rt = hooked(dense, calib(), norm).T, hooked(model, calib(), norm).T
    keep = torch.tensor([j for j in range(48) if j not in PLAN.mlp[1]])
    w, xk = down(dense).weight.double(), xt[keep]
    h = xk @ xk.T
    expected = (w @ x + r - rt) @ xk.T @ torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(len(h)))
    torch.testing.assert_close(down(model).weight.double()[:, keep], expected, atol=2e-4, rtol=1e-3)
    assert (r - rt).abs().max() > 1e-3                   # there was drift to absorb
