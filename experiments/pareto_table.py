"""The size / PPL table of a `python -m prune_lab -m experiment=pareto_size_ppl` multirun (issue 21.3).

    python experiments/pareto_table.py multirun/pareto_size_ppl/<stamp>

One row per job (its metrics.json and .hydra/overrides.yaml): structured ratio, bits, PPL, parameter ratio,
average bits, effective bytes and their ratio to the dense model in its own dtype; `front` marks the points
no other point beats in both bytes and PPL. The 16-bit point (quant=none) is counted at 2 bytes per
parameter; the quantized points count what metrics.json `compression.effective_bytes` counts (decoder
linears at their bits + fp16 scales, every other parameter in the model's dtype).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

BITS = {"fp": "16 (no quant)", "uniform4": "4 (GPTQ g128)", "mixed3_5": "mixed 3.5 (budget, g128)"}


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
        size = c["effective_bytes"] if c else pruned["params_total"] * 2
        out.append({"ratio": float(overrides["allocator.ratio"]), "bits": overrides["experiment/pareto_bits"],
                    "ppl": m["pruned"]["ppl/data"], "params": pruned["params_total"] / dense["params_total"],
                    "decoder": pruned["params_decoder_linear"] / dense["params_decoder_linear"],
                    "avg_bits": c["avg_bits"] if c else 16.0, "bytes": size,
                    "vs_dense": size / (dense["params_total"] * width), "dir": metrics.parent.name})
    for r in out:
        r["front"] = not any(o["bytes"] <= r["bytes"] and o["ppl"] <= r["ppl"] and
                             (o["bytes"], o["ppl"]) != (r["bytes"], r["ppl"]) for o in out)
    return sorted(out, key=lambda r: r["bytes"])


def table(sweep: Path) -> str:
    lines = [("| structured | bits | PPL | params vs dense | decoder params | avg bits | effective bytes | "
              "vs dense fp32 | Pareto front | run |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(sweep):
        lines.append(f"| {r['ratio']:.0%} | {BITS.get(r['bits'], r['bits'])} | {r['ppl']:.2f} | {r['params']:.3f} | "
                     f"{r['decoder']:.3f} | {r['avg_bits']:.2f} | {r['bytes']:,} | {r['vs_dense']:.3f} | "
                     f"{'**yes**' if r['front'] else 'no'} | {r['dir']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
