"""Benchmark (not a test): reconstruction on lab-llama, no recovery, fp32, default calibration.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_reconstruct.py grid [--jobs 2] [--work /tmp/bench_reconstruct]
    .venv/bin/python experiments/bench_reconstruct.py qwen2                 # error reduction, 7:1 GQA vs 4:1
    .venv/bin/python experiments/bench_reconstruct.py scale [--layers 16]   # peak RSS of an engine pass
    .venv/bin/python experiments/bench_reconstruct.py report                # Markdown from what was measured

grid: the real CLI (prune_lab's Hydra app, in a subprocess per row: `one`), one job per (importance,
allocator, ratio, reconstruct), a shared score cache; PPL on the whole wiki-vital test split; the engine
pass time (the `reconstruct` stage) relative to one forward pass over the 64x256 calibration tokens,
timed in the same process right before and right after the job (their mean; load average recorded).
Results accumulate in <work>/rows.jsonl; `report` rewrites the grid section of
experiments/results/reconstruct.md (between its `<!-- grid -->` markers, the rest is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "results" / "reconstruct.md"
MODES = ["none", "bias", "lstsq", "obs"]
GRID_BEGIN, GRID_END = "<!-- grid: bench_reconstruct.py report writes below -->", "<!-- grid end -->"
GRID = [("taylor", alloc, ratio, mode, ()) for ratio in (0.25, 0.5) for alloc in ("global", "uniform") for mode in MODES]
GRID += [("obs", "global", ratio, "obs", ()) for ratio in (0.25, 0.5)]


def job(work: Path, importance: str, alloc: str, ratio: float, mode: str, extra=()) -> dict:
    extra = tuple(extra)
    name = f"{importance}_{alloc}_{ratio}_{mode}" + "".join(f"_{e.split('.')[-1]}" for e in extra)
    run_dir = work / "runs" / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PRUNE_LAB_CACHE=str(work / "cache"),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    args = [f"importance={importance}", f"allocator={alloc}", f"allocator.ratio={ratio}", f"reconstruct={mode}",
            "output.plots=false", "engine.progress=false", *extra, f"hydra.run.dir={run_dir}"]
    with open(work / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, __file__, "one", "--work", str(work), *args], cwd=REPO, env=env,
                       stdout=log, stderr=subprocess.STDOUT)
    m = json.loads((run_dir / "metrics.json").read_text())
    if m["status"] != "ok":
        print(f"{name}: {m['status']} (see {work / name}.log)", flush=True)
        return {}
    fwd = json.loads((run_dir / "forward.json").read_text())
    row = {"importance": importance, "allocator": alloc, "ratio": ratio, "reconstruct": mode,
           "extra": " ".join(extra), "status": m["status"], "ppl": m.get("pruned", {}).get("ppl/data"),
           "reconstruct_s": m["timings_s"].get("reconstruct", 0.0), "eval_s": m["timings_s"].get("evaluate"),
           **fwd,
           **{k: v for k, v in m.get("reconstruct", {}).items() if k.endswith(("_before", "_after"))}}
    with open(work / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def calibration_forward_seconds() -> float:
    import torch
    from prune_lab.data import Calibration, TokenStreams, WikiVital
    from prune_lab.model import EmbeddedModel
    model, tok = EmbeddedModel(device="cpu").load()
    batches = Calibration().batches(TokenStreams(tok)(WikiVital(), "train"), 0)
    with torch.no_grad():
        model(batches[0])
        start = time.perf_counter()
        for b in batches:
            model(b)
    return time.perf_counter() - start


def one(overrides: list[str]) -> None:
    """One CLI job in this process (prune_lab's Hydra app), with a calibration forward timed before and after."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")))
    before, load_before = calibration_forward_seconds(), os.getloadavg()[0]
    sys.argv = ["prune_lab", *overrides]
    from prune_lab.__main__ import main as cli
    try:
        cli()
    except SystemExit as e:
        if e.code:
            raise
    after, load_after = calibration_forward_seconds(), os.getloadavg()[0]
    (run_dir / "forward.json").write_text(json.dumps({"forward_s": (before + after) / 2, "forward_before_s": before,
                                                      "forward_after_s": after,
                                                      "load": (load_before + load_after) / 2}))


def grid(work: Path, jobs: int, only: str | None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    todo = [g for g in GRID if only is None or only in "_".join(map(str, g[:4]))]
    # scores first (one job per importance), so parallel jobs hit the cache
    firsts = {imp: g for g in reversed(todo) for imp in [g[0]]}
    for g in firsts.values():
        job(work, *g)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda g: job(work, *g), [g for g in todo if g not in firsts.values()]))


