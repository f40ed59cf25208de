"""Reconstruction of the consumer projections (twin of conf/reconstruct/*.yaml).

After the allocator has planned which units go, one engine pass walks the decoder: per layer the
o_proj (attention: whole GQA groups = blocks of G·head_dim columns) and down_proj (MLP channels)
are refit on calibration statistics so that the layer's output changes as little as possible:
  none   nothing (plain slicing, no engine pass)
  bias   FLAP-style: b += W E[x] - W_K E[x~_K]  (a bias is added to o_proj/down_proj where missing)
  lstsq  W'_K = W C[:, K] (G_KK + λI)⁻¹ on the pruned path (see refit.py)
  obs    structured OBS picks *which* units inside each layer (the allocator's counts), then lstsq;
         obs_block units per step (0: automatic, ceil(units/64) halved where they interact; 1: exact greedy)
With producers=true (lstsq/obs), every layer after the first modified one also refits the linears that
read the drifted pruned-path input, q/k/v before o_proj and gate/up before down_proj, towards their dense
outputs with a ridge that pulls towards the dense weights (refit.anchored_lstsq); two more stages a layer.
The model keeps its dense shape with the removed columns zeroed (the masked model); the executor
then slices. The tensor math is in refit.py. The returned plan holds the units actually removed.
"""
from __future__ import annotations

import math

import torch

from ..core.executor import ensure_bias, zero_units
from ..core.plan import PruningPlan
from ..engine import LayerMethod, linear_at
from ..engine.stats import output_error
from ..errors import PruneLabError
from . import refit

MODES = ("none", "bias", "lstsq", "obs")
AUTO_STEPS = 64      # reconstruct.obs_block=0: at most ceil(units/64) units per OBS step, halved where they interact


class PlanRefit(LayerMethod):
    """The LayerMethod of a reconstruction: stages [attn.o], [mlp.down] of every layer the plan touches."""

    needs_gram, needs_cross = True, True

    def __init__(self, plan: PruningPlan, mode: str, damp: float, fit_bias: bool, obs_block: int,
                 residual: bool = False, producers: bool = False):
        self.plan, self.mode, self.damp, self.obs_block = plan, mode, damp, obs_block
        touched = [*plan.attn, *plan.mlp, *plan.layers, *plan.attn_blocks, *plan.mlp_blocks]
        # the streams are one up to the first modified layer: no drift for a producer refit to correct
        self.producers_from = min(touched) if producers and touched else None
        self.with_bias = mode == "bias" or fit_bias
        self.needs_residual = residual and mode in ("lstsq", "obs")
        self.removed: dict[str, dict[int, list[int]]] = {"attn": {}, "mlp": {}}
        self.rows: list[dict] = []

    def stages(self, view) -> list[list[str]]:
        i, plan = view.index, self.plan
        start, alive = self.producers_from, i not in plan.layers
        attn_drift = start is not None and alive and i > start and i not in plan.attn_blocks
        # the MLP input drifts from the first modified layer's attention on
        mlp_drift = start is not None and alive and i not in plan.mlp_blocks and \
            (i > start or (i == start and (i in plan.attn or i in plan.attn_blocks)))
        attn_in = ["attn.q", "attn.k", "attn.v"] if attn_drift else None
        mlp_in = ["mlp.gate", "mlp.up"][view.mlp.gate is None:] if mlp_drift else None
        return [s for s, on in ((attn_in, True), (["attn.o"], i in plan.attn), (mlp_in, True),
                                (["mlp.down"], i in plan.mlp)) if s and on]

    @torch.no_grad()
    def apply(self, index: int, view, stats) -> dict:
        if not stats.keys() & {"attn.o", "mlp.down"}:
            return self.refit_producers(index, view, stats)
        (path, s), = stats.items()
        kind = path.split(".")[0]
        if kind == "attn":
            lin, n_blocks, width = view.attn.o, view.attn.num_kv_heads, view.attn.group_size * view.attn.head_dim
        else:
            lin, n_blocks, width = view.mlp.down, view.mlp.width, 1
        if s.count < lin.in_features:
            raise PruneLabError(f"calibration too short to estimate the {lin.in_features}x{lin.in_features} "
                                f"Gram of layer {index} {path} ({s.count} tokens): raise calibration.n_samples")
        units = (self.plan.attn if kind == "attn" else self.plan.mlp)[index]
        g, wc, energy = refit.augmented(s, lin.weight, lin.bias, self.with_bias)
        drift = refit.augmented_drift(s, self.with_bias)
        w = lin.weight.double()
        if self.with_bias:
            b = lin.bias.double() if lin.bias is not None else torch.zeros_like(w[:, 0])
            w = torch.cat([w, b[:, None]], 1)
        if self.mode == "obs":
            block = self.obs_block or max(1, math.ceil(len(units) / AUTO_STEPS))
            units = refit.obs_on_refit(wc, g, drift, n_blocks, width, len(units), self.damp, block,
                                       adaptive=self.obs_block == 0)
        cut = refit.block_columns(torch.as_tensor(sorted(units), device=w.device), width)
        keep_mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        keep_mask[cut] = False
        keep = keep_mask.nonzero().squeeze(1)
        masked = w.clone()
        masked[:, cut] = 0
        if self.mode == "bias":
            new = masked.clone()
            new[:, -1] = w[:, -1] + refit.bias_shift(w[:, :-1], keep[:-1], s.dense_sum / s.count, s.sum / s.count)
        else:
            new = refit.lstsq(wc, g, keep, self.damp, drift)
        scale = max(float(energy), 1e-30)
        row = {"layer": index, "kind": kind, "removed": len(units),
               "err_before": output_error(masked, g, wc, energy) / scale,
               "err_after": output_error(new, g, wc, energy) / scale}
        n_in = lin.in_features
        lin.weight.copy_(new[:, :n_in].to(lin.weight.dtype))
        if self.with_bias:
            ensure_bias(lin)
            lin.bias.copy_(new[:, n_in].to(lin.bias.dtype))
        self.removed[kind][index] = sorted(int(u) for u in units)
        self.rows.append(row)
        return row

    @torch.no_grad()
    def refit_producers(self, index: int, view, stats) -> dict:
        """q/k/v or gate/up (one shared input) towards their dense outputs: refit.anchored_lstsq."""
        paths = list(stats)
        lins = [linear_at(view, p) for p in paths]
        g = stats[paths[0]].gram.double()          # the linears share one input, one Gram
        wcs = [stats[p].w_cross(lin.weight) for p, lin in zip(paths, lins)]
        energies = [stats[p].w_energy(lin.weight) for p, lin in zip(paths, lins)]
        new = refit.anchored_lstsq(wcs, g, [lin.weight for lin in lins], self.damp)
        scale = max(float(sum(energies)), 1e-30)
        before = sum(output_error(lin.weight, g, wc, e) for lin, wc, e in zip(lins, wcs, energies))
        after = sum(output_error(w, g, wc, e) for w, wc, e in zip(new, wcs, energies))
        for lin, w in zip(lins, new):
            lin.weight.copy_(w.to(lin.weight.dtype))
        row = {"layer": index, "kind": paths[0].split(".")[0] + "_in", "removed": 0,
               "err_before": before / scale, "err_after": after / scale}
        self.rows.append(row)
        return row

    def final_plan(self) -> PruningPlan:
        return PruningPlan(self.removed["attn"], self.removed["mlp"], self.plan.layers, self.plan.target_params,
                           self.plan.attn_blocks, self.plan.mlp_blocks)


