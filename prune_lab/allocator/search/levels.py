"""The level database of allocator=search: per decoder layer and part (attention, MLP) a ladder of
pruning levels, each with its units chosen and its consumer projection refit exactly as
reconstruct=obs does (greedy structured OBS order, then least squares on the kept columns), from one
engine pass on the dense path. Weights are kept on CPU, or (`Database.store`, allocator.database=disk)
in one safetensors file per part; a candidate is assembled by swapping them in (read from the file).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...core.adapter import LayerView
from ...engine import LayerMethod
from ...engine.stats import output_error
from ...reconstruct import refit


@dataclass
class Part:
    """One layer part: `units` GQA groups (attn) or MLP channels, removed `step` units per level."""
    layer: int
    kind: str                 # "attn" | "mlp"
    units: int
    step: int
    unit_cost: int            # parameters per unit
    searchable: bool = True   # outside allocator.layer_start/layer_end: level 0 only
    counts: tuple[int, ...] | None = None   # units removed at each level, when not steps (counts[0] = 0)
    droppable: bool = False   # allocator.remove_empty_layers: level top + 1 = the part gone whole
    alone: bool = True        # may go without the other part of its layer (not OPT's attention)

    @property
    def top(self) -> int:
        """The highest level: every level keeps at least one unit."""
        if not self.searchable:
            return 0
        return len(self.counts) - 1 if self.counts else (self.units - 1) // self.step

    @property
    def drop(self) -> int:
        """The level past the ladder: every unit removed (the layer's whole attention or MLP)."""
        return self.top + 1

    def removed(self, level: int) -> int:
        if self.droppable and level > self.top:
            return self.units
        return self.counts[level] if self.counts else min(level * self.step, self.units - 1)

    @property
    def step_cost(self) -> int:
        return self.step * self.unit_cost


def ladder(views: list[LayerView], mlp_step: float, multiple_of: int, eligible: np.ndarray,
           droppable: bool = False) -> list[Part]:
    """Parts in layer order (attn, mlp of layer 0, then layer 1, ...). Attention: one GQA group per
    level (all counts); MLP: round(mlp_step * width) channels per level, on multiples of multiple_of.
    `droppable`: each eligible part gets the drop level (that part of the layer removed whole; an attention
    that cannot run without heads, OPT's, only with its MLP: the layer removed)."""
    parts = []
    for v in views:
        step = max(multiple_of, int(round(mlp_step * v.mlp.width / multiple_of)) * multiple_of)
        ok = bool(eligible[v.index])
        parts.append(Part(v.index, "attn", v.attn.num_kv_heads, 1, v.attn.group_cost, ok, droppable=droppable and ok,
                          alone=v.attn_can_empty))
        parts.append(Part(v.index, "mlp", v.mlp.width, step, v.mlp.channel_cost, ok, droppable=droppable and ok))
    return parts


def removed_params(parts: list[Part], levels: np.ndarray) -> int:
    return int(sum(p.removed(int(lv)) * p.unit_cost for p, lv in zip(parts, levels)))


def _nbytes(levels) -> int:
    return sum(w.numel() * w.element_size() for w in levels)


class OnDisk:
    """One part's level weights in a safetensors file (level i under the name "i"), read when accessed;
    the last `held` levels read stay in memory (a search's candidates mostly share the parent's level
    of a part, so assembling one reads only the parts it changes)."""

    def __init__(self, path: Path, levels: list[torch.Tensor], held: int = 2):
        from safetensors.torch import save_file
        save_file({str(i): w.contiguous() for i, w in enumerate(levels)}, str(path))
        self.path, self.n, self.held = path, len(levels), held
        self.nbytes = _nbytes(levels)
        self.reads = 0
        self._recent: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, level: int) -> torch.Tensor:
        level = int(level)
        if level in self._recent:
            self._recent[level] = self._recent.pop(level)          # most recent last
            return self._recent[level]
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt") as f:
            w = f.get_tensor(str(level))
        self.reads += 1
        self._recent[level] = w
        while len(self._recent) > self.held:
            self._recent.pop(next(iter(self._recent)))
        return w


