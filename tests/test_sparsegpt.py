"""SparseGPT / GPTQ layer math against slow references, masks, quantizer and the mixed bit allocation."""
from __future__ import annotations

import pytest
import torch

from prune_lab.errors import PruneLabError
from prune_lab.quant.grid import RowQuantizer, quantize
from prune_lab.quant.allocation import allocate_bits, channel_dimensions, channel_scores, check_allocation
from prune_lab.method.masks import SparsitySpec, baseline_mask
from prune_lab.method.sweep import obs_sweep


def reconstruction_error(w_new, w_ref, hessian) -> float:
    """‖(W_ref − W_new)·X‖²_F = tr(ΔW·H·ΔWᵀ)/2 with H = 2·X·Xᵀ (the layer-wise objective)."""
    delta = (w_ref.double() - w_new.double())
    return float(((delta @ hessian.double()) * delta).sum() / 2)


def layer_problem(rows=16, cols=32, tokens=400, seed=0, dtype=torch.float64):
    """A weight and a Hessian H = 2XXᵀ of correlated inputs with a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) / cols ** 0.5 + torch.eye(cols, dtype=dtype)
    x = torch.randn(tokens, cols, generator=g, dtype=dtype) @ mix
    x[:, :3] *= 6                                                   # outlier features
    w = torch.randn(rows, cols, generator=g, dtype=dtype)
    return w, 2 * x.T @ x, x


def slow_obs(w, h, spec, blocksize, damp, quantizer=None):
    """Textbook OBS, column by column with explicit inverses of H restricted to the columns not yet
    fixed (no Cholesky, no lazy batching): fix column j to q_j (0 if masked, else itself, quantized),
    move the remaining columns F by −(w_j − q_j)·[H_F⁻¹]_{:,j} / [H_F⁻¹]_jj. Masks are picked per block
    by the saliency w² / [H_F⁻¹]_jj at the block's start (per M-group when the sweep reaches it)."""
    w = w.clone()
    cols = w.shape[1]
    h = h.clone() + damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    dinv = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])   # [H_F⁻¹]_jj
    mask = torch.ones_like(w, dtype=torch.bool)
    params = quantizer.params(w) if quantizer is not None and not quantizer.group_size else None
    for j in range(cols):
        if j % blocksize == 0 and spec.active and not spec.nm:
            blk = slice(j, j + blocksize)
            sal = (w[:, blk] ** 2 / dinv[blk]).flatten()
            k = int(sal.numel() * spec.sparsity)
            m = torch.ones_like(sal, dtype=torch.bool)
            m[sal.argsort()[:k]] = False
            mask[:, blk] = m.reshape(w.shape[0], -1)
        if spec.nm and j % spec.prune_m == 0:
            grp = slice(j, j + spec.prune_m)
            sal = w[:, grp] ** 2 / dinv[grp]
            for r in range(w.shape[0]):
                mask[r, j + sal[r].argsort()[:spec.prune_n]] = False
        if quantizer is not None and quantizer.group_size and j % quantizer.group_size == 0:
            params = quantizer.params(w[:, j:j + quantizer.group_size])
        q = torch.where(mask[:, j], w[:, j], torch.zeros_like(w[:, j]))
        if params is not None:
            q = quantize(q[:, None], *params).squeeze(1) * mask[:, j]
        hinv = torch.linalg.inv(h[j:, j:])
        w[:, j:] -= ((w[:, j] - q) / hinv[0, 0])[:, None] * hinv[0][None, :]
        w[:, j] = q
    return w, mask


@pytest.mark.parametrize("spec,quant", [
    (SparsitySpec(sparsity=0.5), None),
    (SparsitySpec(prune_n=2, prune_m=4), None),
    (SparsitySpec(sparsity=0.0), RowQuantizer(torch.full((16,), 3), sym=False)),
    (SparsitySpec(sparsity=0.4), RowQuantizer(torch.arange(16) % 4 + 2, sym=True, group_size=16)),
])
def test_obs_sweep_matches_slow_reference(spec, quant):
    w, h, _ = layer_problem()
    fast, mask, _ = obs_sweep(w, h, spec, blocksize=8, damp=0.01, quantizer=quant)
    ref, ref_mask = slow_obs(w, h, spec, blocksize=8, damp=0.01, quantizer=quant)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(fast, ref, rtol=1e-7, atol=1e-8)
    assert (fast[~mask] == 0).all()


