"""Benchmark (not a test): (G+λI)⁻¹ from its Cholesky factor, torch.cholesky_inverse (what the engine uses)
vs cholesky_solve against I (tried in 89103d0 as core.linalg.cholesky_to_inverse, reverted in fa835f8 after
this benchmark), side by side in one process, float64.

    OMP_NUM_THREADS=2 flock /tmp/prune_lab_heavy.lock .venv/bin/python experiments/bench_inverse.py
"""
import os
import time

import torch


def cholesky_to_inverse(factor: torch.Tensor) -> torch.Tensor:
    """The reverted alternative: A⁻¹ = cholesky_solve(I, L), symmetrised."""
    inv = torch.cholesky_solve(torch.eye(factor.shape[-1], dtype=factor.dtype), factor)
    return (inv + inv.mT).mul_(0.5)


torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
print("| n | cholesky_inverse s | cholesky_solve(I) s | solve / inverse | max abs diff | threads | load |")
print("|---|---|---|---|---|---|---|")
for n in (256, 768, 1536, 4096):
    x = torch.randn(2 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    g = x.T @ x
    g.diagonal().add_(0.01 * g.diagonal().mean())
    factor = torch.linalg.cholesky(g)
    reps = max(1, int(2e9 / n ** 3))
    t = {}
    for name, fn in (("inv", lambda: torch.cholesky_inverse(factor)), ("solve", lambda: cholesky_to_inverse(factor))) * 2:
        s = time.perf_counter()
        for _ in range(reps):
            out = fn()
        t[name] = (time.perf_counter() - s) / reps      # (second of the two alternations kept)
    diff = float((torch.cholesky_inverse(factor) - cholesky_to_inverse(factor)).abs().max())
    print(f"| {n} | {t['inv']:.4f} | {t['solve']:.4f} | {t['solve'] / t['inv']:.2f}x | {diff:.1e} | "
          f"{torch.get_num_threads()} | {os.getloadavg()[0]:.1f} |", flush=True)
