"""quant.score=original: the seed SparseGPT-enhanced definitions of the five mixed-precision dimensions,
pinned against slow hand-written references on a tiny layer, and run in a job."""
from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import text_job
from prune_lab.engine.stats import InputStats
from prune_lab.method.sweep import inverse_hessian_factor
from prune_lab.quant import Mixed
from prune_lab.quant.allocation import (
    channel_scores,
    original_column_dimensions,
    original_dimensions,
)
from prune_lab.recipes import run
from prune_lab.study.storage import check_same_job


def layer(seed: int = 0, rows: int = 6, cols: int = 5, tokens: int = 40):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, cols, dtype=torch.float64)
    x[:, 1] += 1.5                                       # a feature with a mean, so mean|x| and var differ
    stats = InputStats(x.sum(0), x.square().sum(0), x.abs().sum(0), tokens, gram=x.T @ x)
    return w, x, stats


def normalised(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    return [v / (mean + 1e-8) for v in values]


def reference_columns(w, x, damp: float = 0.01) -> list[list[float]]:
    """The original's compute_importance_scores, one input column at a time."""
    rows, cols = w.shape
    n = x.shape[0]
    amp = [sum(abs(float(x[t, j])) for t in range(n)) / n for j in range(cols)]
    mean = [sum(float(x[t, j]) for t in range(n)) / n for j in range(cols)]
    var = [sum((float(x[t, j]) - mean[j]) ** 2 for t in range(n)) / n for j in range(cols)]
    h = 2 * x.T @ x / n
    h = h + damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)        # the original's "Hinv"
    hess = [abs(float(upper[j, j])) for j in range(cols)]
    weight = [sum(abs(float(w[i, j])) for i in range(rows)) / rows for j in range(cols)]
    output = [(sum(float(w[i, j]) ** 2 * amp[j] ** 2 for i in range(rows)) / rows) ** 0.5 for j in range(cols)]
    return [normalised(d) for d in (amp, hess, weight, output, var)]


def reference_rows(w, x) -> list[list[float]]:
    """Per output row: the original's weight and output formulas with rows and columns swapped."""
    rows, cols = w.shape
    n = x.shape[0]
    amp = [sum(abs(float(x[t, j])) for t in range(n)) / n for j in range(cols)]
    weight = [sum(abs(float(w[i, j])) for j in range(cols)) / cols for i in range(rows)]
    output = [(sum(float(w[i, j]) ** 2 * amp[j] ** 2 for j in range(cols)) / cols) ** 0.5 for i in range(rows)]
    return [normalised(weight), normalised(output)]


@pytest.mark.parametrize("seed", [0, 1])
def test_each_original_dimension_matches_a_slow_reference(seed):
    w, x, stats = layer(seed)
    u, _ = inverse_hessian_factor(2 * stats.gram / stats.count, 0.01)
    cols = original_column_dimensions(w, stats.mean_abs, stats.var, torch.diagonal(u))
    for k, ref in enumerate(reference_columns(w, x)):
        assert cols[:, k].tolist() == pytest.approx(ref, rel=1e-5), k
    rows = original_dimensions(w, stats.mean_abs, stats.var, torch.diagonal(u))
    weight, output = reference_rows(w, x)
    assert rows[:, 2].tolist() == pytest.approx(weight, rel=1e-5)
    assert rows[:, 3].tolist() == pytest.approx(output, rel=1e-5)
    for k in (0, 1, 4):                              # input-only: one value for every row, the mean of 1s
        assert rows[:, k].tolist() == pytest.approx([1.0] * w.shape[0], rel=1e-6)
    # the lab's definitions differ (row-weighted activation, W²/diag(H⁻¹), E[x²], sqrt(W²·var))
    lab = Mixed(target_avg_bits=4.0).dimensions(w, stats, u.square().sum(0), torch.diagonal(u))
    assert not torch.allclose(lab[:, [0, 1, 3, 4]].float(), rows[:, [0, 1, 3, 4]].float(), atol=1e-3)


def test_score_original_allocates_by_its_scores_at_the_target():
    w, _, stats = layer(2, rows=40, cols=16, tokens=64)
    u, _ = inverse_hessian_factor(2 * stats.gram / stats.count, 0.01)
    quant = Mixed(target_avg_bits=4.0, allocation="quantile", score="original")
    bits, ranges = quant.allocate({"mlp.up": w.float()}, {"mlp.up": stats}, {"mlp.up": u.square().sum(0)},
                                  layer=0, factor_diags={"mlp.up": torch.diagonal(u)})
    assert bits["mlp.up"].double().mean().item() == pytest.approx(4.0, abs=0.2)
    score = channel_scores(original_dimensions(w, stats.mean_abs, stats.var, torch.diagonal(u)), quant.weights)
    assert ranges["mlp.up"] == pytest.approx((float(score.min()), float(score.max())), rel=1e-5)
    order = score.argsort()
    assert (bits["mlp.up"][order].diff() >= 0).all()        # more bits for a higher original score


def test_score_is_a_typed_option_and_runs_in_a_job(tmp_path):
    with pytest.raises(ConfigCompositionException):
        text_job(tmp_path, "quant=mixed", "quant.score=orignal")
    assert Mixed(target_avg_bits=4.0).score == "lab"
    run(text_job(tmp_path, "output.plots=false", "allocator.ratio=0", "quant=mixed", "quant.score=original",
                 "quant.target_avg_bits=3.5"), tmp_path / "run")
    c = json.loads((tmp_path / "run" / "metrics.json").read_text())["compression"]
    assert c["avg_bits"] == pytest.approx(3.5, abs=0.02)


def test_a_study_made_before_quant_score_resumes_at_the_lab_score():
    class Study:
        study_name, user_attrs = "s", {"job_settings": {"quant.allocation": '"budget"'}}
    check_same_job(Study(), {"quant.allocation": '"budget"', "quant.score": '"QuantScore.lab"'})
    with pytest.raises(Exception, match="quant.score"):
        check_same_job(Study(), {"quant.allocation": '"budget"', "quant.score": '"QuantScore.original"'})
