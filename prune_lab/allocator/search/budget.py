"""The parameter budget over the level ladder: a candidate (one level per part) is feasible when it
removes at most the target and at most one step less (the largest level step of any part), so that
candidates compare at (almost) the same size; the plan is then made exact with single MLP channels.
With droppable parts (allocator.remove_empty_layers) a layer's two parts reach their drop level
together (the layer removed) and leave it together (back to their top levels)."""
from __future__ import annotations

import numpy as np

from .levels import Part, removed_params


class Budget:
    def __init__(self, parts: list[Part], target: int):
        self.parts, self.target = parts, int(target)
        self.top = np.array([p.top for p in parts])
        self.slack = max(p.step_cost for p in parts if p.top > 0)
        self.partner = np.full(len(parts), -1)      # the other part of a droppable layer
        by_layer: dict[int, list[int]] = {}
        for i, p in enumerate(parts):
            if p.droppable:
                by_layer.setdefault(p.layer, []).append(i)
        for pair in by_layer.values():
            if len(pair) == 2:
                self.partner[pair[0]], self.partner[pair[1]] = pair[1], pair[0]

    def droppable_layers(self, levels: np.ndarray) -> np.ndarray:
        """The attention part of every layer that may still be removed."""
        return np.array([i for i, p in enumerate(self.parts) if p.kind == "attn" and self.partner[i] >= 0
                         and levels[i] <= self.top[i]], dtype=int)

    def drop(self, levels: np.ndarray, i: int) -> list[int]:
        """Remove part i's layer (in place); returns both parts."""
        j = int(self.partner[i])
        levels[i], levels[j] = self.parts[i].drop, self.parts[j].drop
        return [int(i), j]

    def dropped_layers(self, levels: np.ndarray) -> list[int]:
        return sorted({p.layer for i, p in enumerate(self.parts) if levels[i] > self.top[i]})

    def params(self, levels: np.ndarray) -> int:
        return removed_params(self.parts, levels)

    def feasible(self, levels: np.ndarray) -> bool:
        return -self.slack <= self.params(levels) - self.target <= 0

    def repair(self, levels: np.ndarray, rng: np.random.Generator, keep=None) -> np.ndarray:
        """Random single-level moves (never undoing the parts in `keep`: an index or a list of them)
        until the budget holds; in place."""
        keep = np.atleast_1d(np.asarray([] if keep is None else keep, dtype=int))
        for _ in range(100 * len(levels)):
            over = self.params(levels) - self.target
            if -self.slack <= over <= 0:
                return levels
            movable = np.flatnonzero(levels > 0) if over > 0 else np.flatnonzero(levels < self.top)
            free = movable[~np.isin(movable, keep)]
            movable = free if len(free) else movable
            i = rng.choice(movable)
            if levels[i] > self.top[i]:              # a removed layer comes back at its top levels
                j = self.partner[i]
                levels[i], levels[j] = self.top[i], self.top[j]
            else:
                levels[i] += -1 if over > 0 else 1
        return levels

    def project(self, shares: np.ndarray) -> np.ndarray:
        """Levels from per-part removal shares in [0, 1]: level = round(s * share * top), with the
        scale s found by bisection so that the removed parameters come closest to the target."""
        def levels_at(s):
            return np.clip(np.round(s * shares * self.top), 0, self.top).astype(int)
        lo, hi = 0.0, 1.0
        while self.params(levels_at(hi)) < self.target and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.params(levels_at(mid)) < self.target else (lo, mid)
        return min((levels_at(lo), levels_at(hi)), key=lambda lv: abs(self.params(lv) - self.target))
