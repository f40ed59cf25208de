"""Deployable speed in llama.cpp (llama-cpp-python) on CPU: dense vs pruned GGUF exports (issue 20, item 2).

    flock /tmp/prune_lab_heavy.lock .venv/bin/python experiments/gguf_speed.py [--models lab-llama,smollm2_135m]

Per model: dense, non-uniform global 25% (llama.cpp `deci`), `uniform_shape` 25% (`llama`) and global 50%
(`deci`), plans from magnitude scores (speed depends on the shapes, not on which units go), each exported
with output.export=gguf's writer in --gguf-type (f16). Every file is loaded once; then in --repeats
interleaved rounds (after a warm-up round) each variant runs a --prompt-len prefill (one llama_eval of the
whole prompt) and --gen-tokens single-token decode steps over its KV cache, batch 1; the table gives the
median tokens/s over rounds, the threads, the machine's load, and tokens/s per removed parameter (the
speed-up against the speed-up of ideal scaling with the remaining parameters). Writes
experiments/results/gguf_speed.md (or --out).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from prune_lab.allocator import Global, UniformShape  # noqa: E402
from prune_lab.artifacts.gguf_write import export_gguf  # noqa: E402
from prune_lab.core.adapter import decoder_linear_params, layer_shapes  # noqa: E402
from prune_lab.core.adapter import layer_views  # noqa: E402
from prune_lab.core.executor import apply_plan  # noqa: E402
from prune_lab.importance import Magnitude  # noqa: E402

VARIANTS = {"dense": None, "global 25%": (Global, 0.25), "uniform_shape 25%": (UniformShape, 0.25),
            "global 50%": (Global, 0.5)}


def load(name: str):
    if name == "lab-llama":
        from prune_lab.model import EmbeddedModel
        return EmbeddedModel(device="cpu").load()
    from conftest import compose_job
    from prune_lab.recipes.common import build
    return build(compose_job(f"model={name}", "model.device=cpu").model).load()


def variant(dense, spec):
    if spec is None:
        return dense
    cls, ratio = spec
    model = copy.deepcopy(dense)
    views = layer_views(model)
    scores = Magnitude()(model)
    apply_plan(model, cls(ratio=ratio)(scores, views))
    return model


def describe(model, dense) -> str:
    shapes = layer_shapes(model)
    kv, mlp = sorted({s["kv_heads"] for s in shapes}), sorted({s["mlp_width"] for s in shapes})
    span = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}"      # noqa: E731
    return f"{len(shapes)} layers, KV heads {span(kv)}, MLP {span(mlp)}"


def timed(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for i in range(gen):
        llm.eval([prompt[i % len(prompt)]])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def bench_model(name: str, args, tmp: Path) -> list[str]:
    import llama_cpp
    dense, tokenizer = load(name)
    files, params, desc = {}, {}, {}
    for label, spec in VARIANTS.items():
        model = variant(dense, spec)
        path = tmp / f"{name}-{len(files)}.gguf"
        info = export_gguf(model, tokenizer, path, args.gguf_type)
        files[label] = (path, info["architecture"], info["bytes"])
        params[label] = (sum(p.numel() for p in model.parameters()), decoder_linear_params(model))
        desc[label] = describe(model, dense)
        del model
    prompt = torch.randint(0, len(tokenizer), (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    llms = {label: llama_cpp.Llama(str(f[0]), n_ctx=args.prompt_len + args.gen_tokens + 8, n_batch=args.prompt_len,
                                   n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            for label, f in files.items()}
    runs = {label: [] for label in llms}
    load_before = os.getloadavg()
    for r in range(args.repeats + 1):
        for label, llm in llms.items():
            result = timed(llm, prompt, args.gen_tokens)
            if r:                                            # round 0 is the warm-up
                runs[label].append(result)
    load_after = os.getloadavg()
    for llm in llms.values():
        llm.close()
    med = {label: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for label, v in runs.items()}
    d_pre, d_dec = med["dense"]
    d_total = params["dense"][0]
    lines = [f"### {name} (GGUF {args.gguf_type}, {args.threads} threads, prompt {args.prompt_len}, "
             f"{args.gen_tokens} decode steps, median of {args.repeats} interleaved rounds; load average "
             f"{load_before[0]:.1f} → {load_after[0]:.1f})", "",
             "| variant | llama.cpp arch | shape | params (decoder removed) | file MB | prefill tok/s | decode tok/s "
             "| ideal × | prefill gain / ideal gain | decode gain / ideal gain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in llms:
        total, dec = params[label]
        removed = 1 - dec / params["dense"][1]
        ideal = d_total / total
        pre, dec_s = med[label]
        gain = lambda x, base: "–" if label == "dense" else f"{(x / base - 1) / (ideal - 1):.2f}"   # noqa: E731
        lines.append(f"| {label} | {files[label][1]} | {desc[label]} | {total / 1e6:.2f}M ({removed:.1%}) | "
                     f"{files[label][2] / 1e6:.1f} | {pre:,.0f} ({pre / d_pre:.2f}×) | {dec_s:,.1f} ({dec_s / d_dec:.2f}×) | "
                     f"{ideal:.2f} | {gain(pre, d_pre)} | {gain(dec_s, d_dec)} |")
    return lines + [""]


def main() -> None:
    import llama_cpp
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lab-llama,smollm2_135m")
    ap.add_argument("--gguf-type", default="f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "gguf_speed.md"))
    args = ap.parse_args()
    text = [f"# llama.cpp speed of pruned GGUF exports (llama-cpp-python {llama_cpp.__version__}, CPU, batch 1)", "",
            f"`{' '.join(['python experiments/gguf_speed.py', *sys.argv[1:]])}` on a {os.cpu_count()}-core machine "
            "shared with other jobs. ideal × = dense params / variant params (the speed-up if time scaled with "
            "the parameters); gain / ideal gain = (speed-up − 1) / (ideal − 1): 1 = every removed parameter "
            "turned into speed.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            text += bench_model(name, args, Path(tmp))
            print("\n".join(text), flush=True)
    Path(args.out).write_text("\n".join(text))


if __name__ == "__main__":
    main()
