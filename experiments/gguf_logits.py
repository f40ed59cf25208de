"""Measurement (not a test): output.export=gguf run by llama.cpp (llama-cpp-python) against prune_lab.

    .venv/bin/python experiments/gguf_logits.py [--out experiments/results/gguf_logits.md]

lab-llama with a per-layer plan (KV groups cut in layers 0 and 5, every third MLP channel of the first
40·(i+1) cut in layers 0-7, layer 9 removed: written as llama.cpp's `deci`), exported in f32, f16, bf16
and q8_0; 256 tokens of README.md, evaluated with logits_all=True. Prints and writes the file size, the
max |logit difference| and the PPL of both over those tokens.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prune_lab.artifacts.gguf_write import export_gguf  # noqa: E402
from prune_lab.core.executor import apply_plan  # noqa: E402
from prune_lab.core.plan import PruningPlan  # noqa: E402
from prune_lab.model import EmbeddedModel  # noqa: E402


def ppl(logits: np.ndarray, ids: list[int]) -> float:
    logp = torch.tensor(logits, dtype=torch.float64).log_softmax(-1)
    return float(torch.exp(-logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()))


def main() -> None:
    import llama_cpp
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "gguf_logits.md"))
    args = ap.parse_args()
    model, tok = EmbeddedModel(device="cpu").load()
    plan = PruningPlan(attn={0: [1], 5: [0, 2]}, mlp={i: list(range(0, 40 * (i + 1), 3)) for i in range(8)}, layers=[9])
    apply_plan(model, plan)
    ids = tok.encode((REPO / "README.md").read_text()[:3000], add_special_tokens=False)[:256]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    lines = ["| gguf_type | architecture | bytes | max abs logit diff | PPL llama.cpp | PPL prune_lab |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f32", "f16", "bf16", "q8_0"):
            path = Path(tmp) / f"{kind}.gguf"
            info = export_gguf(model, tok, path, kind)
            llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False)
            llm.eval(ids)
            got = np.array(llm.scores[:len(ids)], dtype=np.float32)
            llm.close()
            lines.append(f"| {kind} | {info['architecture']} | {info['bytes']:,} | {np.abs(got - ours).max():.4f} | "
                         f"{ppl(got, ids):.2f} | {ppl(ours, ids):.2f} |")
    text = (f"lab-llama, per-layer plan, {len(ids)} tokens, max |logit| {np.abs(ours).max():.2f}, "
            f"llama-cpp-python {llama_cpp.__version__}\n\n" + "\n".join(lines) + "\n")
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
