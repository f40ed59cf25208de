"""Row (width) of experiments/bench_engine.py: the refit's parts for one down_proj of MLP width N on random
activations (hidden 512), this tree's engine and the old revision's side by side in one process."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from bench_engine import OLD, emit, old_package, sub, timed


def bench_width(work: Path, widths: list[int], slow_max: int) -> None:
    old = old_package(OLD, work)
    for n in widths:
        emit(work, "width", width_row(n, sub(old, "stats"), sub(old, "refit"), slow=n <= slow_max))


def width_row(n: int, old_stats, old_refit, hidden: int = 512, bt: int = 2048, damp: float = 0.01,
              slow: bool = True) -> dict:
    """slow=False: without the exact greedy and the old selection (the two slow columns)."""
    from prune_lab.engine.stats import Accumulator
    from prune_lab.reconstruct import refit
    gen = torch.Generator().manual_seed(n)
    lin = torch.nn.Linear(n, hidden, bias=False).requires_grad_(False)
    torch.nn.init.normal_(lin.weight, std=n ** -0.5, generator=gen)
    n_batches, k = math.ceil(n / bt), n // 4
    mix = torch.randn(64, n, generator=gen) / 8                      # correlated features, as activations are

    def batch(b):
        g = torch.Generator().manual_seed(n * 100 + b)
        xt = torch.randn(bt, n, generator=g) + torch.randn(bt, 64, generator=g) @ mix
        return xt, xt + 0.1 * torch.randn(bt, n, generator=g), 0.1 * torch.randn(bt, hidden, generator=g)

    def add_new(acc, xt, x, r):
        acc.next_batch()
        acc.dense("mlp.down", x, x @ lin.weight.T, None)
        acc.res_dense, acc.res_pruned = r, torch.zeros_like(r)
        acc.pruned(xt, None)

    def add_old(acc, xt, x, r):
        acc.dense_x, acc.res_dense, acc.res_pruned = x, r, torch.zeros_like(r)
        acc.add(xt)
    acc, gram_new = Accumulator({"mlp.down": lin}, True, True, "cpu", ["mlp.down"]), 0.0
    for b in range(n_batches):                  # (the dense output W₀x is computed inside, as a hook gets it)
        data = batch(b)
        gram_new += timed(lambda: add_new(acc, *data))[0]
    data = batch(0)
    gram_old = timed(lambda: add_old(old_stats.Accumulator(lin, True, True, "cpu", True), *data))[0] * n_batches
    s = acc.stats()["mlp.down"]
    g = s.gram.double()
    inv_s, hinv = timed(lambda: refit.ridge_inverse(g, damp))
    start = s.w_cross(lin.weight) @ hinv
    auto_s, (auto, _) = timed(lambda: refit.obs_select(start, g, n, 1, k, damp, math.ceil(k / 64), adaptive=True,
                                                       hinv=hinv))
    greedy_s, (greedy, _) = timed(lambda: refit.obs_select(start, g, n, 1, k, damp, 1, hinv=hinv)) if slow \
        else (None, (None, None))
    keep = torch.tensor(sorted(set(range(n)) - set(auto)))
    lstsq_s = timed(lambda: refit.lstsq(s.w_cross(lin.weight), g, keep, damp))[0]
    hinv = None                                   # (freed before the old one runs)
    avail = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1]) * 1024
    old_s = timed(lambda: old_refit.obs_select(start, g, n, 1, k, damp, math.ceil(k / 64)))[0] \
        if slow and 5 * 8 * n * n < 0.8 * avail else None   # the old one holds eye, h + λI, L and H⁻¹ in fp64
    return {"width": n, "hidden": hidden, "tokens": n_batches * bt, "gram_new_s": gram_new, "gram_old_s": gram_old,
            "inverse_s": inv_s, "obs_auto_s": auto_s, "obs_greedy_s": greedy_s, "obs_old_s": old_s,
            "lstsq_s": lstsq_s, "auto_vs_greedy_same": None if greedy is None else len(set(auto) & set(greedy)) / k}
