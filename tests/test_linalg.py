"""core.linalg: the SPD inverse from a Cholesky factor equals torch.cholesky_inverse (the slow LAPACK
potri path it replaces in the engine) to round-off, and is exactly symmetric."""
from __future__ import annotations

import pytest
import torch

from prune_lab.core.linalg import cholesky_to_inverse


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("n", [1, 7, 96])
def test_inverse_from_cholesky_equals_cholesky_inverse(n, dtype, tol):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3 * n + 2, generator=g, dtype=torch.float64)
    a = (x @ x.T + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype)
    factor = torch.linalg.cholesky(a)
    inv = cholesky_to_inverse(factor)
    ref = torch.cholesky_inverse(factor)
    assert inv.dtype == dtype and inv.shape == (n, n)
    assert torch.equal(inv, inv.T)
    assert (inv - ref).abs().max() <= tol * ref.abs().max()
    assert torch.allclose(inv.double() @ a.double(), torch.eye(n, dtype=torch.float64), atol=50 * tol)
