"""Benchmark (not a test): the engine before (git revision --old, imported as a second package) and after
(this tree), side by side in ONE process; results as JSON lines in <work>/<row>.jsonl, `report` writes
experiments/results/engine_speed.md.

    PYTHONPATH=. OMP_NUM_THREADS=1 flock /tmp/prune_lab_heavy.lock .venv/bin/python experiments/bench_engine.py obs --threads 1
    PYTHONPATH=. OMP_NUM_THREADS=2 flock /tmp/prune_lab_heavy.lock .venv/bin/python experiments/bench_engine.py width --threads 2
    PYTHONPATH=. OMP_NUM_THREADS=1 flock /tmp/prune_lab_heavy.lock .venv/bin/python experiments/bench_engine.py sparsegpt  # (starts llm-compressor's venv)
    .venv/bin/python experiments/bench_engine.py report

obs: lab-llama, default calibration (64 x 256), `reconstruct=obs` (residual on) on two plans of fixed
counts (obs picks the units): the default job's 2944 MLP channels spread evenly (245 per layer, no KV
group, as its global 25% plan) and uniform 25% (1 of 4 KV groups + 192 channels per layer); old engine,
new (obs_block=0) and new exact greedy (obs_block=1), each timed against the mean of a calibration forward
of the dense model right before and right after it; rounds rotate the variants' order.
width: the refit's parts for one down_proj of MLP width N (random activations, hidden 512): Gram
accumulation on two streams (new: G + W₀·C + drift; old: G + C + D + drift) over ceil(N/2048) batches of
2048 tokens (T >= N, the calibration minimum), (G + λI)⁻¹, the OBS selection of N/4 channels (auto,
greedy, old) and the lstsq refit.
sparsegpt: in llm-compressor's venv (see compare_llmcompressor.py): lab-llama fp32, the CLI's method
settings, old engine, new engine and llm-compressor's oneshot back to back, PPL on all test windows.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "results" / "engine_speed.md"
OLD = "486be9c"


def this_tree() -> None:
    """`prune_lab` must be this tree's (the venv's editable install may point at another checkout)."""
    sys.path.insert(0, str(REPO))
    import prune_lab
    assert Path(prune_lab.__file__).resolve().parent == REPO / "prune_lab", (prune_lab.__file__, REPO)


def old_package(rev: str, work: Path):
    """prune_lab at git revision `rev`, importable as prune_lab_<rev> (git archive, relative imports)."""
    name, root = f"prune_lab_{rev}", work / "old"
    if not (root / name).exists():
        blob = subprocess.run(["git", "-C", str(REPO), "archive", rev, "prune_lab"], capture_output=True,
                              check=True).stdout
        tarfile.open(fileobj=io.BytesIO(blob)).extractall(root / "tmp", filter="data")
        (root / "tmp" / "prune_lab").rename(root / name)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


# modules that the house (3bc1b62) moved: name at the old revision -> name in this tree
MOVED = {"plan": "core.plan", "stats": "engine.stats", "refit": "reconstruct.refit"}


def sub(pkg, name):
    """Module `name` (named as at the old revision) of package `pkg`, this tree's new name for it."""
    if pkg.__name__ == "prune_lab":
        name = MOVED.get(name, name)
    return importlib.import_module(f"{pkg.__name__}.{name}")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def emit(work: Path, row: str, rec: dict) -> None:
    rec = {**rec, "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 1)}
    with open(work / f"{row}.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def lab_batches():
    from prune_lab.data import Calibration, TokenStreams, WikiVital
    from prune_lab.model import EmbeddedModel
    model, tok = EmbeddedModel(device="cpu").load()
    streams = TokenStreams(tok)
    return model, Calibration().batches(streams(WikiVital(), "train"), 0), streams(WikiVital(), "test")


def bench_obs(work: Path, rounds: int, samples: int, skip_old: bool = False) -> None:
    import prune_lab
    old = None if skip_old else old_package(OLD, work)
    model, batches, _ = lab_batches()
    batches = batches[: max(1, samples // 8)]
    plans = {"MLP only, 245 channels/layer (default job's count)": (0, 245),
             "uniform 25%: 1 KV group + 192 channels/layer": (1, 192)}
    variants = {"old": (old, {}), "new": (prune_lab, {}), "new obs_block=1": (prune_lab, {"obs_block": 1})}
    if skip_old:
        del variants["old"]

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b)
    forward()
    for r in range(rounds):
        for plan_name, (groups, channels) in plans.items():
            order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
            fwd = timed(forward)[0]
            for name in order:                    # a forward right before and right after each pass
                pkg, kw = variants[name]
                plan = sub(pkg, "plan").PruningPlan(attn={i: list(range(groups)) for i in range(12)} if groups else {},
                                                    mlp={i: list(range(channels)) for i in range(12)})
                m = copy.deepcopy(model)
                rec = sub(pkg, "reconstruct").Reconstruct("obs", **kw)
                secs, (_, rows) = timed(lambda: rec(m, plan, batches, sub(pkg, "engine").Engine("cpu", progress=False)))
                after = timed(forward)[0]
                emit(work, "obs", {"round": r, "plan": plan_name, "variant": name, "pass_s": secs,
                                   "forward_s": (fwd + after) / 2,
                                   "err_after": sum(x["err_after"] for x in rows) / len(rows)})
                fwd = after


def fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def merged(old_tables: str, new_lines: list[str]) -> str:
    """The tables after the marker: a table of this work dir replaces the one of the same heading, the others
    (measured from other work dirs) stay where they are."""
    def sections(text: str) -> dict[str, str]:
        return {s.split("\n", 1)[0]: "### " + s.strip("\n") for s in text.split("\n### ")[1:]}
    return "\n\n".join((sections("\n" + old_tables) | sections("\n" + "\n".join(new_lines))).values())


def report(work: Path) -> None:
    rows = lambda name: [json.loads(x) for x in (work / f"{name}.jsonl").read_text().splitlines()] \
        if (work / f"{name}.jsonl").exists() else []  # noqa: E731
    head, _, old_tables = (OUT.read_text() if OUT.exists() else "# Engine speed\n").partition("\n<!-- tables -->\n")
    lines: list[str] = []
    obs = rows("obs")
    for threads in sorted({r["threads"] for r in obs}):
        lines += [f"\n### reconstruct=obs pass / one calibration forward, lab-llama, {threads} thread(s)\n",
                  "| plan | variant | pass s (median) | forward s (median) | pass / forward (median of rounds) "
                  "| rounds | mean err_after | load |", "|---|---|---|---|---|---|---|---|"]
        sel = [r for r in obs if r["threads"] == threads]
        for plan in dict.fromkeys(r["plan"] for r in sel):
            for variant in dict.fromkeys(r["variant"] for r in sel):
                rs = [r for r in sel if r["plan"] == plan and r["variant"] == variant]
                med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
                ratio = statistics.median(r["pass_s"] / r["forward_s"] for r in rs)
                lines.append(f"| {plan} | {variant} | {med('pass_s'):.1f} | {med('forward_s'):.1f} | {ratio:.2f}x "
                             f"| {len(rs)} | {med('err_after'):.4f} | {med('load'):.1f} |")
    sm = rows("smollm2")
    if sm:
        lines += ["\n### reconstruct=obs pass on SmolLM2-135M, first layers / all layers, old and new side by side\n",
                  "| plan | layers | variant | pass s | s / layer | forward s | pass / forward | new / old | err_after "
                  "| threads | load |", "|---" * 11 + "|"]
        for r in sm:
            o = next((x for x in sm if x["variant"] == "old" and x["plan"] == r["plan"] and x["round"] == r["round"]
                      and x["threads"] == r["threads"]), None)
            lines.append(f"| {r['plan']} | {r['layers']} | {r['variant']} | {r['pass_s']:.1f} | "
                         f"{r['pass_s'] / r['layers']:.1f} | {r['forward_s']:.1f} | {r['pass_s'] / r['forward_s']:.2f}x | "
                         f"{'' if o is None else format(r['pass_s'] / o['pass_s'], '.2f') + 'x'} | "
                         f"{r['err_after']:.4f} | {r['threads']} | {r['load']} |")
    width = rows("width")
    if width:
        lines += ["\n### One down_proj of MLP width N (hidden 512, T >= N tokens, k = N/4 channels), seconds\n",
                  "| N | T | Gram new | Gram old* | (G+λI)⁻¹ | OBS auto | OBS greedy | OBS old (own inverse) | lstsq "
                  "| new selection / new Gram | threads | load |", "|---" * 12 + "|"]
        for r in width:
            sel = r["inverse_s"] + r["obs_auto_s"]
            lines.append(f"| {r['width']} | {r['tokens']} | {r['gram_new_s']:.2f} | {r['gram_old_s']:.2f} | "
                         f"{r['inverse_s']:.2f} | {r['obs_auto_s']:.2f} | {fmt(r['obs_greedy_s'])} | "
                         f"{fmt(r['obs_old_s'])} "
                         f"| {r['lstsq_s']:.2f} | {sel / r['gram_new_s']:.2f} | {r['threads']} | {r['load']} |")
    sgpt = rows("sparsegpt")
    if sgpt:
        lines += ["\n### SparseGPT / GPTQ engine pass vs llm-compressor's oneshot, lab-llama, back to back\n",
                  "| setting | old s | new s | llm-compressor s | new / llm-compressor | PPL old | PPL new | PPL llmc "
                  "| threads | load |", "|---" * 10 + "|"]
        for r in sgpt:
            lines.append(f"| {r['setting']} | {fmt(r.get('old_s'), '.1f')} | {r['new_s']:.1f} | {r['llmc_s']:.1f} | "
                         f"{r['new_s'] / r['llmc_s']:.2f}x | {fmt(r.get('old_ppl'))} | {r['new_ppl']:.2f} | "
                         f"{r['llmc_ppl']:.2f} | {r['threads']} | {r['load']} |")
    OUT.write_text(head.rstrip() + "\n\n<!-- tables -->\n\n" + merged(old_tables, lines) + "\n")
    print(OUT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("row", choices=["obs", "width", "sparsegpt", "smollm2", "report"])
    ap.add_argument("--work", default="/tmp/bench_engine")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64, help="obs: calibration windows (smoke runs)")
    ap.add_argument("--widths", default="1536,4096,8192,14336")
    ap.add_argument("--slow-max", type=int, default=8192, help="width: greedy/old columns only up to this N")
    ap.add_argument("--layers", type=int, default=4, help="smollm2: the first N decoder layers")
    ap.add_argument("--only", default=None, help='sparsegpt: "|"-separated settings')
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    ap.add_argument("--skip-old", action="store_true", help="obs, sparsegpt: without the old revision's engine "
                    "(its rows are the reference of the earlier tables; saves ~half the time)")
    ap.add_argument("--inner", action="store_true", help="(internal) sparsegpt inside llm-compressor's venv")
    args = ap.parse_args()
    this_tree()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.row == "obs":
        bench_obs(work, args.rounds, args.samples, args.skip_old)
    elif args.row == "width":
        from bench_engine_width import bench_width
        bench_width(work, [int(w) for w in args.widths.split(",")], args.slow_max)
    elif args.row == "smollm2":
        from bench_engine_smollm2 import bench_smollm2
        bench_smollm2(work, args.layers, args.rounds, args.only.split("|") if args.only else None)
    elif args.row == "sparsegpt" and args.inner:
        from bench_engine_llmc import bench_sparsegpt
        bench_sparsegpt(work, args.only.split("|") if args.only else None, args.windows, args.skip_old)
    elif args.row == "sparsegpt":
        sys.path.insert(0, str(REPO / "experiments"))
        import compare_llmcompressor as cl
        cl.export(work)
        subprocess.run([args.llmc_python, __file__, "sparsegpt", "--inner", "--work", str(work),
                        "--threads", str(args.threads)] + (["--only", args.only] if args.only else [])
                       + (["--windows", str(args.windows)] if args.windows else [])
                       + (["--skip-old"] if args.skip_old else []), check=True,
                       env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'experiments'}"))
    report(work)


if __name__ == "__main__":
    main()
