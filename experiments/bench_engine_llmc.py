"""Row (c) of experiments/bench_engine.py, run inside llm-compressor's venv (`bench_engine.py sparsegpt`
exports the tokens and starts it): per setting, the old engine, the new engine and llm-compressor's
oneshot back to back in one process, each followed by its PPL."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench_engine import OLD, REPO, emit, old_package, sub, timed


def bench_sparsegpt(work: Path, only: list[str] | None, windows: int | None, skip_old: bool = False) -> None:
    """(llm-compressor's venv) per setting: old engine, new engine, oneshot, back to back; PPL of each."""
    sys.path.insert(0, str(REPO / "experiments"))
    import compare_llmcompressor as cl
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import prune_lab
    from prune_lab.eval.ppl import perplexity
    old = None if skip_old else old_package(OLD, work)
    data = torch.load(work / "tokens.pt", weights_only=True)
    specs = json.loads((work / "methods.json").read_text())
    cal, bs = data["calibration"], int(data["batch_size"])
    dataset = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()})
    load = lambda: AutoModelForCausalLM.from_pretrained(cl.MODEL, dtype=torch.float32).eval()  # noqa: E731
    ppl = lambda m: perplexity(m, data["test"], 256, 16, windows, progress=False)  # noqa: E731
    for name in ("SparseGPT 50%", "SparseGPT 2:4", "GPTQ W4A16 (g128, static act order)"):
        if only and name not in only:
            continue
        row = {"setting": name, "windows": windows}
        for label, pkg in ((("old", old),) if old is not None else ()) + (("new", prune_lab),):
            spec = specs[name]
            make = lambda mod, conf: getattr(sub(pkg, mod), conf["_target_"].rsplit(".", 1)[1])(  # noqa: E731
                **{k: v for k, v in conf.items() if k != "_target_"})
            method = make("method", spec["method"]).with_quant(make("quant", spec["quant"]))
            torch.manual_seed(0)
            model = load()
            row[f"{label}_s"] = timed(lambda: sub(pkg, "engine").walk(model, list(cal.split(bs)), method,
                                                                      progress=False))[0]
            row[f"{label}_ppl"] = ppl(model)
        model = load()
        row["llmc_s"] = timed(lambda: oneshot(model=model, dataset=dataset, recipe=cl.llmc_recipe(cl.PAIRS[name][1]),
                                              num_calibration_samples=len(cal), max_seq_length=cal.shape[1],
                                              shuffle_calibration_samples=False, pipeline="sequential",
                                              batch_size=bs))[0]
        row["llmc_ppl"] = ppl(model.eval())
        emit(work, "sparsegpt", row)
