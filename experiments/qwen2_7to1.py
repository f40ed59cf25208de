"""Benchmark (not a test): does reconstruction hold its relative gain on a Qwen2 with 7:1 GQA and q/k/v bias?

No trained Qwen2 ships here, so this trains a small one briefly on the embedded wiki-vital-en train split
(14 query / 2 KV heads of 16, hidden 224, MLP 640, 6 layers, q/k/v bias as Qwen2 hard-codes; fp32, CPU),
saves it OUTSIDE the repo (default /tmp/qwen2_7to1) as a plain HF directory, then runs the real CLI on it:
`python -m prune_lab model=hf model.path=<dir> model.dtype=float32 reconstruct=none|obs eval.before=true`
(taylor + global or uniform 25%, default calibration, no recovery) and prints the PPL rise over dense of each.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/qwen2_7to1.py [--minutes 10] [--out /tmp/qwen2_7to1]
    OMP_NUM_THREADS=1 .venv/bin/python experiments/qwen2_7to1.py --skip-train --allocator uniform
    OMP_NUM_THREADS=1 .venv/bin/python experiments/qwen2_7to1.py --skip-train --allocator layerwise \
        --extra allocator.distribution=5:5      # half of the removed params from attention: whole 7-head groups
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(out: Path, minutes: float, seq_len: int = 128, batch: int = 16, lr: float = 3e-3) -> dict:
    import torch
    from prune_lab.data import TokenStreams, WikiVital
    from prune_lab.model import RandomModel
    torch.manual_seed(0)
    loader = RandomModel(arch="qwen2", hidden_size=224, num_attention_heads=14, num_key_value_heads=2, head_dim=16,
                         intermediate_size=640, num_hidden_layers=6, device="cpu")
    model, tok = loader.load()
    model.train()
    stream = TokenStreams(tok)(WikiVital(), "train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    start, step, losses = time.time(), 0, []
    budget = minutes * 60
    while time.time() - start < budget:
        frac = (time.time() - start) / budget           # warmup then cosine, on the time budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / 50:.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"steps": step, "tokens": step * batch * seq_len, "final_loss": sum(losses[-50:]) / min(50, len(losses)),
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.time() - start}
    (out / "train.json").write_text(json.dumps(info))
    return info


def cli(out: Path, mode: str, work: Path, allocator: str, extra: list[str]) -> dict:
    run_dir = work / f"run_{allocator}_{mode}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PRUNE_LAB_CACHE=str(work / "cache"),
               PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "prune_lab", "model=hf", f"model.path={out}", "model.dtype=float32",
                    "model.device=cpu", f"reconstruct={mode}", f"allocator={allocator}", "eval.before=true", "output.plots=false",
                    "engine.progress=false", *extra, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, check=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"allocator": allocator, "reconstruct": mode, "plan": m["plan"], "dense": m["dense"]["ppl/data"], "pruned": m["pruned"]["ppl/data"],
            "reconstruct_err": m.get("reconstruct", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen2_7to1"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--allocator", default="global", help="global | uniform | layerwise")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. allocator.distribution=5:5")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.skip_train:
        print(json.dumps(train(a.out, a.minutes)), flush=True)
    rows = [cli(a.out, mode, a.out, a.allocator, a.extra) for mode in ("none", "obs")]
    for r in rows:
        r["rise_pct"] = 100 * (r["pruned"] / r["dense"] - 1)
    rows.append({"recovered_share_of_loss": (rows[0]["pruned"] - rows[1]["pruned"]) / (rows[0]["pruned"] - rows[0]["dense"])})
    (a.out / f"result_{a.allocator}.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
