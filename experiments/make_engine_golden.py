"""Digest of every engine consumer's results on tiny random models (all archs): the old behaviour that
tests/test_engine_golden.py holds the engine to.

    PYTHONPATH=. .venv/bin/python experiments/make_engine_golden.py [--out tests/data/engine_golden.json]

Written at commit 486be9c (before the engine's shared Grams, W·C products and pass savings); rerun it only
when a result is meant to change. Per case: a digest of every decoder linear's weight and bias (sum, sum of
squares, dot with a fixed random tensor), the numeric fields of the records, the units obs removed, unit
scores, and the hidden states leaving the last layer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import ALL_ARCHS, left_padded, lively, tiny_model, tokens  # noqa: E402
from prune_lab.core.adapter import layer_views, view_linears  # noqa: E402
from prune_lab.engine import Engine, walk  # noqa: E402
from prune_lab.core.plan import PruningPlan  # noqa: E402

ARCH_PLANS = {  # a GQA group (OPT: a head) of layers 0 and 2, MLP channels of every layer
    "attn": {0: [1], 2: [0]},
    "mlp": {0: [0, 5, 17], 1: list(range(0, 48, 3)), 2: [3, 4, 40]},
}


def batches():
    a, mask_a = left_padded(tokens(2, 24, seed=1), [0, 7])
    b = tokens(2, 24, seed=2)
    c = tokens(2, 24, seed=3)
    return [{"input_ids": a, "attention_mask": mask_a}, {"input_ids": b, "attention_mask": torch.ones_like(b)},
            {"input_ids": c, "attention_mask": torch.ones_like(c)}]


def digest(t: torch.Tensor) -> list[float]:
    t = t.detach().double().reshape(-1)
    probe = torch.randn(t.numel(), generator=torch.Generator().manual_seed(t.numel()), dtype=torch.float64)
    return [float(t.sum()), float(t.square().sum()), float(t @ probe), t.numel()]


def weights(model) -> dict:
    out = {}
    for v in layer_views(model):
        for p, lin in view_linears(v).items():
            out[f"{v.index}.{p}.weight"] = digest(lin.weight)
            if lin.bias is not None:
                out[f"{v.index}.{p}.bias"] = digest(lin.bias)
    return out


KEPT = ("rel_error", "zeros", "avg_bits", "err_before", "err_after")


def numbers(records) -> dict:
    """The result fields of the records (KEPT), by path."""
    flat = {}

    def visit(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{key}.{i}")
        elif isinstance(node, float) and key.endswith(KEPT):
            flat[key] = node
    visit(records, "")
    return flat


def unstructured_cases():
    from prune_lab.method import Magnitude, SparseGPT, Wanda
    from prune_lab.quant import Mixed, Uniform
    return {
        "sparsegpt": lambda: SparseGPT(sparsity=0.5, blocksize=16),
        "sparsegpt_sym": lambda: SparseGPT(sparsity=0.5, blocksize=16, asymmetric=0.0, residual=False),
        "sparsegpt_24_seq": lambda: SparseGPT(prune_n=2, prune_m=4, blocksize=16, true_sequential=True),
        "gptq4": lambda: SparseGPT(sparsity=0.0, blocksize=16).with_quant(Uniform(4, group_size=16)),
        "sparsegpt_mixed": lambda: SparseGPT(sparsity=0.25, blocksize=16).with_quant(Mixed(target_avg_bits=4.0)),
        "wanda": lambda: Wanda(sparsity=0.5),
        "wanda_gptq": lambda: Wanda(sparsity=0.5).with_quant(Uniform(4)),
        "magnitude": lambda: Magnitude(prune_n=2, prune_m=4),
    }


def run_case(arch: str, name: str) -> dict:
    from prune_lab.importance import Flap, ObsError
    from prune_lab.reconstruct import Reconstruct
    model = lively(tiny_model(arch, attn_implementation="eager"))
    cases = unstructured_cases()
    out: dict = {}
    cpu = Engine("cpu", progress=False)
    if name in cases:
        records, hidden = walk(model, batches(), cases[name](), progress=False, return_hidden=True)
        out["records"] = numbers([r["stages"] for r in records])
        out["hidden"] = [digest(h) for h in hidden]
    elif name.startswith("reconstruct"):
        _, mode, bias = name.split("_")
        plan = PruningPlan(attn=ARCH_PLANS["attn"], mlp=ARCH_PLANS["mlp"])
        final, rows = Reconstruct(mode, damp=0.01, fit_bias=bias == "bias")(model, plan, batches(), cpu)
        out["records"] = numbers(rows)
        out["removed"] = {"attn": {str(k): v for k, v in final.attn.items()},
                          "mlp": {str(k): v for k, v in final.mlp.items()}}
    elif name in ("importance_obs", "importance_obs_fine", "flap"):
        imp = Flap(cpu) if name == "flap" else ObsError(weighted=True, chunks=1000 if name.endswith("fine") else 64,
                                                        engine=cpu)
        scores = imp(model, [b["input_ids"] for b in batches()[1:]])
        out["scores"] = {f"{kind}.{i}": [float(x) for x in s]
                         for kind in ("attn", "mlp") for i, s in enumerate(getattr(scores, kind))}
    out["weights"] = weights(model)
    return out


def rounded(node):
    """Floats to 9 significant digits (the file stays small; the test's tolerances are far wider)."""
    if isinstance(node, dict):
        return {k: rounded(v) for k, v in node.items()}
    if isinstance(node, list):
        return [rounded(v) for v in node]
    return float(f"{node:.9g}") if isinstance(node, float) else node


CASES = [*unstructured_cases(), "reconstruct_obs_nobias", "reconstruct_obs_bias", "reconstruct_lstsq_nobias",
         "reconstruct_bias_bias", "importance_obs", "importance_obs_fine", "flap"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "engine_golden.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    golden = {f"{arch}/{name}": run_case(arch, name) for arch in ALL_ARCHS for name in CASES}
    Path(args.out).write_text(json.dumps(rounded(golden), separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{args.out}: {len(golden)} cases")


if __name__ == "__main__":
    main()
