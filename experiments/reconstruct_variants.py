"""Reconstruction variants on lab-llama through the Python API (one process per call keeps each run short).

    PYTHONPATH=. python experiments/reconstruct_variants.py IMP:ALLOC:RATIO:MODE:PROPAGATE:DAMP:FLAGS ...

IMP taylor|obs (unit scores, cached under /tmp/eng), ALLOC global|uniform, MODE none|bias|lstsq|obs,
PROPAGATE pruned|dense, FLAGS 0 plain, 1 fit_bias, 2 residual, 3 both. Default calibration (64x256 train
windows, seed 0), PPL on the whole wiki-vital test split, fp32, CPU. Prints one JSON line per variant.
"""
import copy, sys, time, torch, json, os
from prune_lab.model import EmbeddedModel
from prune_lab.data import WikiVital, Calibration, TokenStreams
from prune_lab.importance import Taylor
from prune_lab.allocator import Global, Uniform
from prune_lab.core.adapter import layer_views
from prune_lab.reconstruct import Reconstruct, summarize
from prune_lab.engine import Engine
from prune_lab.core.executor import apply_plan
from prune_lab.eval.ppl import perplexity
from prune_lab.artifacts.scores import load_scores, save_scores
from prune_lab.importance import ObsError

torch.manual_seed(0); torch.set_num_threads(int(os.environ.get("THREADS", "1")))
model, tok = EmbeddedModel(device="cpu").load()
ds = WikiVital(); streams = TokenStreams(tok)
batches = Calibration().batches(streams(ds, "train"), 0)
test = streams(ds, "test")
def get_scores(imp):
    os.makedirs("/tmp/eng", exist_ok=True)
    p = f"/tmp/eng/{imp}_scores.safetensors"
    if os.path.exists(p): return load_scores(p)
    crit = Taylor() if imp == "taylor" else ObsError(weighted=imp == "obs")
    s = crit(model, batches); save_scores(p, s); return s
views = layer_views(model)
variants = [v.split(":") for v in sys.argv[1:]]   # alloc:ratio:mode:propagate:damp:fit_bias
for imp, alloc, ratio, mode, prop, damp, fb in variants:
    scores = get_scores(imp)
    m = copy.deepcopy(model)
    A = Global(float(ratio)) if alloc == "global" else Uniform(float(ratio))
    plan = A(scores, layer_views(m))
    t = time.time()
    R = Reconstruct(mode, float(damp), fit_bias=fb in ("1", "3"), residual=fb in ("2", "3"))
    plan2, rows = R(m, plan, batches, Engine("cpu", propagate=prop, progress=False))
    te = time.time() - t
    apply_plan(m, plan2)
    ppl = perplexity(m, test, progress=False)
    print(json.dumps({"v": [imp, alloc, ratio, mode, prop, damp, fb], "ppl": round(ppl, 2), "engine_s": round(te, 1), **{k: round(v, 4) for k, v in summarize(rows).items()}}), flush=True)
