"""reconstruct.producers=true: q/k/v and gate/up refit towards their dense outputs on the drifted pruned
path, against a slow solve on the token matrices; masked == sliced; bad input."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import lively, tiny_model, tiny_overrides, tokens
from prune_lab.core.adapter import layer_views
from prune_lab.core.executor import apply_plan
from prune_lab.core.plan import PruningPlan
from prune_lab.errors import PruneLabError
from prune_lab.reconstruct import Reconstruct, refit
from test_cli import error_lines, metrics, run_cli
from test_reconstruct import CPU, PLAN, calib, hooked

LATE = PruningPlan(mlp={1: list(range(0, 48, 3))})     # layer 0 untouched: its streams stay one


def producers_model(arch="llama", mode="obs", plan=PLAN):
    dense = lively(tiny_model(arch))
    model = copy.deepcopy(dense)
    final, rows = Reconstruct(mode, damp=0.01, residual=False, producers=True)(model, plan, calib(), CPU)
    return dense, model, final, rows


def anchored(w, x, xt, damp=0.01):
    """argmin ||W X - W' X~||² + λ||W' - W||², λ = damp·mean diag(X~X~ᵀ), by an explicit inverse."""
    g = xt @ xt.T
    lam = damp * g.diagonal().mean()
    return (w @ x @ xt.T + lam * w) @ torch.linalg.inv(g + lam * torch.eye(len(g), dtype=torch.float64))


@pytest.mark.parametrize("layer,part,name", [(1, "attn", "q"), (1, "attn", "v"), (0, "mlp", "gate"), (2, "mlp", "up")])
def test_producer_refit_matches_a_slow_solve_on_the_pruned_path(layer, part, name):
    """The producer's input on the final (masked) model is the pruned path it was refit on; layer 0's MLP
    input drifts because layer 0's attention lost a group."""
    dense, model, _, _ = producers_model()
    lin = lambda m: getattr(getattr(layer_views(m)[layer], part), name)  # noqa: E731
    x, xt = hooked(dense, calib(), lin).T, hooked(model, calib(), lin).T
    assert (x - xt).abs().max() > 1e-4                          # the input did drift
    expected = anchored(lin(dense).weight.double(), x, xt)
    torch.testing.assert_close(lin(model).weight.double(), expected, atol=2e-4, rtol=1e-3)


def test_layers_before_the_first_change_keep_their_producers():
    dense, model, _, rows = producers_model(plan=LATE)
    d0, m0 = layer_views(dense)[0], layer_views(model)[0]
    for a, b in ((d0.attn.q, m0.attn.q), (d0.mlp.gate, m0.mlp.gate), (d0.mlp.down, m0.mlp.down)):
        assert torch.equal(a.weight, b.weight)
    assert {(r["layer"], r["kind"]) for r in rows} == {(1, "mlp"), (2, "attn_in"), (2, "mlp_in")}


def test_one_stream_leaves_the_weights_as_they_are():
    """On one stream W·C = W·G: the anchored ridge gives W back (a ridge towards 0 would shrink it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 200, generator=gen, dtype=torch.float64)
    w1, w2 = torch.randn(8, 16, generator=gen, dtype=torch.float64), torch.randn(4, 16, generator=gen, dtype=torch.float64)
    g = x @ x.T
    out = refit.anchored_lstsq([w1 @ g, w2 @ g], g, [w1, w2], 0.05)
    torch.testing.assert_close(out[0], w1)
    torch.testing.assert_close(out[1], w2)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_producer_rows_lower_the_error_and_the_executor_matches(arch):
    plan = PLAN if arch == "llama" else PruningPlan(mlp=PLAN.mlp)
    _, model, final, rows = producers_model(arch, plan=plan)
    kinds = {r["kind"] for r in rows}
    assert {"attn_in", "mlp_in"} <= kinds
    produced = [r for r in rows if r["kind"].endswith("_in")]    # (the consumers' ridge is towards 0: not these)
    assert all(r["err_after"] <= r["err_before"] + 1e-12 for r in produced)
    assert all(r["err_after"] < 0.9 * r["err_before"] for r in produced)
    pruned = apply_plan(copy.deepcopy(model), final)
    with torch.no_grad():
        a, b = pruned(tokens(2, 20)).logits, model(tokens(2, 20)).logits
    assert (a - b).abs().max().item() < 1e-5


def test_producers_need_a_least_squares_mode():
    with pytest.raises(PruneLabError, match="reconstruct.producers=true"):
        Reconstruct("bias", producers=True)


def test_cli_producers_run_and_bad_mode_is_one_line_exit_2(tmp_path):
    run_cli(*tiny_overrides("llama"), "reconstruct.producers=true", "verify=true", tmp_path=tmp_path / "ok")
    m = metrics(tmp_path / "ok")
    assert m["status"] == "ok" and m["verify"]["max_logit_diff"] < 1e-5
    proc = run_cli(*tiny_overrides("llama"), "reconstruct=bias", "reconstruct.producers=true",
                   tmp_path=tmp_path / "bad", check=False)
    assert proc.returncode == 2
    lines = [line for line in error_lines(proc) if line.startswith("prune_lab: error:")]
    assert len(lines) == 1 and "reconstruct.producers=true" in lines[0]