@dataclass
class Database:
    """Per part: the greedy removal order of its units, the refit weight of every level and its output
    error tr((W - W_l) G (W - W_l)ᵀ) on the calibration inputs (G their Gram), over the part's dense
    output energy tr(W G Wᵀ)."""
    parts: list[Part]
    order: list[list[int]] = field(default_factory=list)
    weights: list[list[torch.Tensor]] = field(default_factory=list)
    errors: list[list[float]] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    store: Path | None = None     # a folder: the levels on disk, one file per part

    @property
    def nbytes(self) -> int:
        return sum(ws.nbytes if isinstance(ws, OnDisk) else _nbytes(ws) for ws in self.weights)


class LevelBuilder(LayerMethod):
    """Engine method: the Gram of o_proj / down_proj inputs -> order + refit per level. On the dense
    path (`at` None: one stage per layer, C = G), or on the pruned path of the levels `at` (the
    search's second round, Týr's error accumulation): two streams, attention then MLP, every level
    refit as reconstruct=lstsq refits it (W₀·C and the residual drift), the layer then left at its
    level in `at` so the next layer sees that shape's pruned inputs."""

    needs_gram = True

    def __init__(self, db: Database, damp: float, chunk: int = 0, at: np.ndarray | None = None):
        self.db, self.damp, self.chunk = db, damp, chunk
        self.at = None if at is None else np.asarray(at)
        self.needs_cross = self.needs_residual = self.at is not None
        self.by_key = {(p.layer, p.kind): i for i, p in enumerate(db.parts)}
        db.order = [[] for _ in db.parts]
        db.weights = [[] for _ in db.parts]
        db.errors = [[] for _ in db.parts]
        db.energy = [0.0 for _ in db.parts]

    def stages(self, view):
        return [["attn.o", "mlp.down"]] if self.at is None else [["attn.o"], ["mlp.down"]]

    @torch.no_grad()
    def apply(self, index: int, view: LayerView, stats) -> dict:
        a = view.attn
        for kind, lin, path, width in (("attn", a.o, "attn.o", a.group_size * a.head_dim),
                                       ("mlp", view.mlp.down, "mlp.down", 1)):
            if path not in stats:
                continue
            i = self.by_key[(index, kind)]
            part = self.db.parts[i]
            g, wc, energy = refit.augmented(stats[path], lin.weight, None, False)
            energy, drift = float(energy), refit.augmented_drift(stats[path], False)
            k = part.removed(part.top)
            chunk = self.chunk or max(1, math.ceil(k / 64))
            if k and self.at is None:
                order = refit.obs_select(lin.weight.double(), g, part.units, width, k, self.damp, chunk)[0]
            elif k:                              # as reconstruct=obs selects: on the full refit's weights
                order = refit.obs_on_refit(wc, g, drift, part.units, width, k, self.damp, chunk, adaptive=True)
            else:
                order = []
            self.db.order[i] = order
            levels, errors = [], []
            for level in range(part.top + 1):
                cut = torch.as_tensor(sorted(order[:part.removed(level)]), dtype=torch.long, device=g.device)
                keep = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
                keep[refit.block_columns(cut, width)] = False
                new = lin.weight.detach().clone() if level == 0 else \
                    refit.lstsq(wc, g, keep.nonzero().squeeze(1), self.damp, drift).to(lin.weight.dtype)
                levels.append(new.cpu())
                errors.append(output_error(new, g, wc, energy) / energy if energy > 0 else 0.0)
            if part.droppable:                   # a zero o_proj / down_proj: the block gives zero (its bias)
                levels.append(torch.zeros_like(lin.weight, device="cpu"))
                errors.append(1.0)
            if self.at is not None:
                lin.weight.copy_(levels[int(self.at[i])].to(lin.weight.device))
            if self.db.store is not None:
                levels = OnDisk(self.db.store / f"part{i}.safetensors", levels)
            self.db.weights[i], self.db.errors[i], self.db.energy[i] = levels, errors, energy
        return {}