def qwen2(work: Path) -> None:
    """Relative output error before/after refit on random tiny models (magnitude plan, uniform 25%):
    Qwen2 7:1 GQA + qkv bias vs Llama 4:1."""
    import torch
    from prune_lab.allocator import Uniform
    from prune_lab.engine import Engine
    from prune_lab.importance import Magnitude
    from prune_lab.model import RandomModel
    from prune_lab.reconstruct import Reconstruct, summarize
    sys.path.insert(0, str(REPO / "tests"))
    from test_prune import lively
    shapes = {"qwen2 7:1": dict(arch="qwen2", hidden_size=224, num_attention_heads=28, num_key_value_heads=4,
                                head_dim=16),
              "llama 4:1": dict(arch="llama", hidden_size=256, num_attention_heads=16, num_key_value_heads=4,
                                head_dim=16)}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (8, 128), generator=gen) for _ in range(2)]
    rows = []
    for name, shape in shapes.items():
        model = lively(RandomModel(**shape, num_hidden_layers=4, intermediate_size=512, device="cpu").build())
        plan = Uniform(0.25)(Magnitude()(model), __import__("prune_lab.adapter").adapter.layer_views(model))
        for mode in ("bias", "lstsq", "obs"):
            m = __import__("copy").deepcopy(model)
            _, errs = Reconstruct(mode)(m, plan, batches, Engine("cpu", progress=False))
            rows.append({"model": name, "reconstruct": mode, **summarize(errs)})
            print(json.dumps(rows[-1]), flush=True)
    (work / "qwen2.json").write_text(json.dumps(rows))


def scale(work: Path, layers: int) -> None:
    """Peak RSS of a reconstruct engine pass on a ~1B-parameter random Llama shape (CPU, fp32)."""
    import torch
    from prune_lab.core.adapter import layer_views
    from prune_lab.engine import walk
    from prune_lab.model import RandomModel
    from prune_lab.core.plan import PruningPlan
    from prune_lab.reconstruct.base import PlanRefit
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))   # 1 thread on the shared CPU
    shape = dict(arch="llama", hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                 intermediate_size=8192, num_hidden_layers=layers, vocab_size=32000)
    model = RandomModel(**shape, device="cpu").build()
    params = sum(p.numel() for p in model.parameters())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # the 8192-wide down_proj Gram needs at least 8192 tokens: 9 batches of 4x256
    batches = [torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(i)) for i in range(9)]
    views = layer_views(model)
    plan = PruningPlan(attn={v.index: [0, 1] for v in views}, mlp={v.index: list(range(2048)) for v in views})
    start = time.time()
    progress = work / f"scale_{layers}_progress.jsonl"
    progress.unlink(missing_ok=True)

    class Logged(PlanRefit):       # peak RSS after every refit: a cut-short run still shows the flat working set
        def apply(self, index, view, stats):
            row = super().apply(index, view, stats)
            with open(progress, "a") as f:
                f.write(json.dumps({"layer": index, "kind": row["kind"], "seconds": time.time() - start,
                                    "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                    "rss_after_load_GiB": rss_model}) + "\n")
            return row
    walk(model, batches, Logged(plan, "lstsq", 0.01, False, 0), device="cpu", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"layers": layers, "params_B": params / 1e9, "model_GiB": params * 4 / 2**30, "rss_after_load_GiB": rss_model,
           "peak_rss_GiB": peak, "tokens": sum(b.numel() for b in batches), "seconds": time.time() - start}
    print(json.dumps(row))
    (work / f"scale_{layers}.json").write_text(json.dumps(row))


def report(work: Path) -> None:
    """The grid table (PPL, engine pass / calibration forward, errors) between the markers of reconstruct.md."""
    import pandas as pd
    rows = pd.DataFrame([json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()])
    rows = rows.drop_duplicates(["importance", "allocator", "ratio", "reconstruct", "extra"], keep="last")
    order = {"reconstruct": MODES.index, "importance": lambda i: i != "taylor"}
    rows = rows.sort_values(["ratio", "importance", "allocator", "reconstruct"],
                            key=lambda c: c.map(order[c.name]) if c.name in order else c)

    def err(r, kind):
        b, a = r.get(f"{kind}_err_before"), r.get(f"{kind}_err_after")
        return "–" if pd.isna(b) else f"{b:.3f} → {a:.3f}"

    lines = [GRID_BEGIN, "", "| importance | allocator | ratio | reconstruct | PPL | engine pass s | calib. forward s "
             "| engine / forward | load | o_proj err before → after | down_proj err before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        eng = r["reconstruct_s"] if r["reconstruct"] != "none" else None
        fwd = r["forward_s"]
        lines.append(f"| {r['importance']} | {r['allocator']} | {r['ratio']:.2f} | {r['reconstruct']} "
                     f"| {r['ppl']:.2f} | {'–' if eng is None else f'{eng:.1f}'} | {fwd:.1f} "
                     f"| {'–' if eng is None else f'{eng / fwd:.2f}x'} | {r['load']:.1f} "
                     f"| {err(r, 'attn')} | {err(r, 'mlp')} |")
    lines += ["", GRID_END]
    text = OUT.read_text()
    text = text[:text.index(GRID_BEGIN)] + "\n".join(lines) + text[text.index(GRID_END) + len(GRID_END):]
    OUT.write_text(text)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["grid", "one", "qwen2", "scale", "report"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_reconstruct"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only grid rows whose name contains this")
    ap.add_argument("--layers", type=int, default=16)
    a, rest = ap.parse_known_args()
    a.work.mkdir(parents=True, exist_ok=True)
    {"grid": lambda: grid(a.work, a.jobs, a.only), "one": lambda: one(rest), "qwen2": lambda: qwen2(a.work),
     "scale": lambda: scale(a.work, a.layers), "report": lambda: report(a.work)}[a.what]()


if __name__ == "__main__":
    main()
