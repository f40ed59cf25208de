"""Issue 18, item 5 (not a test): the GPU rows, one script for one device run of <= 10 minutes.

    PYTHONPATH=. python experiments/gpu_engine.py            # an H200 (or any CUDA device with >= 40 GiB)
    PYTHONPATH=. python experiments/gpu_engine.py --tiny     # CPU smoke run of the same code, tiny shape

Model: random weights of the Llama-3-8B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336,
vocab 128256), bf16, built on the device. Rows (each with its seconds and its peak device memory,
torch.cuda.max_memory_allocated after a reset):
  1. bare forward+backward over the Taylor batches (the reference: plain .backward(), bf16 .grad);
  2. importance=taylor with importance.offload=true (fp32 gradient sums in CPU memory), same batches,
     and the same with gradient_checkpointing=true; targets: peak <= 24 GiB, time <= 1.3x row 1;
  3. reconstruct=obs (default obs_block=0) of a uniform 25% plan (2 of 8 KV groups + 3584 channels per
     layer) over 128 x 2048 calibration tokens with engine.offload=true (the model in CPU memory, one
     layer on the device at a time); target: minutes, peak <= 24 GiB;
  4. SparseGPT 50% (the CLI's defaults) over the same tokens with engine.offload=true; same targets.
Prints a markdown table (and writes it to --out when given). A phase is skipped, and says so, once
--budget seconds have passed (the device run has a hard limit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, vocab_size=128256)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
            intermediate_size=256, vocab_size=512)
GiB = 2 ** 30


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama", **shape, tie_word_embeddings=False, max_position_embeddings=8192,
                                  rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:                                     # random init on the device itself (seconds, not minutes)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Meter:
    """Seconds and peak device memory of a phase."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / GiB
        else:
            self.peak = None
        self.seconds = time.perf_counter() - self.t0


def bare_forward_backward(model, batches) -> None:
    from prune_lab.core.adapter import layer_views, view_linears
    params = [lin.weight for v in layer_views(model) for lin in view_linears(v).values()]
    for p in params:
        p.requires_grad_(True)
    try:
        for b in batches:
            b = b.to(model.device)
            model(b, labels=b, use_cache=False).loss.backward()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def uniform_plan(model, ratio: float):
    from prune_lab.core.adapter import layer_views
    from prune_lab.core.plan import PruningPlan
    views = layer_views(model)
    groups = max(1, round(views[0].attn.num_kv_heads * ratio))
    channels = round(views[0].mlp.width * ratio)
    return PruningPlan(attn={v.index: list(range(groups)) for v in views},
                       mlp={v.index: list(range(0, channels * 2, 2)) for v in views})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (a smoke run of this script)")
    ap.add_argument("--taylor-batches", type=int, default=8, help="Taylor/bare batches of 1 x seq tokens")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows for the engine passes")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="engine calibration batch size")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds after which a phase is skipped")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.tiny:
        shape, device, dtype = TINY, torch.device("cpu"), torch.float32
        args.taylor_batches, args.samples, args.seq, args.batch_size = 2, 8, 64, 4
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for the CPU smoke run")
        shape, device, dtype = LLAMA3_8B, torch.device("cuda"), torch.bfloat16
    from prune_lab.engine import Engine
    from prune_lab.importance import Taylor
    from prune_lab.method import SparseGPT
    from prune_lab.reconstruct import Reconstruct

    gen = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, shape["vocab_size"], (n, args.seq), generator=gen)  # noqa: E731
    taylor_batches = [tokens(1) for _ in range(args.taylor_batches)]
    calibration = list(tokens(args.samples).split(args.batch_size))
    rows: list[tuple[str, float | None, float | None, str]] = []

    def phase(name: str, fn, note: str = "") -> None:
        left = args.budget - (time.perf_counter() - t_start)
        if left <= 0:
            rows.append((name, None, None, f"skipped: the {args.budget:.0f} s budget was spent"))
            return
        try:
            with Meter(device) as m:
                fn()
        except torch.OutOfMemoryError as e:          # recorded, and the next phases still run
            rows.append((name, None, None, f"out of memory: {str(e).splitlines()[0][:120]}"))
            torch.cuda.empty_cache()
            return
        rows.append((name, m.seconds, m.peak, note))
        print(f"{name}: {m.seconds:.1f} s, peak {m.peak if m.peak is None else round(m.peak, 2)} GiB", flush=True)

    with Meter(device) as m:
        model = build(shape, device, dtype)
    rows.append(("build the random model on the device", m.seconds, m.peak, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}"))
    n_tok = f"{args.taylor_batches} x 1 x {args.seq} tokens"
    bare_forward_backward(model, [taylor_batches[0][:, :128]])      # warm-up (kernels, allocator), not timed
    phase("bare forward+backward (.grad in the model dtype)", lambda: bare_forward_backward(model, taylor_batches), n_tok)
    phase("importance=taylor, offload=true", lambda: Taylor(offload=True)(model, taylor_batches), n_tok)
    phase("importance=taylor, offload=true, gradient_checkpointing=true",
          lambda: Taylor(offload=True, gradient_checkpointing=True)(model, taylor_batches), n_tok)
    with Meter(device) as m:
        model.to("cpu")                               # engine.offload=true: the model lives in CPU memory
    engine = Engine(device=str(device), offload=True, progress=False)
    plan = uniform_plan(model, 0.25)
    cal = f"{args.samples} x {args.seq} tokens, batches of {args.batch_size}"
    work = {}
    phase("reconstruct=obs pass (uniform 25%), engine.offload=true",
          lambda: work.update(obs=Reconstruct("obs")(model, plan, calibration, engine)), cal)
    phase("SparseGPT 50% pass, engine.offload=true",
          lambda: work.update(sgpt=engine.walk(model, calibration, SparseGPT(sparsity=0.5))), cal)
    if "obs" in work:
        rows_obs = work["obs"][1]
        rows.append(("  obs: mean err_after (o_proj, down_proj)", None, None,
                     f"{sum(r['err_after'] for r in rows_obs) / max(len(rows_obs), 1):.4f}"))
    base = next((r for r in rows if r[0].startswith("bare")), None)
    lines = [f"### experiments/gpu_engine.py{' --tiny' if args.tiny else ''}: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
             f"torch {torch.__version__}\n", "| phase | seconds | x bare fwd+bwd | peak device GiB | note |",
             "|---|---|---|---|---|"]
    for name, secs, peak, note in rows:
        ratio = f"{secs / base[1]:.2f}x" if secs is not None and base and base[1] and "taylor" in name else ""
        lines.append(f"| {name} | {'' if secs is None else f'{secs:.1f}'} | {ratio} | "
                     f"{'' if peak is None else f'{peak:.2f}'} | {note} |")
    lines.append(f"\ntotal {time.perf_counter() - t_start:.0f} s, OMP threads {torch.get_num_threads()}, "
                 f"load {os.getloadavg()[0]:.1f}")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