def test_nm_masks_exact_in_every_group():
    w, h, x = layer_problem(rows=12, cols=48)
    spec = SparsitySpec(prune_n=2, prune_m=4)
    masks = {"sparsegpt": obs_sweep(w.float(), h, spec, blocksize=16)[1],
             "wanda": baseline_mask(w, spec, (x ** 2).sum(0)),
             "magnitude": baseline_mask(w, spec, None)}
    for name, m in masks.items():
        zeros = (~m).reshape(12, 12, 4).sum(-1)
        assert (zeros == 2).all(), name
    spec36 = SparsitySpec(prune_n=3, prune_m=6)
    assert ((~baseline_mask(w, spec36, None)).reshape(12, 8, 6).sum(-1) == 3).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_unstructured_sparsity_equals_target(sparsity):
    w, h, x = layer_problem(rows=16, cols=64)
    spec = SparsitySpec(sparsity=sparsity)
    # granularity: one weight per block of 16x32 (sparsegpt), per row of 64 (wanda), per matrix
    for m, tol in ((obs_sweep(w, h, spec, blocksize=32)[1], 1 / 512),
                   (baseline_mask(w, spec, (x ** 2).sum(0)), 1 / 64), (baseline_mask(w, spec, None), 1 / 1024)):
        assert abs((~m).float().mean().item() - sparsity) <= tol
    fast = obs_sweep(w, h, spec, blocksize=32)[0]
    assert abs((fast == 0).double().mean().item() - sparsity) <= 1 / (16 * 32)


