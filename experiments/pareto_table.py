"""The size / PPL table of a `python -m prune_lab -m experiment=pareto_size_ppl` multirun (issue 21.3).

    python experiments/pareto_table.py multirun/pareto_size_ppl/<stamp>

One row per job (its metrics.json and .hydra/overrides.yaml): structured ratio, bits, PPL, parameter ratio,
average bits and two byte counts, each with its Pareto front (the points no other point beats in both bytes
and PPL): `as run` = metrics.json `compression.effective_bytes` (decoder linears at their bits + fp16
scales, every other parameter in the model's dtype) and, for quant=none, every parameter in the model's
dtype; `16-bit rest` = the same with every parameter that is not a quantized decoder weight at 2 bytes
(the issue's "16 bits" for quant=none). Ratios are to the dense model in its own dtype.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

BITS = {"fp": "16 (no quant; fp32 as run)", "uniform4": "4 (GPTQ g128)", "mixed3_5": "mixed 3.5 (budget, g128)"}


def rows(sweep: Path) -> list[dict]:
    out = []
    for metrics in sorted(sweep.glob("*/metrics.json")):
        m = json.loads(metrics.read_text())
        if m.get("status") != "ok":
            continue
        overrides = dict(o.lstrip("+").split("=", 1) for o in yaml.safe_load(
            (metrics.parent / ".hydra" / "overrides.yaml").read_text()))
        dense, pruned = m["model"]["dense"], m["model"]["pruned"]
        width = 4 if m["model"].get("dtype", "float32") == "float32" else 2
        c = m.get("compression")
        size = c["effective_bytes"] if c else pruned["params_total"] * width
        rest = pruned["params_total"] - (pruned["params_decoder_linear"] if c else 0)
        half = size - rest * (width - 2)
        out.append({"ratio": float(overrides["allocator.ratio"]), "bits": overrides["experiment/pareto_bits"],
                    "ppl": m["pruned"]["ppl/data"], "params": pruned["params_total"] / dense["params_total"],
                    "decoder": pruned["params_decoder_linear"] / dense["params_decoder_linear"],
                    "avg_bits": c["avg_bits"] if c else 8.0 * width, "bytes": size, "half": half,
                    "vs_dense": size / (dense["params_total"] * width), "dir": metrics.parent.name})
    for key in ("bytes", "half"):
        for r in out:
            r[f"front_{key}"] = not any(o[key] <= r[key] and o["ppl"] <= r["ppl"] and
                                        (o[key], o["ppl"]) != (r[key], r["ppl"]) for o in out)
    return sorted(out, key=lambda r: r["half"])


def table(sweep: Path) -> str:
    lines = [("| structured | bits | PPL | params vs dense | decoder params | avg bits | bytes as run | vs dense | "
              "front | bytes, 16-bit rest | front | run |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mark = {True: "**yes**", False: "no"}
    for r in rows(sweep):
        lines.append(f"| {r['ratio']:.0%} | {BITS.get(r['bits'], r['bits'])} | {r['ppl']:.2f} | {r['params']:.3f} | "
                     f"{r['decoder']:.3f} | {r['avg_bits']:.2f} | {r['bytes']:,} | {r['vs_dense']:.3f} | "
                     f"{mark[r['front_bytes']]} | {r['half']:,} | {mark[r['front_half']]} | {r['dir']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
