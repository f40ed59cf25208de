"""Benchmark (not a test): the unstructured family on lab-llama, fp32, CPU, default calibration
(64 x 256 train tokens, seed 0), PPL on the wiki-vital-en test split (non-overlapping 256-token windows).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_sparsegpt.py --core [--windows N] [--only name,...]

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
SPARSE = {"50%": ["method.sparsity=0.5"], "2:4": ["method.prune_n=2", "method.prune_m=4"]}
SYM = ["method.asymmetric=0", "method.residual=false"]          # the symmetric sweep (llm-compressor's)
G128 = ["quant.group_size=128", "quant.act_order=true"]          # llm-compressor's W4A16: g128, static act order
Q4 = ["quant=uniform", "quant.bits=4", *G128]
MIXED = ["quant=mixed", *G128]                                   # budget allocation at 4.0 average bits
QUANTILE4 = ["quant=mixed", "quant.allocation=quantile", "quant.bits_options=[2,3,4,5,6]", *G128]  # 4.0 average
QUANTILE345 = ["quant=mixed", "quant.allocation=quantile", "quant.bits_options=[3,4,5]", *G128]      # 4.0 average
SETTINGS: dict[str, list[str]] = {
    **{f"{m} {s}": [f"method={m}", *o] for s, o in SPARSE.items() for m in ("magnitude", "wanda", "sparsegpt")},
    **{f"sparsegpt {s} symmetric": ["method=sparsegpt", *o, *SYM] for s, o in SPARSE.items()},
    "gptq uniform 4": ["method=sparsegpt", "method.sparsity=0", *Q4],
    "mixed budget 4.0": ["method=sparsegpt", "method.sparsity=0", *MIXED],
    "mixed quantile 4.0 (options 2-6)": ["method=sparsegpt", "method.sparsity=0", *QUANTILE4],
    "mixed quantile 4.0 (options 3-5)": ["method=sparsegpt", "method.sparsity=0", *QUANTILE345],
    "gptq uniform 4 symmetric": ["method=sparsegpt", "method.sparsity=0", *Q4, *SYM],
    "mixed budget 4.0 symmetric": ["method=sparsegpt", "method.sparsity=0", *MIXED, *SYM],
    "sparsegpt 50% + gptq uniform 4": ["method=sparsegpt", "method.sparsity=0.5", *Q4],
    "sparsegpt 50% + mixed budget 4.0": ["method=sparsegpt", "method.sparsity=0.5", *MIXED],
    "sparsegpt 50% + mixed quantile 4.0": ["method=sparsegpt", "method.sparsity=0.5", *QUANTILE4],
}
# in the order they are run (most important first)
NOTES = "## Notes"        # from this heading on, the results file is hand-written and kept by --render
CORE = ["sparsegpt 50%", "sparsegpt 2:4", "gptq uniform 4", "mixed budget 4.0", "mixed quantile 4.0 (options 2-6)",
        "mixed quantile 4.0 (options 3-5)", "wanda 50%", "wanda 2:4", "magnitude 50%", "magnitude 2:4", "sparsegpt 50% + gptq uniform 4",
        "sparsegpt 50% + mixed budget 4.0", "sparsegpt 50% + mixed quantile 4.0", "sparsegpt 50% symmetric",
        "sparsegpt 2:4 symmetric", "gptq uniform 4 symmetric", "mixed budget 4.0 symmetric"]


def run(name: str, overrides: list[str], work: Path, windows: int | None) -> dict:
    run_dir = work / name.replace(" ", "_").replace("%", "pct").replace(":", "-").replace("(", "").replace(")", "")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PRUNE_LAB_CACHE=str(work / "cache"))
    start = time.time()
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "prune_lab", *COMMON, f"eval.ppl.max_windows={windows or 'null'}", *overrides,
                        f"hydra.run.dir={run_dir}"],
                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    m = json.loads((run_dir / "metrics.json").read_text())
    c = m.get("compression", {})
    return {"setting": name, "status": m["status"], "ppl": m.get("pruned", {}).get("ppl/data"),
            "engine_s": m["timings_s"].get("engine"), "sparsity": c.get("sparsity"),
            "avg_bits": c.get("avg_bits"), "bits": c.get("bit_histogram"),
            "size_ratio": c.get("size_ratio"), "wall_s": round(time.time() - start, 1), "windows": windows,
            "load": os.getloadavg()[0],
            "command": "python -m prune_lab " + " ".join(overrides)}


def fmt(v, f: str) -> str:
    return "–" if v is None else format(v, f)


def table(rows: list[dict], llmc: list[dict]) -> str:
    out = ["| setting | PPL | engine pass (s) | load | sparsity | avg bits | size vs fp32 | command |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setting']} | {fmt(r['ppl'], '.2f')} | {fmt(r['engine_s'], '.0f')} | "
                   f"{fmt(r.get('load'), '.1f')} | {fmt(r['sparsity'], '.3f')} | {fmt(r['avg_bits'], '.2f')} | "
                   f"{fmt(r['size_ratio'], '.3f')} | `{r['command']}` |")
    pairs = [r for r in llmc if "ours_ppl" in r]
    if pairs:
        dense = next((r["ppl"] for r in llmc if r["setting"] == "dense"), None)
        out += ["", f"**prune_lab vs llm-compressor, back to back in one process** "
                f"(`experiments/compare_llmcompressor.py`; dense {fmt(dense, '.2f')}):", "",
                "| setting | prune_lab PPL | llm-compressor PPL | prune_lab engine (s) | llm-compressor oneshot (s) | "
                "time ratio | zeros (ours / theirs) | load | prune_lab command |", "|---|---|---|---|---|---|---|---|---|"]
        for r in pairs:
            ratio = r["ours_s"] / r["llmc_s"] if r.get("llmc_s") else None
            out.append(f"| {r['setting']} | {r['ours_ppl']:.2f} | {fmt(r.get('llmc_ppl'), '.2f')} | "
                       f"{r['ours_s']:.0f} | {fmt(r.get('llmc_s'), '.0f')} | {fmt(ratio, '.2f')} | "
                       f"{r['ours_zeros']:.3f} / {fmt(r.get('llmc_zeros'), '.3f')} | {r['ours_load']:.1f} | "
                       f"`python -m prune_lab {r['prune_lab']}` |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_sparsegpt")
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("--core", action="store_true", help="the settings of the README table only")
    ap.add_argument("--first", type=int, default=None, help="only the first N core settings")
    ap.add_argument("--windows", type=int, default=None, help="PPL on the first N test windows (default: all 247)")
    ap.add_argument("--render", action="store_true", help="only rewrite the table from <work>/rows.json")
    ap.add_argument("--out", default=str(RESULTS / "sparsegpt.md"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else CORE[:args.first] if args.core else list(SETTINGS)
    rows_path = work / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    for name in [] if args.render else names:
        rows[name] = run(name, SETTINGS[name], work, args.windows)
        rows_path.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows[name]), flush=True)
    llmc_path = RESULTS / "llmcompressor.json"
    llmc = json.loads(llmc_path.read_text()) if llmc_path.exists() else []
    ordered = [rows[n] for n in SETTINGS if n in rows]
    windows = f"the first {args.windows}" if args.windows else "all 247"
    out = Path(args.out)
    notes = out.read_text().partition(NOTES)[2] if out.exists() else ""      # hand-written analysis, kept
    out.write_text("# SparseGPT / Wanda / magnitude and mixed-precision GPTQ on lab-llama (fp32, CPU)\n\n"
                   "Calibration: 64 x 256 train tokens (seed 0); PPL: wiki-vital-en test, "
                   f"{windows} non-overlapping 256-token windows. Made by "
                   "`experiments/run_sparsegpt_benchmarks.sh`.\n\n" + table(ordered, llmc)
                   + (f"\n{NOTES}{notes}" if notes else ""))


if __name__ == "__main__":
    main()
