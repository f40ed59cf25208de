"""Measurement (not a test): the lstsq refit's relative output error against reconstruct.damp, the bound
behind `reconstruct.damp must be in (0, 1)`.

    .venv/bin/python experiments/reconstruct_damp.py

lab-llama, one KV group and every fourth MLP channel removed in every layer, 4 batches of 8 x 128 random
tokens (seeds 0-3), CPU. Prints per damp the mean relative output error of o_proj/down_proj before and
after the refit (before differs with damp: the pruned path carries the earlier layers' refits) and the
number of refits that ended worse than no refit. The ridge pulls the refit towards 0, so a large damp
is worse than reconstruct=none.
"""
from __future__ import annotations

import copy

import torch

from prune_lab.core.plan import PruningPlan
from prune_lab.engine import Engine
from prune_lab.model import EmbeddedModel
from prune_lab.reconstruct.base import PlanRefit


def main() -> None:
    dense = EmbeddedModel(device="cpu").load()[0]
    gen = [torch.Generator().manual_seed(i) for i in range(4)]
    batches = [torch.randint(0, 8192, (8, 128), generator=g) for g in gen]
    n, width = dense.config.num_hidden_layers, dense.config.intermediate_size
    plan = PruningPlan({i: [0] for i in range(n)}, {i: list(range(0, width, 4)) for i in range(n)})
    print("damp   err before -> after   refits worse than none")
    for damp in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0):
        method = PlanRefit(plan, "lstsq", damp, fit_bias=False, obs_block=0, residual=True)
        Engine(device="cpu", progress=False).walk(copy.deepcopy(dense), batches, method)
        rows = method.rows
        before, after = (sum(r[k] for r in rows) / len(rows) for k in ("err_before", "err_after"))
        worse = sum(r["err_after"] > r["err_before"] for r in rows)
        print(f"{damp:<6} {before:.4f} -> {after:.4f}      {worse} / {len(rows)}")


if __name__ == "__main__":
    main()
