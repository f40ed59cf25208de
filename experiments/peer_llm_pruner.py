"""A released structured pruner in prune_lab's protocol (not a test): LLM-Pruner (a checkout OUTSIDE the repo;
nothing of its code is here), its Llama-3 / GQA recipe (llama3.py --block_wise) on SmolLM2-135M at ~25% of the
decoder parameters, evaluated with prune_lab's PPL function on the same token ids as experiments/bench_real.py.

    git clone <LLM-Pruner> /work/ext/LLM-Pruner          # only LLMPruner/ is imported
    OMP_NUM_THREADS=2 python experiments/peer_llm_pruner.py [--llm-pruner /work/ext/LLM-Pruner] [--only l2,taylor]

What it runs, as llama3.py does with --block_wise over every layer: LLM-Pruner's own vendored torch_pruning
MetaPruner on transformers' LlamaForCausalLM, roots = every k_proj (consecutive groups of head_dim: whole KV
heads) and every gate_proj (MLP channels), its hf_rmsnorm_pruner, per-layer (not global) ratios, one step;
importance its MagnitudeImportance(p=2) ("l2", llama3.py's default) or TaylorImportance(param_first, sum) from
gradients of prune_lab's calibration batches (llama3.py uses 10 bookcorpus samples of 64 tokens).
SmolLM2 has 3 KV heads: llama3.py's single ratio (25% of 3 heads = 0.75) removes none and then fails
(torch.cat of an empty list), so the k_proj ratio is 1/3 (one KV head per layer) and the MLP ratio makes up the
rest of 25% of the decoder parameters (ch_sparsity_dict, the MetaPruner's own per-module option). The graph is
traced with use_cache=False (transformers 5's cache object in the output breaks its tracer otherwise).
Results: experiments/results/llm_pruner_smollm2_135m.json (rendered by bench_real.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "results" / "llm_pruner_smollm2_135m.json"
PREFIX = 64
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO))


def import_llm_pruner(root: str):
    """LLMPruner's torch_pruning and hf_llama_pruner without its package __init__ (which imports every model
    family it ships, chatglm's tokenizer needing sentencepiece)."""
    pkg = types.ModuleType("LLMPruner")
    pkg.__path__ = [str(Path(root) / "LLMPruner")]
    sys.modules["LLMPruner"] = pkg
    import LLMPruner.torch_pruning as tp
    from LLMPruner.pruner import hf_llama_pruner
    return tp, hf_llama_pruner


def prune(tp, llama_pruner, model, importance: str, batches, attn_ratio: float, mlp_ratio: float):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(True)
    layers = model.model.layers
    imp = llama_pruner.MagnitudeImportance(p=2) if importance == "l2" else \
        llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first")
    pruner = tp.pruner.MetaPruner(
        model, batches[0][:2, :8], importance=imp, global_pruning=False, iterative_steps=1, ch_sparsity=mlp_ratio,
        ch_sparsity_dict={**{lay.self_attn.k_proj: attn_ratio for lay in layers if attn_ratio},
                          **{lay.mlp.gate_proj: mlp_ratio for lay in layers}},
        ignored_layers=[], channel_groups={},
        consecutive_groups={lay.self_attn.k_proj: lay.self_attn.head_dim for lay in layers if attn_ratio},
        customized_pruners={LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner}, root_module_types=None,
        root_instances=[lay.self_attn.k_proj for lay in layers if attn_ratio] + [lay.mlp.gate_proj for lay in layers])
    model.zero_grad()
    if importance == "taylor":
        for b in batches:
            (model(b, labels=b).loss / len(batches)).backward()
    pruner.step()
    for lay in layers:                           # llama3.py's attribute updates, + transformers 5's GQA factor
        att = lay.self_attn
        q_heads, kv_heads = att.q_proj.out_features // att.head_dim, att.k_proj.out_features // att.head_dim
        att.num_heads, att.num_key_value_heads = q_heads, kv_heads
        if q_heads % kv_heads:
            raise RuntimeError(f"{q_heads} query heads over {kv_heads} KV heads after pruning")
        att.num_key_value_groups = q_heads // kv_heads
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    del pruner
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm-pruner", default="/work/ext/LLM-Pruner", help="a checkout of LLM-Pruner")
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--ratio", type=float, default=0.25, help="of the decoder attention+MLP parameters")
    ap.add_argument("--attn-ratio", type=float, default=0.34,
                    help="k_proj ratio: 0.34 of 3 KV heads = one head; 0: MLP channels only (k_proj not a root)")
    ap.add_argument("--rev", default=None, help="the checkout's commit, when it is not a git work tree")
    ap.add_argument("--only", default=None, help="comma-separated importances: l2, taylor")
    ap.add_argument("--windows", type=int, default=None)
    args = ap.parse_args()
    import copy
    import importlib.metadata as md

    import torch
    from peer_torch_pruning import decoder_linear_params, prune_lab_inputs, shapes

    from prune_lab.eval.ppl import perplexities
    tp, llama_pruner = import_llm_pruner(args.llm_pruner)
    rev = os.popen(f"git -C {args.llm_pruner} rev-parse --short HEAD 2>/dev/null").read().strip() or args.rev
    versions = {"llm_pruner": rev, "torch": torch.__version__, "transformers": md.version("transformers")}
    torch.manual_seed(0)
    _, dense, batches, test = prune_lab_inputs(args.model)
    before = decoder_linear_params(dense)

    def ppl(m) -> dict:
        got = perplexities(m, test, 256, 16, args.windows, [PREFIX], progress=False)
        return {"ppl": got[None], f"ppl@{PREFIX}": got[PREFIX]}

    # the MLP ratio that makes 25% of the decoder: measured on a copy (magnitude, the shapes only)
    attn_removed = 0
    if args.attn_ratio:
        probe = prune(tp, llama_pruner, copy.deepcopy(dense), "l2", batches, args.attn_ratio, 0.0)
        attn_removed = before - decoder_linear_params(probe)
        del probe
    mlp_params = sum(lay.mlp.gate_proj.weight.numel() * 3 for lay in dense.model.layers)
    mlp_ratio = (args.ratio * before - attn_removed) / mlp_params
    rows = {r["setting"]: r for r in json.loads(OUT.read_text())} if OUT.exists() else {}
    for importance in args.only.split(",") if args.only else ["l2", "taylor"]:
        model = copy.deepcopy(dense)
        row = {"setting": f"LLM-Pruner llama3.py block-wise, {importance}, {round(args.ratio * 100)}%"
                          + ("" if args.attn_ratio else ", MLP only (no k_proj root)"),
               "versions": versions, "attn_ratio": args.attn_ratio, "mlp_ratio": mlp_ratio,
               "load": round(os.getloadavg()[0], 2), "windows": args.windows or "all"}
        start = time.time()
        try:
            prune(tp, llama_pruner, model, importance, batches, args.attn_ratio, mlp_ratio)
            row["prune_s"] = round(time.time() - start, 1)
            after = decoder_linear_params(model)
            row |= {"shapes": shapes(model), "decoder_params_removed": before - after,
                    "decoder_ratio": (before - after) / before,
                    "removed": f"{(before - after) / 1e6:.2f}M ({(before - after) / before:.3f}); shapes {shapes(model)}"}
            row |= ppl(model.eval())
        except Exception as e:               # noqa: BLE001  the exact error is the result
            row |= {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:600],
                    "traceback": traceback.format_exc()[-3000:]}
        row["seconds"] = round(time.time() - start, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows[row["setting"]] = row
        OUT.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
        del model


if __name__ == "__main__":
    main()