class Reconstruct:
    """reconstruct=<mode>: refits the consumer projections of a plan in one engine pass."""

    def __init__(self, mode: str = "obs", damp: float = 0.01, fit_bias: bool = False, obs_block: int = 0,
                 residual: bool = True, obs_chunk: int | None = None, producers: bool = False):
        if mode not in MODES:
            raise PruneLabError(f"reconstruct.mode must be one of {', '.join(MODES)}, got '{mode}'")
        if not 0 < damp < 1:    # from 1 up the ridge (towards 0) outweighs the data (experiments/reconstruct_damp.py)
            raise PruneLabError(f"reconstruct.damp must be in (0, 1) (Gram damping relative to its mean diagonal; "
                                f"from 1 up the refit is worse than reconstruct=none), got {damp}")
        if obs_chunk is not None:
            raise PruneLabError(f"reconstruct.obs_chunk is now reconstruct.obs_block (units removed per OBS step, "
                                f"0 = automatic and adaptive, 1 = the exact greedy): use reconstruct.obs_block={obs_chunk}")
        if obs_block < 0:
            raise PruneLabError(f"reconstruct.obs_block must be >= 0 (0 = automatic, 1 = exact greedy), got {obs_block}")
        self.mode, self.damp, self.fit_bias, self.obs_block = mode, float(damp), fit_bias, obs_block
        if producers and mode not in ("lstsq", "obs"):
            raise PruneLabError(f"reconstruct.producers=true refits q/k/v and gate/up next to the lstsq/obs refit "
                                f"of o_proj/down_proj: use reconstruct=obs or lstsq, not {mode}")
        self.residual, self.producers = residual, producers

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def adds_biases(self) -> str | None:
        """What adds o_proj/down_proj biases (named for messages), or None."""
        if self.mode == "bias" or (self.enabled and self.fit_bias):
            return "reconstruct=bias" if self.mode == "bias" else f"reconstruct={self.mode} with fit_bias=true"
        return None

    def check_calibration(self, n_tokens: int, views) -> None:
        """Fail before any heavy work when the calibration cannot estimate the largest Gram of a refit."""
        need = max(max(v.attn.o.in_features, v.mlp.down.in_features) for v in views)
        if self.enabled and n_tokens < need:
            raise PruneLabError(f"reconstruct={self.mode} needs at least {need} calibration tokens to estimate "
                                f"the Gram matrices, got {n_tokens}: raise calibration.n_samples or seq_len")

    def __call__(self, model, plan: PruningPlan, batches, engine) -> tuple[PruningPlan, list[dict]]:
        """Refit in place (masked form) and return (the plan actually removed, per-layer error rows)."""
        if not self.enabled or not (plan.attn or plan.mlp):     # e.g. allocator=depth: whole layers only
            return plan, []
        # removed layers are the identity, an emptied block (nothing kept to refit) gives zero on the pruned path
        zero_units(model, PruningPlan(layers=plan.layers, attn_blocks=plan.attn_blocks, mlp_blocks=plan.mlp_blocks))
        method = PlanRefit(plan, self.mode, self.damp, self.fit_bias, self.obs_block, self.residual, self.producers)
        engine.walk(model, batches, method)
        return method.final_plan(), method.rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for kind in ("attn", "mlp"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            out[f"{kind}_err_before"] = sum(r["err_before"] for r in sel) / len(sel)
            out[f"{kind}_err_after"] = sum(r["err_after"] for r in sel) / len(sel)
    return out
