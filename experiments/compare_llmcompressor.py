"""llm-compressor side by side with prune_lab (not a test): same model, calibration tokens, PPL windows,
and, per pair, prune_lab's engine pass and llm-compressor's oneshot timed back to back in ONE process.

    OMP_NUM_THREADS=1 flock /tmp/prune_lab_big.lock .venv/bin/python experiments/compare_llmcompressor.py \\
        [--model lab_llama|smollm2_135m|<any conf/model option>] [--peers-only] \\
        [--llmc-python /work/venv-llmc/bin/python] [--windows N] [--only "name|name"]

--model: any prune_lab model option (default lab_llama, the embedded model); its weights are loaded by
prune_lab's own loader (model=smollm2_135m: the GGUF conversion, from the conversion cache) and written with
save_pretrained to <work>/model, which the llm-compressor venv loads; the token ids come from the same
tokenizer. --peers-only: llm-compressor only (prune_lab's rows come from its CLI, experiments/bench_real.py).
Results: experiments/results/llmcompressor.json for lab_llama, llmcompressor_<model>.json otherwise; every
PPL on all windows of the test split (or the first --windows) and, from the same pass, the first 64.

llm-compressor pins its own transformers, so it lives in a separate venv made as
    python3 -m venv /work/venv-llmc && /work/venv-llmc/bin/pip install torch==2.13.0 && \\
    /work/venv-llmc/bin/pip install llmcompressor            # 0.14.0.1 with transformers 5.17.0
Step 1 (this venv): export prune_lab's calibration windows (64 x 256 train tokens, seed 0, exactly the
batches the CLI calibrates on), the wiki-vital-en test stream, and, per pair, prune_lab's method and
quant exactly as the CLI composes them from the overrides (conf/ defaults included) to <work>/tokens.pt.
Step 2 (the llm-compressor venv, this file with --llmc): per pair, load lab-llama in fp32 and run
prune_lab's engine (prune_lab.engine.walk, the CLI's engine pass) on those batches, then load it again
and run llm-compressor's `oneshot` (sequential pipeline, one decoder layer at a time, batches of 8
windows as prune_lab); time both, compute both PPLs with prune_lab.eval.ppl.perplexity (256-token
non-overlapping windows; all 247 of the test split unless --windows). Writes
experiments/results/llmcompressor.json (rendered by bench_sparsegpt.py).
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
MODEL = REPO / "prune_lab" / "assets" / "lab-llama"
RESULTS = REPO / "experiments" / "results"
PREFIX = 64                                   # also the PPL of the first 64 windows (bench_real's quick check)


def out_path(model: str) -> Path:
    return RESULTS / ("llmcompressor.json" if model == "lab_llama" else f"llmcompressor_{model}.json")
def gptq4(group_size: int) -> list[str]:
    """prune_lab's overrides of 4-bit GPTQ with static activation order in groups of group_size columns."""
    return ["quant=uniform", "quant.bits=4", f"quant.group_size={group_size}", "quant.act_order=true"]


G128 = gptq4(128)
# name: (prune_lab overrides of the same setting, llm-compressor recipe name); llm-compressor at its defaults
# except what the setting fixes (sparsity, mask structure); prune_lab at its config defaults.
PAIRS = {
    "SparseGPT 50%": (["method=sparsegpt", "method.sparsity=0.5"], "sparsegpt_50"),
    "SparseGPT 2:4": (["method=sparsegpt", "method.prune_n=2", "method.prune_m=4"], "sparsegpt_24"),
    "GPTQ W4A16 (g128, static act order)": (["method=sparsegpt", "method.sparsity=0", *G128], "gptq_w4a16"),
    # SmolLM2's 576 input columns are no multiple of 128 (llm-compressor refuses g128): g64 is the pair there
    "GPTQ W4A16 (g64, static act order)": (["method=sparsegpt", "method.sparsity=0", *gptq4(64)], "gptq_w4a16_g64"),
    "Wanda 50%": (["method=wanda", "method.sparsity=0.5"], "wanda_50"),
    "Wanda 2:4": (["method=wanda", "method.prune_n=2", "method.prune_m=4"], "wanda_24"),
    "SparseGPT 50% + GPTQ W4A16": (["method=sparsegpt", "method.sparsity=0.5", *G128], "sparsegpt_50_gptq"),
    "SparseGPT 50% symmetric (llm-compressor's algorithm)": (["method=sparsegpt", "method.sparsity=0.5",
                                                              "method.asymmetric=0", "method.residual=false"], None),
}


def export(work: Path, model_name: str = "lab_llama") -> Path:
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from prune_lab import schema
    from prune_lab.data import Calibration, TokenStreams
    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "prune_lab" / "conf")):
        job = compose(config_name="config", overrides=[f"model={model_name}"])
        methods = {}
        for name, (overrides, _) in PAIRS.items():
            cfg = compose(config_name="config", overrides=[f"model={model_name}", *overrides])
            methods[name] = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("method", "quant")}
    loader = instantiate(job.model)
    if model_name == "lab_llama":
        tok, weights = loader.load_tokenizer(), MODEL
    else:                       # prune_lab's own load (GGUF: the conversion), saved for the other venv
        model, tok = loader.load()
        weights = work / "model"
        model.to("cpu").save_pretrained(weights)
        tok.save_pretrained(weights)
        del model
    ds, streams = instantiate(job.data), TokenStreams(tok)
    cal = job.calibration
    batches = Calibration(cal.n_samples, cal.seq_len, cal.batch_size, cal.split).batches(
        streams(ds, cal.split), job.seed)
    path = work / "tokens.pt"
    torch.save({"calibration": torch.cat(batches), "batch_size": cal.batch_size, "test": streams(ds, "test")}, path)
    (work / "methods.json").write_text(json.dumps(methods, indent=2))
    (work / "source.json").write_text(json.dumps({"model": model_name, "weights": str(weights),
                                                   "source": loader.source_info() if model_name != "lab_llama"
                                                   else {}}, indent=2, default=str))
    return path


