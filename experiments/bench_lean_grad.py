"""Memory and time of Taylor scoring: before this change, streaming (default) and lean mode.

    flock /tmp/prune_lab_big.lock python experiments/bench_lean_grad.py --shape 1b --tokens 256 --batch-size 4 \
        --modes bare,default_whole,default,lean --repeats 1 --bare-after
    python experiments/bench_lean_grad.py --shape llama3_8b --tokens 2048 --batches 4   # on a GPU

Every (mode, tokens) cell runs in a fresh process, so CPU peak RSS (ru_maxrss) is that cell's own;
on CUDA the peak is torch.cuda.max_memory_allocated. Modes:
  bare     one forward+backward per batch, decoder-linear grads dropped (the floor to compare with)
  before   the pre-change loop: backward, then grad_sum += p.grad.float() and (θ·g)² per unit
  default  importance=taylor_2nd (gradients folded by post-accumulate-grad hooks, sums on device)
  default_whole  the same hooks on whole tensors (before the CPU row blocks of prune_lab.gradients)
  lean     + importance.offload=true importance.gradient_checkpointing=true
`--profile` also writes a per-phase breakdown of `before` and `default` on the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from prune_lab.importance import gradients  # noqa: E402
from prune_lab.core.adapter import layer_views  # noqa: E402
from prune_lab.importance import Taylor  # noqa: E402
from prune_lab.importance.units import add_into, reduce_to_units  # noqa: E402

SHAPES = {
    "mid": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),                   # TinyLlama-1.1B
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}
MODES = ("bare", "before", "default_whole", "default", "lean")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(shape: str, dtype: torch.dtype, layers: int | None = None):
    config = AutoConfig.for_model("llama", **{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_params(model):
    return [p for v in layer_views(model) for lin in (v.attn.q, v.attn.k, v.attn.v, v.attn.o,
                                                      v.mlp.gate, v.mlp.up, v.mlp.down)
            for p in lin.parameters()]


def set_trainable(model, params):
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def bare(model, batches, phases):
    set_trainable(model, decoder_params(model))
    for b in batches:
        with phase(phases, "forward"):
            loss = model(b, labels=b, use_cache=False).loss
        with phase(phases, "backward"):
            loss.backward()
        model.zero_grad(set_to_none=True)


def before(model, batches, phases):
    """The scoring loop as it was before the streaming hooks (taylor_2nd), phase by phase."""
    views = layer_views(model)
    params = decoder_params(model)
    set_trainable(model, params)
    with phase(phases, "allocate fp32 sums"):
        grad_sum = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    fisher = None
    for b in batches:
        with phase(phases, "forward"):
            loss = model(b, labels=b).loss
        with phase(phases, "backward"):
            loss.backward()
        with torch.no_grad():
            with phase(phases, "grad_sum += grad.float()"):
                for p in params:
                    grad_sum[p] += p.grad.float()
            with phase(phases, "(θ·g)² per unit"):
                fisher = add_into(fisher, reduce_to_units(
                    views, lambda term: (term.param.float() * term.param.grad.float()) ** 2))
        model.zero_grad(set_to_none=True)
    with torch.no_grad(), phase(phases, "final |θ·ḡ| per unit"):
        reduce_to_units(views, lambda term: (term.param.float() * grad_sum[term.param] / len(batches)).abs())


class phase:
    def __init__(self, table, name):
        self.table, self.name = table, name

    def __enter__(self):
        sync()
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        sync()
        self.table[self.name] = self.table.get(self.name, 0.0) + time.perf_counter() - self.t


def streaming(options):
    """importance=taylor_2nd; the hooks' fold and the final per-weight pass timed apart (no device
    sync inside the hooks: on a GPU their share is only the host side)."""
    def run(model, batches, phases):
        fold, final = gradients.GradientStatistics._fold, gradients.GradientStatistics.scores

        def timed_fold(self, p, **kw):
            start = time.perf_counter()
            fold(self, p, **kw)
            phases["hooks: fold grads (+(θ·g)² per unit)"] = \
                phases.get("hooks: fold grads (+(θ·g)² per unit)", 0.0) + time.perf_counter() - start

        def timed_final(self, n):
            with phase(phases, "final |θ·Σg| per unit"):
                return final(self, n)
        gradients.GradientStatistics._fold, gradients.GradientStatistics.scores = timed_fold, timed_final
        try:
            with phase(phases, "score, total"):
                Taylor(second_order=True, **options)(model, batches)
        finally:
            gradients.GradientStatistics._fold, gradients.GradientStatistics.scores = fold, final
        phases["forward+backward (the rest)"] = phases["score, total"] - sum(
            v for k, v in phases.items() if k.startswith(("hooks", "final")))
    return run


def whole_tensors(run):
    def patched(model, batches, phases):
        block, gradients.CPU_BLOCK = gradients.CPU_BLOCK, 2**62     # one block per tensor
        try:
            run(model, batches, phases)
        finally:
            gradients.CPU_BLOCK = block
    return patched


RUNNERS = {"bare": bare, "before": before, "default": streaming({}), "default_whole": whole_tensors(streaming({})),
           "lean": streaming({"offload": True, "gradient_checkpointing": True})}


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, dtype, args.layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (args.batch_size, args.tokens), generator=gen).to(device())
               for _ in range(args.batches)]
    with torch.no_grad():                           # warm-up kernels without growing the peak
        model(batches[0][:, :8], use_cache=False)
    if torch.cuda.is_available():
        bare(model, batches[:1], {})
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_bytes()
    runs = []
    for _ in range(args.repeats):                   # the same mode again: same peak, less timing noise
        phases: dict = {}
        start = time.perf_counter()
        RUNNERS[args.mode](model, batches, phases)
        sync()
        runs.append((time.perf_counter() - start, phases))
    seconds, phases = min(runs, key=lambda r: r[0])
    peak = peak_bytes()
    bare_seconds = None
    if args.mode != "bare" and args.bare_after:      # the reference in the same process, after the peak is read
        bare_seconds = min(timed(bare, model, batches) for _ in range(args.repeats))
    return {"mode": args.mode, "tokens": args.tokens, "seconds": seconds, "bare_seconds": bare_seconds,
            "peak_gib": peak / 2**30, "peak_after_build_gib": rss_before / 2**30,
            "weights_gib": weights / 2**30, "phases": phases}


def timed(run, model, batches) -> float:
    start = time.perf_counter()
    run(model, batches, {})
    sync()
    return time.perf_counter() - start


def cell(args, mode: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--tokens", str(tokens),
           "--shape", args.shape, "--batches", str(args.batches), "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--bare-after"] if args.bare_after else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [""])[-1]
        result = {"mode": mode, "tokens": tokens, "error": f"exit {out.returncode} {last}".strip()}
        print(json.dumps(result), flush=True)
        return result
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def report(args, results, profile) -> str:
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (2 cores), peak RSS"
    depth = f" with {args.layers} layers" if args.layers else ""
    lines = [f"# Taylor scoring memory: {args.shape} Llama shape{depth}, {args.dtype}, {where}", "",
             f"`{' '.join(sys.argv)}` — {args.batches} calibration batches of {args.batch_size}×tokens, taylor_2nd; "
             f"time = fastest of {args.repeats} runs after a forward warm-up; load average {args.load} at the start."
             + (" Last column: bare fwd+bwd timed in the same process right after the mode (its peak read "
                "before)." if args.bare_after else ""), "",
             "| tokens/batch | mode | peak (GiB) | time (s) | time / bare fwd+bwd |"
             + (" time / bare (same process) |" if args.bare_after else ""),
             "|---|---|---|---|---|" + ("---|" if args.bare_after else "")]
    for tokens in args.token_list:
        base = next((r for r in results if r["mode"] == "bare" and r["tokens"] == tokens and "error" not in r),
                    None)
        for r in (r for r in results if r["tokens"] == tokens):
            if "error" in r:
                lines.append(f"| {tokens} | {r['mode']} | failed: {r['error'][:80]} | | |")
                continue
            rel = f"{r['seconds'] / base['seconds']:.2f}×" if base else "n/a"
            same = (f" {r['seconds'] / r['bare_seconds']:.2f}× ({r['bare_seconds']:.1f} s) |"
                    if r.get("bare_seconds") else " |" if args.bare_after else "")
            lines.append(f"| {tokens} | {r['mode']} | {r['peak_gib']:.2f} | {r['seconds']:.1f} | {rel} |{same}")
    done = [r for r in results if "error" not in r]
    if done:
        lines += ["", f"Weights alone: {done[0]['weights_gib']:.2f} GiB; process peak after building the "
                      f"model, before scoring: {done[0]['peak_after_build_gib']:.2f} GiB."]
    if profile:
        lines += ["", "## Where the time goes (seconds per phase, summed over batches)", ""]
        for r in profile:
            total = r["seconds"]
            lines += [f"**{r['mode']}** ({r['tokens']} tokens/batch, {r['seconds']:.2f} s):", "",
                      "| phase | s | share |", "|---|---|---|"]
            lines += [f"| {k} | {v:.2f} | {v / total:.0%} |" for k, v in r["phases"].items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="128,512", help="tokens per calibration batch (comma list)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per calibration batch")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    ap.add_argument("--bare-after", action="store_true",
                    help="also time bare fwd+bwd in each mode's process (a same-process ratio)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest is reported")
    ap.add_argument("--profile", default=None, help="also profile phases on this shape (e.g. mid)")
    ap.add_argument("--phases", action="store_true", help="per-phase tables of the cells above too")
    ap.add_argument("--out", default="experiments/results/lean_grad.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: a shared machine's oversubscribed OpenMP barriers cost 10x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        args.tokens = int(args.tokens)
        print(json.dumps(worker(args)))
        return
    args.token_list = [int(t) for t in args.tokens.split(",")]
    args.load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    results = [cell(args, m, t) for t in args.token_list for m in args.modes.split(",")]
    profile = [r for r in results if args.phases and "error" not in r]
    if args.profile:
        shape = args.shape
        args.shape = args.profile
        profile += [cell(args, m, args.token_list[-1]) for m in ("bare", "before", "default")]
        args.shape = shape
    text = report(args, results, [p for p in profile if "error" not in p])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