@pytest.mark.parametrize("spec", [SparsitySpec(sparsity=0.5), SparsitySpec(prune_n=2, prune_m=4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(spec):
    w, h, x = layer_problem(rows=64, cols=128, tokens=2000, dtype=torch.float32)
    sgpt, _, _ = obs_sweep(w, h, spec, blocksize=32, damp=0.01)
    errors = {"sparsegpt": reconstruction_error(sgpt, w, h),
              "wanda": reconstruction_error(w * baseline_mask(w, spec, (x ** 2).sum(0)), w, h),
              "magnitude": reconstruction_error(w * baseline_mask(w, spec, None), w, h)}
    direct = ((x.double() @ (w - sgpt).T.double()) ** 2).sum().item()       # the objective, from the tokens
    assert errors["sparsegpt"] == pytest.approx(direct, rel=1e-4)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"] < errors["magnitude"], errors


def test_quantized_channels_take_at_most_2_pow_bits_values():
    w, h, _ = layer_problem(rows=20, cols=64, dtype=torch.float32)
    bits = torch.tensor([2, 3, 4, 6, 8] * 4)
    for sym in (True, False):
        q, mask, _ = obs_sweep(w, h, SparsitySpec(), blocksize=16, quantizer=RowQuantizer(bits, sym))
        for r in range(20):
            assert len(torch.unique(q[r])) <= 2 ** bits[r]
        assert len(torch.unique(q[0])) > 2                  # 2 bits really uses its 4 levels
    # with sparsity the zeros stay exactly zero and count as one of the levels
    q, mask, _ = obs_sweep(w, h, SparsitySpec(sparsity=0.5), blocksize=16,
                           quantizer=RowQuantizer(torch.full((20,), 3), sym=False))
    assert (q[~mask] == 0).all() and all(len(torch.unique(q[r])) <= 8 for r in range(20))


def test_gptq_feedback_beats_round_to_nearest():
    w, h, _ = layer_problem(rows=32, cols=64, dtype=torch.float32)
    quant = RowQuantizer(torch.full((32,), 3), sym=True)
    gptq, _, _ = obs_sweep(w, h, SparsitySpec(), blocksize=16, quantizer=quant)
    rtn = quantize(w, *quant.params(w))
    assert reconstruction_error(gptq, w, h) < 0.8 * reconstruction_error(rtn, w, h)


def test_budget_hits_the_average_and_favours_important_channels():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3000, generator=g) ** 3 * 4
    costs = torch.cat([torch.full((1000,), 256.0), torch.full((1000,), 768.0), torch.full((1000,), 64.0)])
    for target in (2.0, 3.3, 4.0, 4.6, 5.5, 8.0):
        bits = allocate_bits(scores, costs, [2, 3, 4, 6, 8], "budget", target)
        avg = (bits * costs).sum() / costs.sum()
        assert abs(avg.item() - target) <= 0.01, (target, avg)
        assert set(bits.tolist()) <= {2, 3, 4, 6, 8}
        for part in range(3):                 # within channels of equal cost: more score, more bits
            sl = slice(part * 1000, (part + 1) * 1000)
            ranked = bits[sl][scores[sl].argsort()]
            assert (ranked.diff() >= 0).float().mean() > 0.99
            assert ranked[-100:].float().mean() >= ranked[:100].float().mean()
    bits = allocate_bits(scores, costs, [2, 3, 4, 6, 8], "budget", 4.0)
    assert bits[scores.argmax()] > bits[scores.argmin()]


def test_quantile_and_threshold3():
    scores = torch.linspace(0.1, 2.0, 500)
    bits = allocate_bits(scores, torch.ones(500), [2, 3, 4, 6, 8], "quantile")
    assert bits.float().mean().item() == pytest.approx(4.6)
    assert torch.equal(torch.bincount(bits)[[2, 3, 4, 6, 8]], torch.full((5,), 100))
    assert (bits.diff() >= 0).all()
    bits3 = allocate_bits(torch.tensor([0.2, 0.49, 0.5, 1.0, 1.2, 1.21, 3.0]), torch.ones(7),
                          [2, 3, 4, 6, 8], "threshold3")
    assert bits3.tolist() == [2, 2, 4, 4, 4, 8, 8]


def test_channel_scores_are_normalised_and_weighted():
    w, h, x = layer_problem(rows=10, cols=32, dtype=torch.float32)
    hinv_diag = torch.diag(torch.linalg.inv(h + 0.01 * torch.diag(h).mean() * torch.eye(32)))
    dims = channel_dimensions(w, x.abs().mean(0), (x ** 2).mean(0), x.var(0), hinv_diag)
    assert dims.shape == (10, 5)
    torch.testing.assert_close(dims.mean(0), torch.ones(5))
    # output sensitivity is sqrt(Σ W² E[x²]) normalised
    out = ((w ** 2) @ (x ** 2).mean(0)).sqrt()
    torch.testing.assert_close(dims[:, 3], out / out.mean())
    s = channel_scores(dims, torch.tensor([0.25, 0.25, 0.15, 0.25, 0.10]))
    torch.testing.assert_close(s.mean(), torch.tensor(1.0))
    torch.testing.assert_close(channel_scores(dims, torch.tensor([0.0, 0, 2, 0, 0])), dims[:, 2])


@pytest.mark.parametrize("bad,match", [
    (dict(bits_options=[2, 4], weights=[1, 1, 1, 1, 1], allocation="budget", target_avg_bits=5.0), "outside"),
    (dict(bits_options=[2, 4], weights=[1, 1, 1, 1, 1], allocation="budget", target_avg_bits=1.0), "outside"),
    (dict(bits_options=[2, 4], weights=[0, 0, 0, 0, 0], allocation="quantile", target_avg_bits=None), "sum"),
    (dict(bits_options=[2, 3], weights=[1, 1, 1, 1, 1], allocation="threshold3", target_avg_bits=None), "threshold3"),
    (dict(bits_options=[2, 4], weights=[1, 1, 1, 1, 1], allocation="ranked", target_avg_bits=None), "allocation"),
])
def test_bad_allocation_config(bad, match):
    with pytest.raises(PruneLabError, match=match):
        check_allocation(**bad)


@pytest.mark.parametrize("spec,match", [
    (SparsitySpec(sparsity=1.0), r"\[0, 1\)"), (SparsitySpec(sparsity=-0.1), r"\[0, 1\)"),
    (SparsitySpec(prune_n=4, prune_m=2), "N <= M"), (SparsitySpec(prune_n=2), "both"),
])
def test_bad_sparsity(spec, match):
    with pytest.raises(PruneLabError, match=match):
        spec.check()


def test_act_order_is_the_sweep_of_the_permuted_problem():
    w, h, _ = layer_problem()
    perm = torch.argsort(torch.diag(h), descending=True)
    quant = RowQuantizer(torch.full((16,), 3), sym=False)
    for spec in (SparsitySpec(sparsity=0.5), SparsitySpec()):
        fast, mask, _ = obs_sweep(w, h, spec, blocksize=8, quantizer=quant, act_order=True)
        ref, ref_mask = slow_obs(w[:, perm], h[perm][:, perm], spec, blocksize=8, damp=0.01, quantizer=quant)
        inv = torch.argsort(perm)
        assert torch.equal(mask, ref_mask[:, inv])
        torch.testing.assert_close(fast, ref[:, inv], rtol=1e-7, atol=1e-8)
    # static groups: every original group of a row stays on one grid of 2^bits levels
    grouped = RowQuantizer(torch.full((16,), 2), sym=True, group_size=8)
    q, _, _ = obs_sweep(w, h, SparsitySpec(), blocksize=8, quantizer=grouped, act_order=True)
    assert all(len(torch.unique(q[r, c:c + 8])) <= 4 for r in range(16) for c in range(0, 32, 8))
    with pytest.raises(PruneLabError, match="N:M"):
        obs_sweep(w, h, SparsitySpec(prune_n=2, prune_m=4), quantizer=quant, act_order=True)


def test_budget_with_measured_errors_is_near_the_lagrangian_lower_bound():
    g = torch.Generator().manual_seed(3)
    opts = torch.tensor([2, 3, 4, 6, 8], dtype=torch.float64)
    n = 400
    errors = (torch.rand(n, 1, generator=g) * 3 + 0.1) * 4.0 ** (-opts)[None] * (1 + 0.3 * torch.rand(n, 5, generator=g))
    errors = errors.sort(dim=1, descending=True).values            # more bits, less error
    costs = torch.where(torch.arange(n) < 200, 256.0, 768.0).double()
    for target in (3.3, 4.0, 5.2):
        bits = allocate_bits(torch.ones(n), costs, [2, 3, 4, 6, 8], "budget", target, errors=errors)
        assert abs(((bits * costs).sum() / costs.sum()).item() - target) <= 0.01
        ours = errors[torch.arange(n), torch.bucketize(bits.double(), opts)].sum()
        # Lagrangian dual: a lower bound on the best loss at exactly this budget
        budget = target * costs.sum()
        dual = max((errors + lam * costs[:, None] * opts[None]).min(1).values.sum() - lam * budget
                   for lam in torch.logspace(-9, 0, 600, dtype=torch.float64))
        assert ours <= dual * 1.01 + 1e-12, (target, ours, dual)
    four = allocate_bits(torch.ones(n), costs, [2, 3, 4, 6, 8], "budget", 4.0, errors=errors)
    assert errors[torch.arange(n), torch.bucketize(four.double(), opts)].sum() <= errors[:, 2].sum()


# ---- asymmetric calibration (GPTAQ-style): fit W'·X~ to W·X ------------------------------------
def two_streams(rows=24, cols=32, tokens=600, seed=1):
    """Dense-path inputs X and pruned-path inputs X~ = X·(I + E) + noise (the drift of an earlier
    pruned layer), as the engine's statistics: gram X~X~ᵀ, cross XX~ᵀ, dense_gram XXᵀ."""
    from prune_lab.engine.stats import InputStats
    w, _, x = layer_problem(rows=rows, cols=cols, tokens=tokens, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    xt = x @ (torch.eye(cols, dtype=x.dtype) + 0.15 * torch.randn(cols, cols, generator=g, dtype=x.dtype)) \
        + 0.3 * torch.randn(tokens, cols, generator=g, dtype=x.dtype)
    stats = InputStats(xt.sum(0), (xt ** 2).sum(0), xt.abs().sum(0), tokens, gram=xt.T @ xt, cross=x.T @ xt,
                       dense_gram=x.T @ x, dense_sum=x.sum(0))
    return w, x, xt, stats


def asym_err(w, w_new, x, xt, drift=None):
    target = x @ w.T + (0 if drift is None else drift)
    return ((target - xt @ w_new.T) ** 2).sum().item()


def test_asymmetric_target_is_the_identity_on_one_stream():
    from prune_lab.method.sweep import asymmetric_target, inverse_hessian_factor
    w, _, x = layer_problem()
    from prune_lab.engine.stats import InputStats
    gram = x.T @ x
    stats = InputStats(x.sum(0), (x ** 2).sum(0), x.abs().sum(0), len(x), gram=gram, cross=gram, dense_gram=gram)
    w0 = asymmetric_target(w, stats, inverse_hessian_factor(2 * gram / len(x), 0.01))
    assert torch.equal(w0, w)


def test_asymmetric_target_is_the_ridge_least_squares_solution():
    """W0 = argmin ‖W·X − W0·X~‖² + μ‖W0 − W‖², μ = (n/2)·damp·mean diag(H), from a direct lstsq."""
    from prune_lab.method.sweep import asymmetric_target, inverse_hessian_factor
    w, x, xt, stats = two_streams()
    n, damp = len(x), 0.01
    h = 2 * stats.gram / n
    mu = n / 2 * damp * torch.diag(h).mean()
    eye = torch.eye(w.shape[1], dtype=w.dtype)
    a = torch.cat([xt, mu.sqrt() * eye])                        # rows: tokens, then the ridge rows
    b = torch.cat([x @ w.T, mu.sqrt() * w.T])
    ref = torch.linalg.lstsq(a, b).solution.T
    w0 = asymmetric_target(w, stats, inverse_hessian_factor(h, damp))
    torch.testing.assert_close(w0, ref, rtol=1e-8, atol=1e-9)
    assert asym_err(w, w0, x, xt) < 0.5 * asym_err(w, w, x, xt)
    quarter = asymmetric_target(w, stats, inverse_hessian_factor(h, damp), alpha=0.25)   # GPTAQ's α
    torch.testing.assert_close(quarter - w, 0.25 * (w0 - w), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec,quant", [
    (SparsitySpec(sparsity=0.5), None),
    (SparsitySpec(prune_n=2, prune_m=4), None),
    (SparsitySpec(), RowQuantizer(torch.full((24,), 3))),
    (SparsitySpec(sparsity=0.5), RowQuantizer(torch.full((24,), 4), group_size=16)),
])
def test_asymmetric_sweep_fits_the_dense_outputs_better(spec, quant):
    from prune_lab.method.sweep import asymmetric_target, inverse_hessian_factor
    w, x, xt, stats = two_streams()
    h = 2 * stats.gram / len(x)
    sym, mask_s, _ = obs_sweep(w, h, spec, blocksize=8, damp=0.01, quantizer=quant)
    w0 = asymmetric_target(w, stats, inverse_hessian_factor(h, 0.01))
    asym, mask_a, _ = obs_sweep(w0, h, spec, blocksize=8, damp=0.01, quantizer=quant)
    assert (asym[~mask_a] == 0).all() and (~mask_a).float().mean() == (~mask_s).float().mean()
    assert asym_err(w, asym, x, xt) < 0.5 * asym_err(w, sym, x, xt)


def test_asymmetric_target_absorbs_the_residual_drift():
    """With R = Σ (h − h~)·x~ᵀ the target is W·X + (h − h~): the output also repairs the residual stream."""
    from dataclasses import replace
    from prune_lab.method.sweep import asymmetric_target, inverse_hessian_factor
    w, x, xt, stats = two_streams()
    drift = torch.randn(len(x), w.shape[0], generator=torch.Generator().manual_seed(5), dtype=x.dtype) \
        + xt @ torch.randn(w.shape[1], w.shape[0], dtype=x.dtype) * 0.1      # partly explained by x~
    factor = inverse_hessian_factor(2 * stats.gram / len(x), 0.01)
    plain = asymmetric_target(w, stats, factor)
    absorbed = asymmetric_target(w, replace(stats, resid_cross=drift.T @ xt), factor)
    assert asym_err(w, absorbed, x, xt, drift) < 0.9 * asym_err(w, plain, x, xt, drift)


@pytest.mark.parametrize("target", [2.5, 3.5, 4.0, 4.6, 6.0, 7.5])
def test_quantile_shifts_its_boundaries_to_meet_the_target(target):
    scores = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    costs = torch.randint(32, 96, (2000,), generator=torch.Generator().manual_seed(1)).float()
    bits = allocate_bits(scores, costs, [2, 3, 4, 6, 8], "quantile", target)
    assert ((bits.float() * costs).sum() / costs.sum()).item() == pytest.approx(target, abs=0.01)
    ranked = bits[scores.argsort()]
    assert (ranked.diff() >= 0).all()                      # the score order is kept: only boundaries move
    assert set(bits.unique().tolist()) <= {2, 3, 4, 6, 8}


def test_custom_quantile_boundaries_and_their_implied_average():
    scores = torch.linspace(0, 1, 1000)
    bits = allocate_bits(scores, torch.ones(1000), [2, 4, 8], "quantile", None, quantiles=[0.5, 0.9])
    assert torch.equal(torch.bincount(bits)[[2, 4, 8]], torch.tensor([500, 400, 100]))
    check_allocation([2, 4, 8], [1] * 5, "quantile", 3.4, quantiles=[0.5, 0.9])     # 0.5·2 + 0.4·4 + 0.1·8
    with pytest.raises(PruneLabError, match=r"give 3.400 bits on average, not quant.target_avg_bits=4.0"):
        check_allocation([2, 4, 8], [1] * 5, "quantile", 4.0, quantiles=[0.5, 0.9])
    for bad in ([0.9, 0.5], [0.5], [0.5, 1.2]):
        with pytest.raises(PruneLabError, match="quant.quantiles must be 2 non-decreasing"):
            check_allocation([2, 4, 8], [1] * 5, "quantile", None, quantiles=bad)
    with pytest.raises(PruneLabError, match="quant.allocation=quantile's boundaries"):
        check_allocation([2, 4, 8], [1] * 5, "budget", 4.0, quantiles=[0.5, 0.9])


@pytest.mark.parametrize("target", [3.0, 4.0, 5.0])
def test_threshold3_scales_its_thresholds_to_the_target(target):
    scores = torch.distributions.LogNormal(0.0, 0.5).sample((3000,))
    bits = allocate_bits(scores, torch.ones(3000), [2, 3, 4, 6, 8], "threshold3", target, thresholds=(0.5, 1.2))
    assert bits.float().mean().item() == pytest.approx(target, abs=0.01)
    assert set(bits.unique().tolist()) == {2, 4, 8} and (bits[scores.argsort()].diff() >= 0).all()


def test_layer_avg_bits_give_a_layer_its_own_average(tmp_path):
    from conftest import compose_job, tiny_overrides, write_small_corpus
    from prune_lab.recipes import run
    corpus = write_small_corpus(tmp_path)
    for allocation in ("budget", "quantile"):
        cfg = compose_job(*tiny_overrides("llama", tmp_path), "data=text", f"data.train={corpus}/train.txt",
                          f"data.test={corpus}/test.txt", "output.plots=false", "method=sparsegpt",
                          "method.sparsity=0", "method.blocksize=16", "quant=mixed", f"quant.allocation={allocation}",
                          "quant.target_avg_bits=4.0", "++quant.layer_avg_bits={0:6,2:3}")
        run(cfg, tmp_path / allocation)
        import json
        compression = json.loads((tmp_path / allocation / "metrics.json").read_text())["compression"]
        got = [e["avg_bits"] for e in compression["per_layer"]]
        assert [round(b, 1) for b in got] == [6.0, 4.0, 3.0], (allocation, got)


def test_layer_avg_bits_beyond_the_model_is_one_line(tmp_path):
    from conftest import run_cli, tiny_overrides
    proc = run_cli(*tiny_overrides("llama"), "method=sparsegpt", "method.sparsity=0", "quant=mixed",
                   "++quant.layer_avg_bits={7:3}", run_dir=tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert [x for x in proc.stderr.splitlines() if "error" in x.lower()] == [
        "prune_lab: error: quant.layer_avg_bits names layer(s) [7], but the model has 3 layers (0..2)"]
