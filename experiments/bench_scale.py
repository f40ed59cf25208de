"""Scale benchmark: score, allocate and prune a Llama-3-8B-shaped model (random weights) on a GPU.

    python experiments/bench_scale.py --out experiments/results/bench_scale.md

Measures wall time and peak GPU memory per stage and prefill/decode throughput before and after a
25% global prune. Random weights are fine: cost depends on shapes, not values. Needs only torch and
transformers (no Hydra), so it runs on a bare GPU image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prune_lab.core.adapter import decoder_linear_params, layer_views  # noqa: E402
from prune_lab.allocator import Global  # noqa: E402
from prune_lab.eval.efficiency import measure  # noqa: E402
from prune_lab.importance import Taylor, Wanda  # noqa: E402
from prune_lab.core.executor import apply_plan  # noqa: E402

SHAPES = {  # Llama-3-8B / Qwen2.5-7B as in their hub configs
    "llama3_8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2_5_7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return out, time.perf_counter() - t, peak


@torch.no_grad()
def throughput(model, seq_len: int, gen: int, batch: int = 1) -> tuple[float, float]:
    """Prefill and decode tokens/s by prune_lab's efficiency timer (device sync, warm-up, KV-cache
    decode loop, median of 5; the earlier version timed one cold `generate` minus one prefill)."""
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=model.device)
    t = measure(model, x, gen, repeats=5, warmup=1)
    return t["prefill_tokens_per_s"], t["decode_tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3_8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--out", default="experiments/results/bench_scale.md")
    args = ap.parse_args()

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with device:
        model, t_build, _ = timed(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16))
    model.eval()
    batches = [torch.randint(0, config.vocab_size, (1, args.seq_len)) for _ in range(args.batches)]
    rows = [("build (random init)", t_build, float("nan"))]
    dense = decoder_linear_params(model)
    tp_dense = throughput(model, 512, 64)

    _, t, peak = timed(lambda: Wanda()(model, batches))
    rows.append((f"wanda scores ({args.batches}x{args.seq_len} tokens)", t, peak))
    scores, t, peak = timed(lambda: Taylor(second_order=True)(model, batches))
    rows.append((f"taylor_2nd scores ({args.batches}x{args.seq_len} tokens)", t, peak))
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    views = layer_views(model)
    allocator = Global(ratio=args.ratio)
    plan, t, _ = timed(lambda: allocator(scores, views))
    rows.append((f"global allocation ({len(allocator.table):,} units)", t, float("nan")))
    _, t, peak = timed(lambda: apply_plan(model, plan))
    rows.append(("apply plan (slice in place)", t, peak))
    pruned = decoder_linear_params(model)
    tp_pruned = throughput(model, 512, 64)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"# Scale benchmark: {args.shape} shape ({shape['num_hidden_layers']} layers), bf16, {gpu}", "",
             f"torch {torch.__version__}; ratio {args.ratio}: decoder linear params {dense/1e9:.2f}B -> "
             f"{pruned/1e9:.2f}B ({1 - pruned/dense:.1%} removed)", "",
             "| stage | wall time (s) | peak GPU memory (GiB) |", "|---|---|---|"]
    lines += [f"| {name} | {t:.2f} | {p:.1f} |" for name, t, p in rows]
    lines += ["", "| model | prefill tokens/s (1x512) | decode tokens/s (64 new) |", "|---|---|---|",
              f"| dense | {tp_dense[0]:,.0f} | {tp_dense[1]:,.1f} |",
              f"| pruned | {tp_pruned[0]:,.0f} | {tp_pruned[1]:,.1f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
