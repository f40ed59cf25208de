"""The parameter budget over the level ladder: a candidate (one level per part) is feasible when it
removes at most the target and at most one step less (the largest level step of any part), so that
candidates compare at (almost) the same size; the plan is then made exact with single MLP channels.
With droppable parts (allocator.remove_empty_layers) each part of a layer reaches its drop level on its
own (the layer's whole attention, or its whole MLP, removed; both: the layer removed) and leaves it on
its own (back to its top level). A part that cannot go `alone` (OPT's attention: it cannot run without
heads) goes only with the other part of its layer, and comes back with it."""
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

    def droppable_parts(self, levels: np.ndarray) -> np.ndarray:
        """Every part that may still be removed whole."""
        return np.array([i for i in range(len(self.parts)) if self.partner[i] >= 0 and levels[i] <= self.top[i]],
                        dtype=int)

    def drop(self, levels: np.ndarray, i: int) -> list[int]:
        """Remove part i whole (with its partner if it cannot go alone), in place; returns the parts changed."""
        changed = [int(i)]
        levels[i] = self.parts[i].drop
        j = int(self.partner[i])
        if not self.parts[i].alone and levels[j] <= self.top[j]:
            levels[j] = self.parts[j].drop
            changed.append(j)
        return changed

    def restore(self, levels: np.ndarray, i: int) -> None:
        """A removed part back at its top level (with its partner if that cannot stay removed alone), in place."""
        levels[i] = self.top[i]
        j = int(self.partner[i])
        if not self.parts[j].alone and levels[j] > self.top[j]:
            levels[j] = self.top[j]

    def dropped_layers(self, levels: np.ndarray) -> list[int]:
        """Layers removed whole (both parts at their drop level)."""
        gone = [p.layer for i, p in enumerate(self.parts) if levels[i] > self.top[i]]
        return sorted({layer for layer in gone if gone.count(layer) == 2})

    def dropped_blocks(self, levels: np.ndarray, kind: str) -> list[int]:
        """Layers that lose only their `kind` part ("attn" | "mlp") whole."""
        whole = set(self.dropped_layers(levels))
        return sorted(p.layer for i, p in enumerate(self.parts)
                      if p.kind == kind and levels[i] > self.top[i] and p.layer not in whole)

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
            if levels[i] > self.top[i]:              # a removed part comes back at its top level
                self.restore(levels, i)
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