def llmc_recipe(key: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    common = dict(targets=["Linear"], ignore=["re:.*lm_head"])
    def gptq(group_size: int = 128):          # W4A16: symmetric int4 groups, static activation order
        if group_size == 128:                 # the preset itself
            return GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
                   "actorder": "static"}
        return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    return {"sparsegpt_50": lambda: [SparseGPTModifier(sparsity=0.5, mask_structure="0:0", **common)],
            "sparsegpt_24": lambda: [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **common)],
            "gptq_w4a16": lambda: [gptq()],
            "gptq_w4a16_g64": lambda: [gptq(64)],
            "wanda_50": lambda: [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **common)],
            "wanda_24": lambda: [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **common)],
            "sparsegpt_50_gptq": lambda: [SparseGPTModifier(sparsity=0.5, mask_structure="0:0", **common), gptq()],
            }[key]()


def build_ours(spec: dict):
    from prune_lab import method as methods, quant as quants
    def make(module, conf):
        conf = dict(conf)
        return getattr(module, conf.pop("_target_").rsplit(".", 1)[1])(**conf)
    return make(methods, spec["method"]).with_quant(make(quants, spec["quant"]))


def zeros(model) -> float:
    import torch
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def run_pairs(work: Path, only: list[str] | None, windows: int | None, peers_only: bool = False) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(REPO))
    from prune_lab.eval.ppl import perplexities
    data = torch.load(work / "tokens.pt", weights_only=True)   # a dict of token tensors written above
    specs = json.loads((work / "methods.json").read_text())
    source = json.loads((work / "source.json").read_text())
    out = out_path(source["model"])
    cal, bs = data["calibration"], int(data["batch_size"])
    dataset = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()})
    load = lambda: AutoModelForCausalLM.from_pretrained(source["weights"], dtype=torch.float32).eval()  # noqa: E731
    n_windows = len(data["test"]) // 256 if windows is None else windows
    prefixes = [PREFIX] if n_windows > PREFIX else []

    def ppl(m) -> dict:
        got = perplexities(m, data["test"], 256, 16, windows, prefixes, progress=False)
        return {"ppl": got[None], **{f"ppl@{n}": got[n] for n in prefixes}}

    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "llmcompressor": __import__("llmcompressor").__version__}
    if peers_only:              # a check that this venv's load gives prune_lab's dense model: the first 64 windows
        got = perplexities(load(), data["test"], 256, 16, PREFIX, [], progress=False)
        save(out, {"setting": "dense", "windows": PREFIX, f"ppl@{PREFIX}": got[None], "versions": versions})
    else:
        save(out, {"setting": "dense", "windows": windows, **ppl(load()), "versions": versions})
    for name, (overrides, recipe) in PAIRS.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        row = {"setting": name, "windows": windows, "prune_lab": " ".join(overrides), "versions": versions}
        if not peers_only:
            from prune_lab.engine import walk
            model = load()
            start, load0 = time.time(), os.getloadavg()[0]
            walk(model, list(cal.split(bs)), build_ours(specs[name]), progress=False)
            got = ppl(model)
            row.update(ours_s=time.time() - start, ours_ppl=got["ppl"], ours_zeros=zeros(model), ours_load=load0,
                       **{f"ours_{k}": v for k, v in got.items() if k != "ppl"})
        if recipe is not None:
            model = load()
            start, load0 = time.time(), os.getloadavg()[0]
            try:
                oneshot(model=model, dataset=dataset, recipe=llmc_recipe(recipe), num_calibration_samples=len(cal),
                        max_seq_length=cal.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
                        batch_size=bs)
            except Exception as e:        # noqa: BLE001  recorded, exactly, in the results
                row.update(llmc_error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
            else:
                got = ppl(model.eval())
                row.update(llmc_s=time.time() - start, llmc_ppl=got["ppl"], llmc_zeros=zeros(model),
                           llmc_load=load0, **{f"llmc_{k}": v for k, v in got.items() if k != "ppl"})
        elif peers_only:
            continue
        print(json.dumps(row), flush=True)
        save(out, row)


def save(out: Path, row: dict) -> None:
    old = {r["setting"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    old[row["setting"]] = row
    out.write_text(json.dumps(list(old.values()), indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/compare_llmcompressor")
    ap.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    ap.add_argument("--llmc", action="store_true", help="(internal) run inside the llm-compressor venv")
    ap.add_argument("--only", default=None, help='"|"-separated pair names')
    ap.add_argument("--windows", type=int, default=None, help="PPL on the first N test windows (default: all)")
    ap.add_argument("--model", default="lab_llama", help="a prune_lab model option (conf/model), e.g. smollm2_135m")
    ap.add_argument("--peers-only", action="store_true", help="llm-compressor only, no prune_lab engine pass")
    args = ap.parse_args()
    work = Path(args.work)
    only = args.only.split("|") if args.only else None      # names contain commas
    if args.llmc:
        run_pairs(work, only, args.windows, args.peers_only)
        return
    work.mkdir(parents=True, exist_ok=True)
    export(work, args.model)
    cmd = [args.llmc_python, __file__, "--llmc", "--work", str(work)] + (["--only", args.only] if only else []) \
        + (["--windows", str(args.windows)] if args.windows else []) + (["--peers-only"] if args.peers_only else [])
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
