"""Measurement (not a test): how far apart verify=true's two models are, per dtype, vs the tolerance.

    .venv/bin/python experiments/verify_tolerance.py [--out experiments/results/verify_tolerance.md]

For lab-llama and tiny random models of every family: remove KV group 0 and every third MLP channel
in each layer (and layer 1 whole), then compare the pruned model's logits with the dense model's
with those units zeroed, on 2 x 64 random tokens, in float32, float16 and bfloat16. Prints and
writes the max |logit difference|, the tolerance prune_lab.verify applies, and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import ARCHS, tiny_model  # noqa: E402
from prune_lab.model import EmbeddedModel  # noqa: E402
from prune_lab.core.plan import PruningPlan  # noqa: E402
from prune_lab.core.executor import apply_plan  # noqa: E402
from prune_lab.core.verify import verify_pruning  # noqa: E402


def rows(model, name: str):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pruned = copy.deepcopy(model).to(dtype)
        n, width = len(pruned.model.layers), pruned.config.intermediate_size
        plan = PruningPlan({i: [0] for i in range(n)}, {i: list(range(0, width, 3)) for i in range(n)},
                           [1] if n > 2 else [], 0)
        dense = copy.deepcopy(pruned)
        apply_plan(pruned, plan)
        tokens = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(0))
        v = verify_pruning(pruned, dense, plan, tokens)
        yield name, v["dtype"], v["max_logit_diff"], v["tolerance"], v["max_logit_diff"] / v["tolerance"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "verify_tolerance.md"))
    args = parser.parse_args()
    models = [(a, tiny_model(a, layers=3)) for a in ARCHS] + [("lab-llama", EmbeddedModel(device="cpu").load()[0])]
    lines = ["| model | dtype | max abs logit diff | tolerance | diff / tolerance |", "|---|---|---|---|---|"]
    for name, model in models:
        for r in rows(model, name):
            lines.append(f"| {r[0]} | {r[1]} | {r[2]:.3g} | {r[3]:.3g} | {r[4]:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text("Made by `python experiments/verify_tolerance.py` (CPU).\n\n" + text)


if __name__ == "__main__":
    main()
