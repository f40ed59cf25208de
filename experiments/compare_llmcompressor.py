"""llm-compressor side by side with prune_lab (not a test): same model, calibration tokens and PPL protocol.

    .venv/bin/python experiments/compare_llmcompressor.py [--llmc-python /work/venv-llmc/bin/python]

llm-compressor pins its own transformers, so it lives in a separate venv made as
    python3 -m venv /work/venv-llmc && /work/venv-llmc/bin/pip install torch==2.13.0 && \\
    /work/venv-llmc/bin/pip install llmcompressor            # 0.14.0.1 with transformers 5.17.0
Step 1 (this venv): export prune_lab's calibration windows (64 x 256 train tokens, seed 0, exactly the
batches `method=sparsegpt` calibrates on) and the wiki-vital-en test stream to <work>/tokens.pt.
Step 2 (the llm-compressor venv, this file with --llmc): for each recipe, load lab-llama in fp32, run
`oneshot` on those 64 windows (sequential pipeline, one layer at a time, as prune_lab's engine), time
it (calibration batches of 8 windows, as prune_lab), and compute PPL with prune_lab.eval.ppl.perplexity (256-token non-overlapping windows).
Writes experiments/results/llmcompressor.json (read by bench_sparsegpt.py's table).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "prune_lab" / "assets" / "lab-llama"
OUT = REPO / "experiments" / "results" / "llmcompressor.json"
WINDOWS = 64            # the same first 64 test windows as bench_sparsegpt.py


def export(work: Path) -> Path:
    import torch
    from prune_lab.data import Calibration, TokenStreams, WikiVital
    from prune_lab.model import EmbeddedModel
    tok = EmbeddedModel(device="cpu").load_tokenizer()
    ds, streams = WikiVital(), TokenStreams(tok)
    cal = torch.cat(Calibration(64, 256, 8).batches(streams(ds, "train"), 0))
    path = work / "tokens.pt"
    torch.save({"calibration": cal, "test": streams(ds, "test")}, path)
    return path


def recipes_names() -> list[str]:
    return ["SparseGPTModifier 50%", "GPTQModifier W4A16 (g128, actorder static)", "SparseGPTModifier 2:4",
            "WandaPruningModifier 50%", "WandaPruningModifier 2:4", "SparseGPT 50% + GPTQ W4A16"]


def recipes():
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    common = dict(targets=["Linear"], ignore=["re:.*lm_head"])
    sgpt = dict(block_size=128, dampening_frac=0.01, **common)
    return {
        "SparseGPTModifier 50%": [SparseGPTModifier(sparsity=0.5, mask_structure="0:0", **sgpt)],
        "GPTQModifier W4A16 (g128, actorder static)": [GPTQModifier(scheme="W4A16", targets="Linear",
                                                                    ignore=["lm_head"])],
        "SparseGPTModifier 2:4": [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **sgpt)],
        "WandaPruningModifier 50%": [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **common)],
        "WandaPruningModifier 2:4": [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **common)],
        "SparseGPT 50% + GPTQ W4A16": [SparseGPTModifier(sparsity=0.5, mask_structure="0:0", **sgpt),
                                       GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])],
    }


def run_llmc(tokens_path: Path, only: list[str] | None) -> list[dict]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(REPO))
    from prune_lab.eval.ppl import perplexity
    torch.manual_seed(0)
    data = torch.load(tokens_path, weights_only=True)   # a dict of token tensors written above
    cal = data["calibration"]
    dataset = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()})
    dense = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    rows = [{"setting": "dense (no recipe)", "ppl": perplexity(dense, data["test"], 256, 16, WINDOWS, progress=False),
             "seconds": 0.0, "sparsity": 0.0}]
    save(rows)
    for name, recipe in recipes().items():
        if only and name not in only:
            continue
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        start = time.time()
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(cal),
                max_seq_length=cal.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
                batch_size=8)                 # prune_lab's calibration.batch_size
        seconds = time.time() - start
        model.eval()
        ppl = perplexity(model, data["test"], 256, 16, WINDOWS, progress=False)
        linears = [m.weight for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
        rows.append({"setting": name, "ppl": ppl, "seconds": seconds, "sparsity": zeros})
        print(json.dumps(rows[-1]), flush=True)
        save(rows)
    return rows


def save(rows: list[dict]) -> None:
    old = {r["setting"]: r for r in json.loads(OUT.read_text())} if OUT.exists() else {}
    old.update({r["setting"]: r for r in rows})
    OUT.write_text(json.dumps(list(old.values()), indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/compare_llmcompressor")
    ap.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    ap.add_argument("--llmc", action="store_true", help="(internal) run inside the llm-compressor venv")
    ap.add_argument("--only", default=None, help='"|"-separated recipe names')
    ap.add_argument("--first", type=int, default=None, help="only the first N recipes")
    args = ap.parse_args()
    work = Path(args.work)
    # names contain commas ("(g128, actorder static)"), so --only takes "|"-separated names
    only = args.only.split("|") if args.only else recipes_names()[:args.first] if args.first else None
    if args.llmc:
        run_llmc(work / "tokens.pt", only)
        return
    work.mkdir(parents=True, exist_ok=True)
    export(work)
    cmd = [args.llmc_python, __file__, "--llmc", "--work", str(work)] + (["--only", "|".join(only)] if only else [])
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
