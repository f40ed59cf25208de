"""allocator.searcher=evolution: EvoPress's algorithm (Sieberling et al., ICML'25) over the level database.

One parent (the better of the seeds), each generation `offspring` children by level-switch mutations
(one part one level up, others down until the parameter budget holds again: budget moves between
parts), then selection in stages on growing token counts (all children on the first stage's windows,
the best quarter on the next, ...; the survivor of the last stage replaces the parent if fitter).
"""
from __future__ import annotations

import numpy as np

from .budget import Budget


def mutate(levels: np.ndarray, budget: Budget, rng: np.random.Generator) -> np.ndarray:
    child = levels.copy()
    up = np.flatnonzero(child < budget.top)
    if len(up):
        a = rng.choice(up)
        child[a] += 1
        budget.repair(child, rng, keep=a)
    return child


def stage_survivors(offspring: int, stages: int) -> list[int]:
    """How many candidates each selection stage evaluates: offspring, offspring/4, ..., 1."""
    sizes = [max(1, offspring // 4 ** s) for s in range(stages)]
    sizes[-1] = 1
    return sizes


def evolve(fitness, budget: Budget, seeds: list[np.ndarray], stage_batches: list[int], generations: int,
           offspring: int, rng: np.random.Generator, trajectory: list) -> np.ndarray:
    """The fittest levels found; `trajectory` gets (evaluations, tokens, fitness of the parent)."""
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
            child = mutate(parent, budget, rng)
            if child.tobytes() not in seen:
                seen.add(child.tobytes())
                children.append(child)
            if len(children) == offspring:
                break
        for stage, n_batches in enumerate(stage_batches):       # evaluate sizes[s], keep sizes[s + 1]
            values = [fitness(c, n_batches) for c in children[:sizes[stage]]]
            order = np.argsort(values, kind="stable")[:sizes[stage + 1] if stage + 1 < len(sizes) else 1]
            children, values = [children[i] for i in order], [values[i] for i in order]
        if children and values[0] < parent_value:
            parent, parent_value = children[0], values[0]
            fitness.anchor(parent)
        trajectory.append((fitness.evaluations, fitness.tokens, parent_value))
    return parent
