"""A released structured pruner in prune_lab's protocol (not a test): Torch-Pruning (PyPI `torch-pruning`,
installed OUTSIDE the repo; nothing of its code is here) on SmolLM2-135M at 25%, evaluated with prune_lab's
PPL function on the same token ids as experiments/bench_real.py.

    pip install --no-deps --target /work/tp-pkg torch-pruning==1.6.1
    OMP_NUM_THREADS=2 python experiments/peer_torch_pruning.py [--tp-path /work/tp-pkg] [--only name,...]

The model comes from prune_lab's own loader (`model=smollm2_135m`: the GGUF conversion, from the conversion
cache), the calibration batches and the test stream from prune_lab's calibration and TokenStreams exactly as
the CLI builds them (64 x 256 train tokens, seed 0; wiki-vital-en test, 256-token windows, all 216 and the
first 64 from one pass). Settings, after Torch-Pruning's LLM example (examples/LLMs/prune_llm.py: BasePruner,
whole heads (prune_num_heads, no head dims), lm_head ignored, round_to=4, per-layer (not global) ratios):
- "example": the example's recipe as released: GroupMagnitudeImportance(p=2, mean), pruning_ratio = head
  ratio = 0.25 -- it also prunes the hidden size (the residual stream) by 25%;
- "heads+mlp, magnitude": the same, but o_proj / down_proj / the embedding are ignored roots, so the hidden
  size is kept and only heads and MLP channels go (what prune_lab removes);
- "heads+mlp, taylor": that, with GroupTaylorImportance from gradients of prune_lab's calibration batches.
Results: experiments/results/torch_pruning_<model>.json (smollm2_135m's rendered by bench_real.py); an exception is
recorded exactly (type and first line) as the row's error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
PREFIX = 64
SETTINGS = ["example", "heads+mlp, magnitude", "heads+mlp, taylor"]


def prune_lab_inputs(model_name: str):
    """(loader, calibration batches, test stream) exactly as the CLI builds them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from prune_lab import schema
    from prune_lab.data import Calibration, TokenStreams
    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "prune_lab" / "conf")):
        job = compose(config_name="config", overrides=[f"model={model_name}"])
    loader = instantiate(job.model)
    model, tok = loader.load()
    ds, streams = instantiate(job.data), TokenStreams(tok)
    cal = job.calibration
    batches = Calibration(cal.n_samples, cal.seq_len, cal.batch_size, cal.split).batches(
        streams(ds, cal.split), job.seed)
    return loader, model, batches, streams(ds, "test")


def log(msg: str) -> None:
    print(f"[peer_torch_pruning] {msg}", flush=True)


def decoder_linear_params(model) -> int:
    import torch
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n)


def shapes(model) -> dict:
    layers = model.model.layers
    return {"hidden": model.config.hidden_size,
            "q_out": sorted({lay.self_attn.q_proj.out_features for lay in layers}),
            "kv_out": sorted({lay.self_attn.k_proj.out_features for lay in layers}),
            "mlp": sorted({lay.mlp.gate_proj.out_features for lay in layers})}


class GraphTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise GraphTimeout("alarm")


def prune(tp, model, setting: str, batches, ratio: float, graph_timeout: int = 0):
    import signal
    cfg = model.config
    num_heads, ignored = {}, [model.lm_head]
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
            if setting != "example":
                ignored.append(m.o_proj)
        if name.endswith("mlp") and setting != "example":
            ignored.append(m.down_proj)
    if setting != "example":
        ignored.append(model.model.embed_tokens)
    if setting.endswith("taylor"):
        importance = tp.importance.GroupTaylorImportance()
        model.zero_grad()
        for b in batches:                      # mean gradient over prune_lab's calibration batches
            out = model(b, labels=b)
            (out.loss / len(batches)).backward()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(graph_timeout)                  # 0: no limit
    start = time.time()
    try:
        pruner = tp.pruner.BasePruner(
            model, example_inputs=batches[0][:1, :16], importance=importance, global_pruning=False,
            output_transform=lambda x: x.logits, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    except GraphTimeout:
        raise TimeoutError(f"tp.pruner.BasePruner(...) did not return within {graph_timeout} s (building its "
                           f"dependency graph: DependencyGraph.get_all_groups -> get_pruning_group -> "
                           f"_fix_dependency_graph_non_recursive still looping)") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    log(f"{setting}: BasePruner built in {time.time() - start:.0f} s")
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    # the attributes the example updates after pruning (heads and widths now read from the weights)
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            q_heads = m.q_proj.out_features // m.head_dim
            kv_heads = m.k_proj.out_features // m.head_dim
            cfg.num_attention_heads = q_heads
            cfg.num_key_value_heads = kv_heads if gqa else q_heads
            if q_heads % max(kv_heads, 1):
                raise RuntimeError(f"{name}: {q_heads} query heads over {kv_heads} KV heads (not a whole GQA ratio)")
            m.num_key_value_groups = q_heads // kv_heads
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    del pruner
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp-path", default="/work/tp-pkg", help="where torch-pruning is installed (pip --target)")
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--only", default=None, help="comma-separated settings")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--graph-timeout", type=int, default=900,
                    help="seconds allowed for Torch-Pruning to build its dependency graph (0: no limit)")
    args = ap.parse_args()
    sys.path.insert(0, args.tp_path)
    sys.path.insert(0, str(REPO))
    import copy
    import importlib.metadata as md

    import torch
    import torch_pruning as tp

    from prune_lab.eval.ppl import perplexities
    torch.manual_seed(0)
    _, dense, batches, test = prune_lab_inputs(args.model)
    versions = {"torch_pruning": getattr(tp, "__version__", None) or md.version("torch-pruning"),
                "torch": torch.__version__, "transformers": md.version("transformers")}

    def ppl(m) -> dict:
        got = perplexities(m, test, 256, 16, args.windows, [PREFIX], progress=False)
        return {"ppl": got[None], f"ppl@{PREFIX}": got[PREFIX]}

    out = RESULTS / f"torch_pruning_{args.model}.json"
    rows = {r["setting"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    before = decoder_linear_params(dense)
    for setting in args.only.split(",") if args.only else SETTINGS:
        model = copy.deepcopy(dense)
        row = {"setting": f"Torch-Pruning {setting}, {round(args.ratio * 100)}%", "versions": versions,
               "load": round(os.getloadavg()[0], 2), "windows": args.windows or "all"}
        start = time.time()
        try:
            prune(tp, model, setting, batches, args.ratio, args.graph_timeout)
            row["prune_s"] = round(time.time() - start, 1)
            after = decoder_linear_params(model)
            row |= {"shapes": shapes(model), "decoder_params_removed": before - after,
                    "decoder_ratio": (before - after) / before,
                    "params_total": sum(p.numel() for p in model.parameters()),
                    "removed": f"{(before - after) / 1e6:.2f}M ({(before - after) / before:.3f}) decoder linear; "
                               f"shapes {shapes(model)}"}
            row |= ppl(model.eval())
            if "dense" not in rows:           # the check of this load, once something was pruned
                rows["dense"] = {"setting": "dense", **ppl(dense), "versions": versions}
        except Exception as e:               # noqa: BLE001  the exact error is the result
            row |= {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:600],
                    "traceback": traceback.format_exc()[-3000:]}
        row["seconds"] = round(time.time() - start, 1)
        row["graph_timeout_s"] = args.graph_timeout
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows[row["setting"]] = row
        out.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
        del model


if __name__ == "__main__":
    main()
