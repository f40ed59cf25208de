"""Dense vs pruned (25%) prefill and decode speed, with and without hardware-aligned widths.

    python experiments/bench_efficiency.py --model lab-llama
    flock /tmp/prune_lab_big.lock python experiments/bench_efficiency.py --model llama3_1b --dtype bfloat16 \\
        --prompt-len 64 --gen-tokens 16 --batch-sizes 1,4 --variants dense,global,global_m64,global_m128,uniform_shape

Every variant stays in memory and the variants are measured in interleaved rounds (one timed run
of each per round, after a warm-up round), so a slow spell of a shared machine hits them all; the
table gives the median over rounds. Timing is prune_lab.eval.efficiency (device sync, KV-cache
decode loop, last-position logits). Plans come from magnitude scores: speed depends on the shapes,
not on which units go. Runs on CUDA when available.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from prune_lab.core.adapter import decoder_linear_params, layer_shapes, layer_views  # noqa: E402
from prune_lab.allocator import Global, UniformShape, align_plan  # noqa: E402
from prune_lab.eval.efficiency import efficiency  # noqa: E402
from prune_lab.importance import Magnitude  # noqa: E402
from prune_lab.model import EmbeddedModel  # noqa: E402
from prune_lab.core.executor import apply_plan  # noqa: E402

SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),     # TinyLlama-1.1B
          "llama3_1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)}   # Llama-3.2-1B
VARIANTS = {"dense": None, "global": (Global, 1), "global_m64": (Global, 64), "global_m128": (Global, 128),
            "uniform_shape": (UniformShape, 1), "uniform_shape_m128": (UniformShape, 128)}


def load(name: str, dtype: torch.dtype):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in SHAPES:
        config = AutoConfig.for_model("llama", **SHAPES[name], max_position_embeddings=2048)
        torch.manual_seed(0)
        with device:
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model, _ = EmbeddedModel(name=name, device=str(device), dtype=str(dtype).split(".")[-1]).load()
    return model


def variant(dense, name: str, ratio: float):
    if VARIANTS[name] is None:
        return dense, "—"
    cls, multiple_of = VARIANTS[name]
    # pruning leaves embeddings, final norm and LM head alone: every variant shares the dense ones
    outside = [p for n, p in dense.named_parameters() if ".layers." not in n]
    model = copy.deepcopy(dense, memo={id(p): p for p in outside})
    views = layer_views(model)
    scores = Magnitude()(model)
    plan = align_plan(cls(ratio=ratio, multiple_of=multiple_of)(scores, views), scores, views, multiple_of)
    apply_plan(model, plan)
    shapes = layer_shapes(model)
    widths = sorted({s["mlp_width"] for s in shapes})
    heads = sorted({s["q_heads"] for s in shapes})
    desc = (f"{len(shapes)} layers; MLP widths {_span(widths)}; q heads {_span(heads)}; "
            f"{1 - decoder_linear_params(model) / decoder_linear_params(dense):.1%} removed")
    return model, desc


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]} ({len(values)} distinct)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lab-llama", help="lab-llama or a random shape: " + ", ".join(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--variants", default="dense,global,global_m64,global_m128,uniform_shape,uniform_shape_m128")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: a shared machine's oversubscribed OpenMP barriers cost 10x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    load_start = os.getloadavg()
    dense = load(args.model, getattr(torch, args.dtype))
    models = {name: variant(dense, name, args.ratio) for name in args.variants.split(",")}
    measure = lambda m: efficiency(m, None, args.prompt_len, args.gen_tokens, batch_sizes,   # noqa: E731
                                   repeats=1, warmup=0)
    for model, _ in models.values():                            # warm-up round
        measure(model)
    rounds = {name: [] for name in models}
    for r in range(args.rounds):
        for name, (model, _) in models.items():
            rounds[name].append(measure(model))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in rounds[name])

    device = rounds[next(iter(rounds))][0]["efficiency/device"]
    lines = [f"# Efficiency: {args.model}, {args.dtype}, {device}, ratio {args.ratio}", "",
             f"`{' '.join(sys.argv)}`", "",
             f"Prompt {args.prompt_len} random tokens, {args.gen_tokens} greedy decode steps over the KV cache; "
             f"median of {args.rounds} interleaved rounds after a warm-up round; {args.threads} CPU thread(s) "
             f"(torch.set_num_threads); load average (1/5/15 min) {_load(load_start)} at the start, "
             f"{_load(os.getloadavg())} at the end; process peak RSS "
             f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB. Speed-up = pruned / dense "
             f"tokens/s; prefill ms = time to the first token of the whole batch.", "",
             "| variant | shape | " + " | ".join(
                 f"prefill tok/s bs{b} (×) | prefill ms bs{b} | decode tok/s bs{b} (×) | decode ms/step bs{b}"
                 for b in batch_sizes) + " |", "|---|---|" + "---|---|---|---|" * len(batch_sizes)]
    base = "dense" if "dense" in models else None
    for name, (_, desc) in models.items():
        cells = []
        for b in batch_sizes:
            pre = med(name, f"efficiency/bs{b}/prefill_tokens_per_s")
            dec = med(name, f"efficiency/bs{b}/decode_tokens_per_s")
            rel = (lambda v, k: f" ({v / med(base, k):.2f}×)" if base else "")
            cells += [f"{pre:,.0f}{rel(pre, f'efficiency/bs{b}/prefill_tokens_per_s')}",
                      f"{med(name, f'efficiency/bs{b}/prefill_latency_ms'):,.0f}",
                      f"{dec:,.1f}{rel(dec, f'efficiency/bs{b}/decode_tokens_per_s')}",
                      f"{med(name, f'efficiency/bs{b}/decode_ms_per_token'):.1f}"]
        lines.append(f"| {name} | {desc} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
