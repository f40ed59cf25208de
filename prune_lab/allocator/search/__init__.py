"""allocator=search: the per-layer shape found by search over compensated levels (EvoPress, Týr-the-Pruner).

1. levels.py: a ladder of levels per layer part (attention: 0..G-1 GQA groups; MLP: steps of
   `mlp_step` of the width) and, in one dense-path engine pass, every level's units and refit
   o_proj / down_proj (reconstruct=obs's greedy OBS + least squares), kept on CPU.
2. fitness.py: KL of the candidate's next-token distribution from the dense model's (or its NLL) on
   `fitness_tokens` calibration tokens, the candidate assembled by swapping the database's weights in.
3. evolution.py (EvoPress: level-switch mutations under the budget, multi-stage selection on growing
   token counts) or optuna_search.py (CMA-ES / TPE / GP over per-part shares projected on the budget).
Seeds: the `global` plan of the job's importance scores snapped to levels, and the uniform shares.
remove_empty_layers: every eligible part also has a drop level (all its units, a zero o_proj / down_proj),
reached by a mutation on its own: a layer may lose its whole attention or its whole MLP and stay
(plan.attn_blocks / mlp_blocks), or both (removed whole, plan.layers).
The chosen counts (exact to one MLP channel of the budget) then go through the normal pipeline:
reconstruct=obs refits each layer on its already-pruned predecessors (Týr's error accumulation).
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np

from ...core.plan import PruningPlan
from ...errors import PruneLabError
from ..base import Allocator
from ..global_table import Global
from ..uniform_shape import UniformShape
from .budget import Budget
from .evolution import evolve
from .fitness import KINDS, Fitness
from .levels import Database, LevelBuilder, ladder
from .optuna_search import SAMPLERS, optimise
from .seeds import error_seed
from .shapes import by_layer, counts_of, snap, to_plan
from .uniform import uniform_ladder

SEARCHERS = ("evolution", "optuna")
DATABASES = ("memory", "disk")         # the levels' weights on CPU, or in <run dir>/search_levels/ while it runs
SEEDS = ("global", "uniform", "error", "relative_error")   # starting points, in the order evaluated
SHAPES = ("free", "uniform")           # any level per part, or one shape for every layer (every one scored)


class Search(Allocator):
    searches = True

    def __init__(self, ratio: float = 0.25, searcher: str = "evolution", fitness: str = "kl",
                 fitness_tokens: int = 8192, stages: int = 3, generations: int = 50, offspring: int = 16,
                 sampler: str = "cmaes", mlp_step: float = 0.0625, damp: float = 0.01, seed: int = 0,
                 layer_start: int = 0, layer_end: int | None = None, multiple_of: int = 1,
                 mutations: int = 3, resample: bool = True, database: str = "memory", rounds: int = 1,
                 shape: str = "free", remove_empty_layers: bool = False):
        super().__init__(ratio, layer_start, layer_end, multiple_of)
        for name, value, allowed in (("searcher", searcher, SEARCHERS), ("fitness", fitness, KINDS),
                                     ("sampler", sampler, SAMPLERS), ("database", database, DATABASES),
                                     ("shape", shape, SHAPES)):
            if value not in allowed:
                raise PruneLabError(f"allocator.{name} must be one of {', '.join(allowed)}, got '{value}'")
        for name, value in (("generations", generations), ("offspring", offspring), ("stages", stages),
                            ("fitness_tokens", fitness_tokens), ("mutations", mutations), ("rounds", rounds)):
            if not isinstance(value, int) or value < 1:
                raise PruneLabError(f"allocator.{name} must be a whole number >= 1, got {value}")
        if not 0 < mlp_step <= 0.5:
            raise PruneLabError(f"allocator.mlp_step must be in (0, 0.5] (the MLP share removed per level, "
                                f"e.g. 0.0625 = 1/16 of the width), got {mlp_step}")
        if not damp > 0 or not math.isfinite(damp):
            raise PruneLabError(f"allocator.damp must be > 0 (relative Gram damping), got {damp}")
        self.searcher, self.fitness_kind, self.fitness_tokens = searcher, fitness, fitness_tokens
        self.stages, self.generations, self.offspring, self.sampler = stages, generations, offspring, sampler
        self.mlp_step, self.damp, self.seed = float(mlp_step), float(damp), seed
        self.mutations, self.resample, self.database, self.rounds = mutations, bool(resample), database, rounds
        if remove_empty_layers and (searcher != "evolution" or shape != "free"):
            raise PruneLabError("allocator.remove_empty_layers=true removes layers by the evolution's mutations: it "
                                "needs allocator.searcher=evolution and allocator.shape=free")
        self.shape, self.candidates, self.scored = shape, [], []
        self.remove_empty_layers = bool(remove_empty_layers)
        self.summary: dict = {}

    def check_calibration(self, n_tokens: int) -> None:
        if self.fitness_tokens > n_tokens:
            raise PruneLabError(f"allocator.fitness_tokens={self.fitness_tokens} is more than the calibration "
                                f"set's {n_tokens} tokens: lower it or raise calibration.n_samples")

    def eligible(self, views) -> np.ndarray:
        """The layer range, and (before any scoring) whether the ladder can meet the ratio at all."""
        mask = super().eligible(views)
        self._budget(views, mask)
        return mask

    def _budget(self, views, mask: np.ndarray | None = None) -> Budget:
        mask = super().eligible(views) if mask is None else mask
        if self.shape == "uniform":
            if not mask.all():
                raise PruneLabError("allocator.shape=uniform gives every layer the same shape: it takes no layer "
                                    "range (leave allocator.layer_start / layer_end at their defaults)")
            parts, self.candidates = uniform_ladder(views, self.target(views), self.multiple_of)
            return Budget(parts, self.target(views))
        budget = Budget(ladder(views, self.mlp_step, self.multiple_of, mask, self.remove_empty_layers),
                        self.target(views))
        if budget.params(budget.top) < budget.target - budget.slack:
            raise PruneLabError(f"allocator.ratio={self.ratio} cannot be met on the ladder (at most "
                                f"{budget.params(budget.top)} of {budget.target} params removable while every layer "
                                f"keeps a KV group and an MLP channel): lower the ratio or widen the layer range")
        return budget

    def __call__(self, scores, views, layer_importance=None) -> PruningPlan:
        raise PruneLabError("allocator=search needs the model and calibration data (run it through the CLI)")

    def search(self, model, batches, engine, scores, views, run_dir: Path) -> PruningPlan:
        self.check_inputs(views, scores)
        budget = self._budget(views)
        parts = budget.parts
        t0 = time.time()
        store = Path(run_dir) / "search_levels" / "round1" if self.database == "disk" else None
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
        try:
            return self._search(model, batches, engine, scores, views, run_dir, budget, Database(parts, store=store), t0)
        finally:
            if store is not None:
                shutil.rmtree(store.parent, ignore_errors=True)

    def _search(self, model, batches, engine, scores, views, run_dir, budget, db, t0) -> PruningPlan:
        target, parts = budget.target, budget.parts
        engine.walk(model, batches, LevelBuilder(db, self.damp), propagate="dense")
        t1 = time.time()
        windows, stage_batches = self._fitness_batches(batches)
        fitness = Fitness(model, db, windows, self.fitness_kind)
        rng = np.random.default_rng(self.seed)
        if self.shape == "uniform":
            seeds, seed_values = list(self.candidates), []
            reference = counts_of(UniformShape(self.ratio, self.multiple_of, 0)(scores, views), parts)
        else:
            seeds = [snap(Global(self.ratio, self.remove_empty_layers, self.layer_start, self.layer_end,
                                 self.multiple_of)(scores, views), budget, rng),
                     budget.repair(budget.project((budget.top > 0).astype(float)), rng),
                     error_seed(db, budget, False, rng), error_seed(db, budget, True, rng)]
            seed_values = [fitness(s) for s in seeds]
            reference = by_layer(parts, seeds[0])
        trajectory: list = []
        names = [f"shape {i}" for i in range(len(seeds))] if self.shape == "uniform" else list(SEEDS)
        best, kept = self._run(fitness, budget, seeds, names, stage_batches, rng, trajectory, run_dir, 1)
        rounds = [{"database_seconds": round(t1 - t0, 2), "best_fitness": float(fitness(best)), "kept": kept}]
        for r in range(2, self.rounds + 1):      # the database refit on the pruned path of the last best
            t2 = time.time()
            db = self._pruned_database(model, batches, engine, db, best, r)
            fitness.rebase(db)
            carried = float(fitness(best))
            seeds = list(self.candidates) if self.shape == "uniform" else \
                [best, error_seed(db, budget, False, rng), error_seed(db, budget, True, rng)]
            t3 = time.time()
            names = names if self.shape == "uniform" else [f"round {r - 1}", "error", "relative_error"]
            best, kept = self._run(fitness, budget, seeds, names, stage_batches, rng, trajectory, run_dir, r)
            rounds.append({"database_seconds": round(t3 - t2, 2), "carried_fitness": carried,
                           "best_fitness": float(fitness(best)), "kept": kept})
        plan = to_plan(db, best, target, adjust=self.shape == "free")
        self.summary = {"searcher": "exhaustive" if self.shape == "uniform" else self.searcher, "shape": self.shape,
                        "fitness_kind": self.fitness_kind, "mutations": self.mutations, "resample": self.resample,
                        "evaluations": fitness.evaluations, "tokens_evaluated": fitness.tokens,
                        "decoder_layers_run": fitness.layers_run, "database_seconds": round(t1 - t0, 2),
                        "search_seconds": round(time.time() - t1, 2), "database_bytes": db.nbytes,
                        "database": self.database, "rounds": rounds,
                        "seed_fitness": dict(zip(SEEDS, seed_values)),
                        "best_fitness": rounds[-1]["best_fitness"], "trajectory": trajectory,
                        "levels": by_layer(parts, best), "global_levels": reference,
                        "layers_removed": budget.dropped_layers(best),
                        "attn_blocks_removed": budget.dropped_blocks(best, "attn"),
                        "mlp_blocks_removed": budget.dropped_blocks(best, "mlp"),
                        "reference": "uniform_shape" if self.shape == "uniform" else "global"}
        if self.shape == "uniform":
            self.summary["candidates"] = self.scored
        return self.check_met(plan, views, "lower allocator.ratio or widen the layer range")

    def _run(self, fitness, budget, seeds, names, stage_batches, rng, trajectory, run_dir, r) -> tuple[np.ndarray, str]:
        """One round's search, its result then checked against the seeds on every fitness window (the
        stages see a few windows each): (the better levels, "search" or the name of the seed kept)."""
        found = self._searcher(fitness, budget, seeds, stage_batches, rng, trajectory, run_dir, r)
        values = [fitness(c) for c in (found, *seeds)]
        i = int(np.argmin(values))                       # ties go to the search's result
        return (found, "search") if i == 0 else (seeds[i - 1].copy(), names[i - 1])

    def _searcher(self, fitness, budget, seeds, stage_batches, rng, trajectory, run_dir, r) -> np.ndarray:
        if self.shape == "uniform":             # every shape on every fitness window
            values = [fitness(c) for c in seeds]
            self.scored = [{"attn": int(budget.parts[0].removed(int(c[0]))), "mlp": int(budget.parts[1].removed(int(c[1]))),
                            "fitness": float(v)} for c, v in zip(seeds, values)]
            trajectory.append((fitness.evaluations, fitness.tokens, float(min(values))))
            return seeds[int(np.argmin(values))].copy()
        if self.searcher == "evolution":
            return evolve(fitness, budget, seeds, stage_batches, self.generations, self.offspring, rng, trajectory,
                          self.mutations, len(fitness.batches) if self.resample else None)
        name = "search.db" if r == 1 else f"search_round{r}.db"
        return optimise(fitness, budget, seeds, stage_batches[-1], self.generations * self.offspring,
                        self.sampler, self.seed + r - 1, f"sqlite:///{Path(run_dir).resolve() / name}", rng, trajectory)

    def _pruned_database(self, model, batches, engine, db: Database, levels: np.ndarray, r: int) -> Database:
        """The levels refit on the pruned path of `levels` (the model's weights restored after)."""
        store = None if db.store is None else db.store.parent / f"round{r}"
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
        new = Database(db.parts, store=store)
        linears = Fitness.linears_of(model, db.parts)
        originals = [lin.weight.data.clone() for lin in linears]
        try:
            engine.walk(model, batches, LevelBuilder(new, self.damp, at=levels))
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w
        if db.store is not None:
            shutil.rmtree(db.store, ignore_errors=True)
        return new

    def _fitness_batches(self, batches) -> tuple[list, list[int]]:
        """Windows of the calibration set regrouped so that every stage is a whole number of batches:
        stage s uses fitness_tokens / 4^(stages-1-s) tokens. With `resample` all of the calibration set
        (the evolution draws each stage's windows from it), else its first fitness_tokens."""
        import torch
        windows = torch.cat([b for b in batches])
        seq = windows.shape[1]
        n = len(windows) if self.resample else max(1, self.fitness_tokens // seq)
        per = max(1, (self.fitness_tokens // 4 ** (self.stages - 1)) // seq)
        chunks = list(windows[:n].split(per))
        stages = [max(1, min(len(chunks), math.ceil(self.fitness_tokens / 4 ** (self.stages - 1 - s) / (per * seq))))
                  for s in range(self.stages)]
        return chunks, stages
