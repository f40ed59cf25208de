"""Where the Taylor hooks' time goes on CPU: the per-weight work on one decoder layer, op by op.

    python experiments/bench_fold.py --shape 1b --out experiments/results/lean_grad_fold.md

One decoder layer of the shape (bf16 weights and gradients, fp32 sums), 1 thread, fastest of
--repeats passes over the layer's 7 matrices. Whole-tensor ops (the hooks before this change)
against the row blocks prune_lab.gradients uses on CPU (CPU_BLOCK elements at a time).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_lean_grad import SHAPES  # noqa: E402

from prune_lab.importance import gradients  # noqa: E402


def layer(shape: dict, dtype: torch.dtype):
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    dims = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    gen = torch.Generator().manual_seed(0)
    theta = {n: torch.randn(d, generator=gen).to(dtype) for n, d in dims.items()}
    grad = {n: (torch.randn(d, generator=gen) * 1e-3).to(dtype) for n, d in dims.items()}
    return theta, grad, {n: torch.zeros(d) for n, d in dims.items()}


def blocked(rows_of, fn):
    def run(n):
        for r in rows_of(n):
            fn(n, r)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    theta, grad, acc = layer(SHAPES[args.shape], getattr(torch, args.dtype))
    whole = lambda n: [slice(None)]                                                # noqa: E731
    rows = lambda n: gradients.row_blocks(acc[n])                                  # noqa: E731
    add = lambda n, r: acc[n][r].add_(grad[n][r])                                  # noqa: E731
    cast = lambda n, r: theta[n][r].to(torch.float32, copy=True)                   # noqa: E731
    square = lambda n, r: theta[n][r].to(torch.float32, copy=True).mul_(grad[n][r]).square_().sum(1)  # noqa: E731
    final = lambda n, r: theta[n][r].to(torch.float32, copy=True).mul_(acc[n][r]).abs_().sum(1)  # noqa: E731
    ops = {"grad sum: acc += g (fp32 += bf16), whole tensor": blocked(whole, add),
           "θ → fp32 copy, whole tensor": blocked(whole, cast),
           "(θ·g)² row sums in fp32, whole tensor": blocked(whole, square),
           "θ·g in bf16 (no fp32 temporary), whole tensor": lambda n: theta[n] * grad[n],
           f"grad sum, row blocks of {gradients.CPU_BLOCK} elements": blocked(rows, add),
           f"(θ·g)² row sums, row blocks of {gradients.CPU_BLOCK} elements": blocked(rows, square),
           "final |θ·Σg| row sums (once per run), whole tensor": blocked(whole, final),
           f"final |θ·Σg| row sums, row blocks of {gradients.CPU_BLOCK} elements": blocked(rows, final)}
    load = os.getloadavg()
    n_params = sum(t.numel() for t in theta.values())
    lines = [f"# Taylor hook work per decoder layer: {args.shape} shape, {args.dtype}, CPU, 1 thread", "",
             f"`{' '.join(sys.argv)}` — {n_params / 1e6:.1f} M weights per layer; fastest of {args.repeats}; "
             f"load average {load[0]:.1f}.", "", "| op | ms per layer | ns per weight |", "|---|---|---|"]
    for name, op in ops.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for n in theta:
                op(n)
            times.append(time.perf_counter() - start)
        lines.append(f"| {name} | {min(times) * 1e3:.0f} | {min(times) / n_params * 1e9:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
