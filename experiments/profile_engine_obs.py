"""Profile (not a test) of one lab-llama `reconstruct=obs` pass: where the time goes (issue 18).

    PYTHONPATH=. OMP_NUM_THREADS=2 flock /tmp/prune_lab_heavy.lock .venv/bin/py-spy record -r 100 -f raw \\
        -o /tmp/obs_profile.txt -- .venv/bin/python experiments/profile_engine_obs.py run [--plan mlp|uniform]
    .venv/bin/python experiments/profile_engine_obs.py shares /tmp/obs_profile.txt

run: the default calibration (64 x 256), one dense calibration forward (the reference), then one
reconstruct=obs pass (obs_block=0, residual on) on bench_engine.py's plan (mlp: 245 MLP channels a layer;
uniform: 1 KV group + 192 channels a layer); prints both wall times.
shares: the py-spy raw (collapsed) stacks bucketed by the innermost frame that names a part of the pass
(forward of the dense model, the pass's layer forwards, Gram/statistics accumulation, (G+λI)⁻¹, the OBS
selection, the lstsq refit, the error records, the dense layer copy, the down_proj replay, other).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (function name as py-spy prints it, file suffix) -> bucket; the innermost match along a stack wins
BUCKETS = [
    ("obs_select", "refit.py", "OBS selection (block downdates, block errors)"),
    ("_block_errors", "refit.py", "OBS selection (block downdates, block errors)"),
    ("_inverse_root", "refit.py", "OBS selection (block downdates, block errors)"),
    ("ridge_inverse", "refit.py", "(G+λI)⁻¹ (Cholesky + cholesky_solve against I)"),
    ("lstsq", "refit.py", "lstsq refit of the kept columns"),
    ("output_error", "stats.py", "error records (err_before/err_after)"),
    ("augmented", "refit.py", "W₀·C / G to float64 (augmented)"),
    ("stats", "stats.py", "Gram mirror + W₀·C from C (Accumulator.stats)"),
    ("add", "stats.py", "Gram / W₀·C / drift accumulation (Accumulator.add)"),
    ("dense", "stats.py", "dense-path hook (token rows, ||W₀x||²)"),
    ("pruned", "stats.py", "pruned-path hook (token rows)"),
    ("token_rows", "stats.py", "hooks' token rows"),
    ("replay", "layer.py", "down_proj replay"),
    ("deepcopy", "copy.py", "dense layer copy (deepcopy)"),
    ("forward", "bench_forward", "reference: dense calibration forward"),
    ("run", "layer.py", "the pass's layer forwards (excl. hooks)"),
]


def frame_bucket(stack: list[str]) -> str:
    for frame in reversed(stack):                       # leaf first
        name, _, where = frame.partition(" (")
        name = name.rsplit(".", 1)[-1]                   # py-spy prints qualified names (Accumulator.add)
        for fn, suffix, bucket in BUCKETS:
            if name == fn and (suffix in where or suffix == "bench_forward" and "profile_engine_obs" in where):
                return bucket
    return "other (model load, Python, engine bookkeeping)"


def shares(path: str) -> None:
    counts: Counter = Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[frame_bucket(stack.split(";"))] += int(n)
    total = sum(counts.values())
    ref = counts.get("reference: dense calibration forward", 0) / 2   # the warm-up and the timed forward
    pass_total = total - 2 * ref - counts.get("other (model load, Python, engine bookkeeping)", 0)
    print(f"samples {total}; one reference forward {ref:.0f}; pass (bucketed) {pass_total} = {pass_total / max(ref, 1):.2f} forwards\n")
    print("| part of the obs pass | samples | share of the pass | x one forward |\n|---|---|---|---|")
    for bucket, n in counts.most_common():
        if bucket.startswith("reference"):
            continue
        print(f"| {bucket} | {n} | {n / max(pass_total, 1):.1%} | {n / max(ref, 1):.2f} |")


def run(plan_name: str) -> None:
    sys.path.insert(0, str(REPO))
    import prune_lab
    import torch
    assert Path(prune_lab.__file__).resolve().parent == REPO / "prune_lab", prune_lab.__file__
    from prune_lab.core.plan import PruningPlan
    from prune_lab.engine import Engine
    from prune_lab.reconstruct import Reconstruct
    sys.path.insert(0, str(REPO / "experiments"))
    from bench_engine import lab_batches
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    model, batches, _ = lab_batches()
    groups, channels = {"mlp": (0, 245), "uniform": (1, 192)}[plan_name]

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b)
    forward()                                            # warm-up (not bucketed apart from the reference)
    t = time.perf_counter()
    forward()
    fwd = time.perf_counter() - t
    plan = PruningPlan(attn={i: list(range(groups)) for i in range(12)} if groups else {},
                       mlp={i: list(range(channels)) for i in range(12)})
    m = copy.deepcopy(model)
    t = time.perf_counter()
    Reconstruct("obs")(m, plan, batches, Engine("cpu", progress=False))
    secs = time.perf_counter() - t
    print(f"plan {plan_name}: forward {fwd:.2f} s, obs pass {secs:.2f} s, pass / forward {secs / fwd:.2f}x, "
          f"load {__import__('os').getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "shares"])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--plan", default="mlp", choices=["mlp", "uniform"])
    a = ap.parse_args()
    run(a.plan) if a.what == "run" else shares(a.path)
