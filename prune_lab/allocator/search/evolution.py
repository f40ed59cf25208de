"""allocator.searcher=evolution: EvoPress's algorithm (Sieberling et al., ICML'25) over the level database.

One parent (the better of the seeds), each generation `offspring` children by level-switch mutations
(1..`mutations` parts one level up, or with remove_empty_layers removed whole: a layer's attention or its
MLP; biased to few (the smaller of two uniform draws), others down until the parameter budget holds
again: budget moves between parts), then selection in stages on growing
token counts (all children on the first stage's windows, the best quarter on the next, ...); the parent
joins the last stage (elitist) and its winner is the next parent. With `pool` (resampling), every stage
of every generation draws its windows at random from the pool's, so the search does not fit a fixed
handful of windows; without it each stage uses the first windows, the same every generation.
"""
from __future__ import annotations

import numpy as np

from .budget import Budget


def n_flips(rng: np.random.Generator, mutations: int) -> int:
    """1..mutations, the smaller of two uniform draws (1 without drawing: the single-switch search)."""
    return 1 if mutations == 1 else int(min(rng.integers(1, mutations + 1), rng.integers(1, mutations + 1)))


def mutate(levels: np.ndarray, budget: Budget, rng: np.random.Generator, flips: int = 1) -> np.ndarray:
    child = levels.copy()
    raised = []
    for _ in range(flips):                 # a part one level up, or (remove_empty_layers) a part removed whole
        up = np.flatnonzero(child < budget.top)
        drops = budget.droppable_parts(child)
        if not len(up) + len(drops):
            break
        if not len(drops):
            a = rng.choice(up)
        else:                               # every raise and every removal equally likely
            pick = int(rng.integers(len(up) + len(drops)))
            if pick >= len(up):
                raised += budget.drop(child, drops[pick - len(up)])
                continue
            a = up[pick]
        child[a] += 1
        raised.append(int(a))
    if raised:
        budget.repair(child, rng, keep=raised)
    return child


def stage_survivors(offspring: int, stages: int) -> list[int]:
    """How many candidates each selection stage evaluates: offspring, offspring/4, ..., 1."""
    sizes = [max(1, offspring // 4 ** s) for s in range(stages)]
    sizes[-1] = 1
    return sizes


def evolve(fitness, budget: Budget, seeds: list[np.ndarray], stage_batches: list[int], generations: int,
           offspring: int, rng: np.random.Generator, trajectory: list, mutations: int = 1,
           pool: int | None = None) -> np.ndarray:
    """The fittest levels found; `trajectory` gets (evaluations, tokens, fitness of the parent on the
    generation's last-stage windows). `pool`: the number of windows to draw each stage's from (None:
    the first windows)."""
    final = stage_batches[-1]
    scored = [(fitness(s, final), i) for i, s in enumerate(seeds)]
    best_value, best = min(scored)
    parent, parent_value = seeds[best], best_value
    fitness.anchor(parent)                       # children run from the first layer they change
    trajectory.append((fitness.evaluations, fitness.tokens, parent_value))
    sizes = stage_survivors(offspring, len(stage_batches))
    for _generation in range(generations):
        children, seen = [], {parent.tobytes()}
        for _attempt in range(10 * offspring):                # distinct children, different from the parent
            child = mutate(parent, budget, rng, n_flips(rng, mutations))
            if child.tobytes() not in seen:
                seen.add(child.tobytes())
                children.append(child)
            if len(children) == offspring:
                break
        for stage, n_batches in enumerate(stage_batches):       # evaluate sizes[s], keep sizes[s + 1]
            windows = n_batches if pool is None else np.sort(rng.choice(pool, size=n_batches, replace=False))
            last = stage + 1 == len(stage_batches)
            if last:                                             # elitist: the parent on the same windows
                children = [parent, *children[:sizes[stage]]]
            values = [fitness(c, windows) for c in children[:len(children) if last else sizes[stage]]]
            order = np.argsort(values, kind="stable")[:1 if last else sizes[stage + 1]]
            children, values = [children[i] for i in order], [values[i] for i in order]
        changed = not np.array_equal(children[0], parent)
        parent, parent_value = children[0], values[0]
        if changed:
            fitness.anchor(parent)
        trajectory.append((fitness.evaluations, fitness.tokens, parent_value))
    return parent
