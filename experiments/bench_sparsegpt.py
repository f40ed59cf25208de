"""Benchmark (not a test): the unstructured family on lab-llama, fp32, CPU, default calibration
(64 x 256 train tokens, seed 0), PPL on the wiki-vital-en test split (non-overlapping 256-token windows).

    .venv/bin/python experiments/bench_sparsegpt.py [--work /tmp/bench_sparsegpt] [--only name,...]

Runs the real CLI once per setting (`python -m prune_lab method=... quant=...`), reads each run's
metrics.json (PPL, engine-pass seconds, achieved sparsity, average bits, effective size) and writes
a Markdown table to experiments/results/sparsegpt.md (merged with llm-compressor's numbers when
experiments/results/llmcompressor.json exists, see compare_llmcompressor.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
COMMON = ["output.plots=false", "output.save_scores=false"]
WINDOWS = 64            # PPL on the first 64 test windows (16k tokens): the shared 2-core machine is too busy for all 247
SPARSE = {"50%": ["method.sparsity=0.5"], "2:4": ["method.prune_n=2", "method.prune_m=4"]}
G128 = ["quant.group_size=128"]
SETTINGS: dict[str, list[str]] = {
    "dense": ["method=magnitude", "method.sparsity=0"],
    **{f"{m} {s}": [f"method={m}", *o] for s, o in SPARSE.items() for m in ("magnitude", "wanda", "sparsegpt")},
    "gptq uniform 4 g128": ["method=sparsegpt", "method.sparsity=0", "quant=uniform", "quant.bits=4", *G128],
    "gptq uniform 4 g128 act_order": ["method=sparsegpt", "method.sparsity=0", "quant=uniform", "quant.bits=4",
                                      *G128, "quant.act_order=true"],
    "mixed budget 4.0 g128": ["method=sparsegpt", "method.sparsity=0", "quant=mixed", *G128],
    "mixed budget 4.0 g128 act_order": ["method=sparsegpt", "method.sparsity=0", "quant=mixed", *G128,
                                        "quant.act_order=true"],
    "mixed budget 4.0 g128 p=0 (error only)": ["method=sparsegpt", "method.sparsity=0", "quant=mixed", *G128,
                                               "quant.score_power=0"],
    "mixed quantile (4.6) g128": ["method=sparsegpt", "method.sparsity=0", "quant=mixed",
                                  "quant.allocation=quantile", *G128],
    "gptq uniform 4 per-channel": ["method=sparsegpt", "method.sparsity=0", "quant=uniform", "quant.bits=4"],
    "mixed budget 4.0 per-channel": ["method=sparsegpt", "method.sparsity=0", "quant=mixed"],
    "sparsegpt 50% + uniform 4 g128": ["method=sparsegpt", "method.sparsity=0.5", "quant=uniform", *G128],
    "sparsegpt 50% + mixed budget 4.0 g128": ["method=sparsegpt", "method.sparsity=0.5", "quant=mixed", *G128],
    "sparsegpt 50% + mixed quantile g128": ["method=sparsegpt", "method.sparsity=0.5", "quant=mixed",
                                            "quant.allocation=quantile", *G128],
}

CORE = ["sparsegpt 50%", "gptq uniform 4 g128 act_order", "mixed budget 4.0 g128 act_order", "sparsegpt 2:4",
        "wanda 50%", "magnitude 50%", "wanda 2:4", "magnitude 2:4", "mixed quantile (4.6) g128",
        "sparsegpt 50% + uniform 4 g128", "sparsegpt 50% + mixed budget 4.0 g128"]


def run(name: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / name.replace(" ", "_").replace("%", "pct").replace(":", "-").replace("(", "").replace(")", "")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PRUNE_LAB_CACHE=str(work / "cache"))
    start = time.time()
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "prune_lab", *COMMON, f"eval.ppl.max_windows={WINDOWS}", *overrides,
                        f"hydra.run.dir={run_dir}"],
                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    m = json.loads((run_dir / "metrics.json").read_text())
    c = m.get("compression", {})
    return {"setting": name, "status": m["status"], "ppl": m.get("pruned", {}).get("ppl/data"),
            "engine_s": m["timings_s"].get("engine"), "sparsity": c.get("sparsity"),
            "avg_bits": c.get("avg_bits"), "bits": c.get("bit_histogram"),
            "size_ratio": c.get("size_ratio"), "wall_s": round(time.time() - start, 1),
            "command": "python -m prune_lab " + " ".join(overrides)}


def table(rows: list[dict], llmc: list[dict]) -> str:
    out = ["| setting | PPL | engine pass (s) | sparsity | avg bits | size vs fp32 | command |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        out.append(f"| {r['setting']} | {fmt(r['ppl'], '.2f')} | {fmt(r['engine_s'], '.1f')} | "
                   f"{fmt(r['sparsity'], '.3f')} | {fmt(r['avg_bits'], '.2f')} | {fmt(r['size_ratio'], '.3f')} | "
                   f"`{r['command']}` |")
    if llmc:
        out += ["", "**llm-compressor** (same model, calibration tokens and PPL protocol; "
                "`experiments/compare_llmcompressor.py`):", "",
                "| llm-compressor recipe | PPL | oneshot (s) | sparsity |", "|---|---|---|---|"]
        out += [f"| {r['setting']} | {r['ppl']:.2f} | {r['seconds']:.1f} | {r['sparsity']:.3f} |" for r in llmc]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_sparsegpt")
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("--core", action="store_true", help="the settings of the README table only")
    ap.add_argument("--first", type=int, default=None, help="only the first N core settings")
    ap.add_argument("--render", action="store_true", help="only rewrite the table from <work>/rows.json")
    ap.add_argument("--out", default=str(RESULTS / "sparsegpt.md"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else CORE[:args.first] if args.core else list(SETTINGS)
    rows_path = work / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    for name in [] if args.render else names:
        rows[name] = run(name, SETTINGS[name], work)
        rows_path.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows[name]), flush=True)
    llmc_path = RESULTS / "llmcompressor.json"
    llmc = json.loads(llmc_path.read_text()) if llmc_path.exists() else []
    ordered = [rows[n] for n in SETTINGS if n in rows]
    Path(args.out).write_text("# SparseGPT / Wanda / magnitude and mixed-precision GPTQ on lab-llama (fp32, CPU)\n\n"
                              "Calibration: 64 x 256 train tokens (seed 0); PPL: wiki-vital-en test, the first "
                              f"{WINDOWS} non-overlapping 256-token windows. Made by "
                              "`experiments/bench_sparsegpt.py --core`.\n\n"
                              + table(ordered, llmc))


if __name__ == "__main__":
    main()
