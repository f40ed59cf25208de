"""allocator=search on lab-llama (and SmolLM2 with --model smollm2_135m): PPL against the one-shot
allocators, search cost (fitness evaluations x tokens, wall time of the database and the search vs the
job's obs reconstruct pass), evolution vs Optuna CMA-ES at an equal number of fitness evaluations, and
KL vs perplexity-on-calibration fitness. Not a test: each row is one CLI job (minutes on 2 cores).

    OMP_NUM_THREADS=2 python experiments/bench_search.py [--model smollm2_135m] [--only "NAME|NAME"] [--render]

Writes experiments/results/search_<model>.json (resumable: finished rows are kept) and search.md.
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
ROWS = {   # name: overrides (no recovery, default calibration, reconstruct=obs)
    "global 25% (default job)": ["allocator.ratio=0.25"],
    "importance=obs 25%": ["importance=obs", "allocator.ratio=0.25"],
    "search evolution 25%": ["allocator=search", "allocator.ratio=0.25"],
    "search evolution 25%, mutations=1 resample=false": ["allocator=search", "allocator.ratio=0.25",
                                                         "allocator.mutations=1", "allocator.resample=false"],
    # SmolLM2 (--model smollm2_135m; 12x lab-llama's cost per token): a quarter of the tokens per stage,
    # 20 generations, the first 64 test windows
    "search evolution 25%, 2048 fitness tokens, 20 generations": [
        "allocator=search", "allocator.ratio=0.25", "allocator.fitness_tokens=2048", "allocator.generations=20",
        "eval.ppl.max_windows=64"],
    "search evolution 50%, 2048 fitness tokens, 20 generations": [
        "allocator=search", "allocator.ratio=0.5", "allocator.fitness_tokens=2048", "allocator.generations=20",
        "eval.ppl.max_windows=64"],
    "search evolution 50%, 2048 fitness tokens, 20 generations, remove_empty_layers": [
        "allocator=search", "allocator.ratio=0.5", "allocator.fitness_tokens=2048", "allocator.generations=20",
        "allocator.remove_empty_layers=true", "eval.ppl.max_windows=64"],
    "search evolution 50%, 2048 fitness tokens, 20 generations, remove_empty_layers, producers refit": [
        "allocator=search", "allocator.ratio=0.5", "allocator.fitness_tokens=2048", "allocator.generations=20",
        "allocator.remove_empty_layers=true", "reconstruct.producers=true", "eval.ppl.max_windows=64"],
    "search evolution 50%, 2048 fitness tokens, 20 generations, producers refit": [
        "allocator=search", "allocator.ratio=0.5", "allocator.fitness_tokens=2048", "allocator.generations=20",
        "reconstruct.producers=true", "eval.ppl.max_windows=64"],
    "global 50%": ["allocator.ratio=0.5"],
    "importance=obs 50%": ["importance=obs", "allocator.ratio=0.5"],
    "search evolution 50%": ["allocator=search", "allocator.ratio=0.5"],
    "search evolution 50%, mutations=1 resample=false": ["allocator=search", "allocator.ratio=0.5",
                                                         "allocator.mutations=1", "allocator.resample=false"],
    "search optuna (CMA-ES) 50%": ["allocator=search", "allocator.ratio=0.5", "allocator.searcher=optuna"],
    # 224 trials x 8192 tokens = 1.84M tokens: the evolution's 50% row evaluates 1.78M (1108 evaluations)
    "search optuna (CMA-ES) 50%, 224 trials": ["allocator=search", "allocator.ratio=0.5",
                                                          "allocator.searcher=optuna", "allocator.generations=14"],
    # the searched counts, then q/k/v and gate/up refit too (reconstruct.producers=true) on the pruned path
    "search evolution 50%, producers refit": ["allocator=search", "allocator.ratio=0.5", "reconstruct.producers=true"],
    "search evolution 50%, ppl fitness": ["allocator=search", "allocator.ratio=0.5", "allocator.fitness=ppl"],
    # a second round on the database refit along the first round's best shape (Týr's error accumulation)
    "search evolution 50%, rounds=2": ["allocator=search", "allocator.ratio=0.5", "allocator.rounds=2"],
    "search evolution 25%, rounds=2": ["allocator=search", "allocator.ratio=0.25", "allocator.rounds=2"],
    # one shape for every layer (loads with plain transformers): importance sums vs the fitness on compensated levels
    "uniform_shape 25% (width only)": ["allocator=uniform_shape", "allocator.ratio=0.25", "allocator.max_removed_layers=0"],
    "search uniform shape 25%": ["allocator=search", "allocator.ratio=0.25", "allocator.shape=uniform"],
    "uniform_shape 50% (width only)": ["allocator=uniform_shape", "allocator.ratio=0.5", "allocator.max_removed_layers=0"],
    "search uniform shape 50%": ["allocator=search", "allocator.ratio=0.5", "allocator.shape=uniform"],
    "search evolution 50%, seeded by importance=obs": ["allocator=search", "allocator.ratio=0.5", "importance=obs"],
    "search evolution 50%, remove_empty_layers (blocks or layers)": ["allocator=search", "allocator.ratio=0.5",
                                                                     "allocator.remove_empty_layers=true"],
}


def run_row(model: str, name: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / name.replace(" ", "_").replace("%", "").replace(",", "").replace("=", "-").replace("(", "").replace(")", "").replace("'", "")
    args = [f"model={model}", *overrides, "output.plots=false", f"hydra.run.dir={run_dir}"]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "prune_lab", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    m = json.loads((run_dir / "metrics.json").read_text())
    row = {"command": "python -m prune_lab " + " ".join(args[:-2]), "status": m["status"], "wall_s": round(time.time() - start, 1),
           "ppl": m.get("pruned", {}).get("ppl/data"), "achieved_ratio": m.get("plan", {}).get("achieved_ratio"),
           "timings_s": m["timings_s"], "error": m.get("error") or (proc.stderr[-500:] if proc.returncode else None)}
    if "search" in m:
        s = m["search"]
        row["search"] = {k: s.get(k) for k in ("searcher", "fitness_kind", "mutations", "resample", "trajectory", "evaluations", "tokens_evaluated", "decoder_layers_run",
                                           "database_seconds", "search_seconds", "database_bytes", "rounds", "seed_fitness",
                                           "best_fitness", "levels", "global_levels", "attn_blocks_removed",
                                           "mlp_blocks_removed", "layers_removed")}
    return row


def render(model: str, rows: dict) -> str:
    lines = [f"# allocator=search on {model} (no recovery, reconstruct=obs, default calibration 64x256)", "",
             "| job | PPL | ratio | fitness evals | tokens evaluated | database s | search s | reconstruct s | job s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s, t = r.get("search", {}), r.get("timings_s", {})
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") else r["status"]
        lines.append(f"| {name} | {ppl} | {r.get('achieved_ratio') or 0:.4f} | {s.get('evaluations', '')} | "
                     f"{s.get('tokens_evaluated', '')} | {s.get('database_seconds', '')} | {s.get('search_seconds', '')} | "
                     f"{t.get('reconstruct', '')} | {t.get('total', '')} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{r['command']}`" for name, r in rows.items()]
    shapes = [(n, r["search"]) for n, r in rows.items() if "levels" in r.get("search", {})]
    if shapes:
        lines += ["", "Chosen shapes (units removed per layer; the global seed in brackets):", ""]
        for n, s in shapes:
            lines.append(f"- {n}: attn {s['levels']['attn']} [{s['global_levels']['attn']}], "
                         f"mlp {s['levels']['mlp']} [{s['global_levels']['mlp']}]; fitness seeds {s['seed_fitness']} "
                         f"-> best {s['best_fitness']:.5g}; database {s['database_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lab_llama")
    ap.add_argument("--only", default="")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--work", default="/tmp/bench_search")
    a = ap.parse_args()
    out = RESULTS / f"search_{a.model}.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    if not a.render:
        for name, overrides in ROWS.items():
            if (a.only and name not in a.only.split("|")) or (name in rows and rows[name]["status"] == "ok"):
                continue
            row = run_row(a.model, name, overrides, Path(a.work) / a.model)
            rows = (json.loads(out.read_text()) if out.exists() else {}) | {name: row}   # another run may have written
            out.write_text(json.dumps(rows, indent=1))
            print(name, rows[name]["ppl"], rows[name]["wall_s"], flush=True)
    (RESULTS / f"search_{a.model}.md").write_text(render(a.model, rows))


if __name__ == "__main__":
    main()
