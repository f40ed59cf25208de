"""Block structured OBS (refit.obs_select): against a slow reference of explicit pinv + full H⁻¹ downdates,
adaptive steps on interacting units, and the default's layer errors within 1% of the exact greedy on a
random layer and on lab-llama layers."""
from __future__ import annotations

import math

import pytest
import torch

from prune_lab.engine.stats import output_error
from prune_lab.reconstruct import refit
from prune_lab.reconstruct.base import AUTO_STEPS


def reference_obs(w, g, n_blocks, width, k, damp, block, f=None):
    """The textbook loop: per step every alive block's error from pinv(H⁻¹_BB), the `block` cheapest
    removed together, W and the full H⁻¹ downdated explicitly."""
    w = w.double().clone()
    f = torch.ones(w.shape[0], dtype=torch.float64) if f is None else f.double()
    h = g.double() + damp * g.diagonal().mean() * torch.eye(len(g), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    alive, removed, errors = list(range(n_blocks)), [], []
    while len(removed) < k:
        errs = {}
        for b in alive:
            c = list(range(b * width, (b + 1) * width))
            m = torch.linalg.pinv(hinv[c][:, c])
            errs[b] = float(sum(f[o] * w[o, c] @ m @ w[o, c] for o in range(w.shape[0])))
        take = sorted(alive, key=errs.get)[: min(block, k - len(removed))]
        c = [j for b in take for j in range(b * width, (b + 1) * width)]
        m = torch.linalg.pinv(hinv[c][:, c])
        w -= w[:, c] @ m @ hinv[c]
        hinv -= hinv[:, c] @ m @ hinv[c]
        w[:, c], hinv[c], hinv[:, c] = 0, 0, 0
        alive = [b for b in alive if b not in take]
        removed += take
        errors += [errs[b] for b in take]
    return removed, errors


def problem(n_cols, out=6, tokens=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_cols, tokens or 3 * n_cols, generator=gen, dtype=torch.float64)
    x = x + 0.5 * torch.randn(1, x.shape[1], generator=gen, dtype=torch.float64)     # correlated features
    x[1] *= 0.1
    return x @ x.T, torch.randn(out, n_cols, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("width,n_blocks,k,block", [(1, 24, 10, 1), (1, 24, 13, 3), (1, 30, 29, 4),
                                                    (4, 6, 4, 1), (4, 6, 5, 2), (3, 7, 5, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_block_steps_equal_the_slow_reference(width, n_blocks, k, block, weighted):
    g, w = problem(n_blocks * width)
    f = torch.linspace(0.1, 3.0, w.shape[0], dtype=torch.float64) if weighted else None
    got = refit.obs_select(w, g, n_blocks, width, k, 1e-3, block, f)
    ref = reference_obs(w, g, n_blocks, width, k, 1e-3, block, f)
    assert got[0] == ref[0]
    assert got[1] == pytest.approx(ref[1], rel=1e-6, abs=1e-9)


def test_columns_past_the_blocks_are_updated_never_removed():
    """A bias feature appended after the units: the reference removes the same blocks."""
    g, w = problem(13)
    got = refit.obs_select(w, g, 12, 1, 6, 1e-3, 2)
    ref = reference_obs(w, g, 12, 1, 6, 1e-3, 2)
    assert got[0] == ref[0] and all(b < 12 for b in got[0])


def twins(n=16, seed=3):
    """Column 0 nearly duplicates column 1: each alone is cheap to remove (the twin takes over), both are not."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 200, generator=gen, dtype=torch.float64)
    x[0] = x[1] + 0.01 * torch.randn(200, generator=gen, dtype=torch.float64)
    w = torch.randn(4, n, generator=gen, dtype=torch.float64)
    w[:, 2:] *= 0.5
    return x @ x.T, w


def test_adaptive_steps_split_interacting_units_and_follow_the_greedy():
    g, w = twins()
    greedy, _ = refit.obs_select(w, g, 16, 1, 4, 1e-3, 1)
    fixed, _ = refit.obs_select(w, g, 16, 1, 4, 1e-3, 4)
    adaptive, _ = refit.obs_select(w, g, 16, 1, 4, 1e-3, 4, adaptive=True)
    assert {0, 1} <= set(fixed)              # a fixed block of 4 takes both twins at once
    assert len({0, 1} & set(greedy)) == 1    # the greedy keeps one of them
    assert set(adaptive) == set(greedy)      # (a step of 2 takes two units the greedy took one by one)


def refit_error(w, g, removed, width, damp):
    cut = refit.block_columns(torch.tensor(sorted(removed)), width)
    keep = torch.tensor([j for j in range(w.shape[1]) if j not in set(cut.tolist())])
    new = refit.lstsq(w.double() @ g.double(), g.double(), keep, damp)
    energy = ((w.double() @ g.double()) * w.double()).sum()
    return output_error(new, g.double(), w.double() @ g.double(), energy) / float(energy)


def default_vs_greedy(w, g, n_blocks, width, k, damp=0.01):
    """(error of the default block setting, error of the exact greedy) after the refit of the kept units."""
    block = max(1, math.ceil(k / AUTO_STEPS))
    auto, _ = refit.obs_select(w, g, n_blocks, width, k, damp, block, adaptive=True)
    exact, _ = refit.obs_select(w, g, n_blocks, width, k, damp, 1)
    return refit_error(w, g, auto, width, damp), refit_error(w, g, exact, width, damp)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_the_default_is_within_one_percent_of_the_greedy_on_a_random_layer(ratio):
    g, w = problem(512, out=128, tokens=2048, seed=4)
    auto, exact = default_vs_greedy(w, g, 512, 1, int(512 * ratio))
    assert auto <= 1.01 * exact


@pytest.mark.lab
def test_the_default_is_within_one_percent_of_the_greedy_on_lab_llama_layers(lab_model):
    from prune_lab.core.adapter import layer_views
    from prune_lab.data import Calibration, TokenStreams, WikiVital
    from prune_lab.engine import walk
    model, tok = lab_model
    batches = Calibration(n_samples=16).batches(TokenStreams(tok)(WikiVital(), "train"), 0)
    grams = {}

    class Keep:
        needs_gram, needs_cross, needs_residual, needs_dense_grams = True, False, False, False

        def stages(self, view):
            return [["attn.o", "mlp.down"]] if view.index in (2, 9) else []

        def apply(self, index, view, stats):
            grams.update({(index, p): s.gram for p, s in stats.items()})

    walk(model, batches, Keep(), propagate="dense", progress=False)
    for i in (2, 9):
        a, m = layer_views(model)[i].attn, layer_views(model)[i].mlp
        for ratio in (0.25, 0.5):
            auto, exact = default_vs_greedy(m.down.weight, grams[(i, "mlp.down")], m.width, 1, int(m.width * ratio))
            assert auto <= 1.01 * exact, (i, ratio, auto, exact)
            auto, exact = default_vs_greedy(a.o.weight, grams[(i, "attn.o")], a.num_kv_heads,
                                            a.group_size * a.head_dim, int(a.num_kv_heads * ratio))
            assert auto <= 1.01 * exact, (i, ratio, auto, exact)
