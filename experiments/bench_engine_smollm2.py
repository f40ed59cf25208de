"""Row (smollm2) of experiments/bench_engine.py: the reconstruct=obs pass on SmolLM2-135M (model=smollm2_135m,
the default calibration, 64 x 256 tokens), old revision and this tree side by side in one process, on the
first --layers decoder layers (the old engine takes ~50 s a layer on 2 shared cores; the whole 30-layer pass
is not run here), with two fixed-count plans near the default job's (its global 25% plan removes 13824 of
46080 MLP channels and 9 of 90 KV groups: ~461 channels a layer): MLP only, and MLP + 1 KV group a layer
(--only "MLP only, 461 channels/layer" for the first alone)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from bench_engine import OLD, REPO, emit, old_package, sub, timed


def smollm2_batches():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from prune_lab import schema
    from prune_lab.data import Calibration, TokenStreams
    schema.register()
    with initialize_config_dir(config_dir=str(REPO / "prune_lab" / "conf"), version_base=None):
        job = compose(config_name="config", overrides=["model=smollm2_135m", "model.device=cpu"])
    model, tok = instantiate(job.model).load()
    cal = job.calibration
    batches = Calibration(cal.n_samples, cal.seq_len, cal.batch_size, cal.split).batches(
        TokenStreams(tok)(instantiate(job.data), cal.split), job.seed)
    return model, batches


def bench_smollm2(work: Path, layers: int, rounds: int, only: list[str] | None = None) -> None:
    import prune_lab
    old = old_package(OLD, work)
    model, batches = smollm2_batches()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    plans = {"MLP only, 461 channels/layer": (0, 461), "1 KV group + 461 channels/layer": (1, 461)}
    plans = {k: v for k, v in plans.items() if not only or k in only}

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b)
    forward()
    for r in range(rounds):
        for plan_name, (groups, channels) in plans.items():
            fwd = timed(forward)[0]
            for name, pkg in (("old", old), ("new", prune_lab)):
                plan = sub(pkg, "plan").PruningPlan(
                    attn={i: list(range(groups)) for i in range(layers)} if groups else {},
                    mlp={i: list(range(0, 2 * channels, 2)) for i in range(layers)})
                m = copy.deepcopy(model)
                rec = sub(pkg, "reconstruct").Reconstruct("obs")
                secs, (_, rows) = timed(lambda: rec(m, plan, batches, sub(pkg, "engine").Engine("cpu", progress=False)))
                after = timed(forward)[0]
                emit(work, "smollm2", {"round": r, "plan": plan_name, "variant": name, "layers": layers,
                                       "pass_s": secs, "forward_s": (fwd + after) / 2,
                                       "err_after": sum(x["err_after"] for x in rows) / len(rows)})
                fwd = after
