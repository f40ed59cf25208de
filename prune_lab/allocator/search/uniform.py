"""allocator.shape=uniform: the search restricted to shapes that every layer shares (one kept KV-group
count and one MLP width, so output.export=hf loads the result with plain transformers). For each count
of GQA groups removed per layer (on allocator.multiple_of's query-width blocks) the MLP width that meets
the budget with it is fixed, so the space is a short list: every candidate is scored with the search's
fitness on its compensated levels (the ladder holds exactly these counts) and the best is kept.
"""
from __future__ import annotations

import math

import numpy as np

from ...core.adapter import LayerView
from ...errors import PruneLabError
from ..align import check_alignment, group_block
from .levels import Part


def uniform_ladder(views: list[LayerView], target: int, multiple_of: int) -> tuple[list[Part], list[np.ndarray]]:
    """(parts whose levels are the candidates' counts, the candidates as levels per part)."""
    shapes = {(v.attn.num_kv_heads, v.mlp.width, v.attn.group_cost, v.mlp.channel_cost) for v in views}
    if len(shapes) != 1:
        raise PruneLabError(f"allocator.shape=uniform needs a model whose layers share one shape (this one has "
                            f"{len(shapes)} distinct layer shapes): use allocator.shape=free")
    check_alignment(views, multiple_of)
    (K, W, c_g, c_m), n = shapes.pop(), len(views)
    block = group_block(views[0], multiple_of)
    pairs = []
    for a in range(0, K, 1):
        if (K - a) % block:
            continue
        mlp = max(0, math.ceil((target / n - a * c_g) / c_m))          # channels that meet the budget with a
        kept = W - mlp if mlp == 0 else (W - mlp) // multiple_of * multiple_of
        if kept >= max(1, multiple_of if mlp else 1):
            pairs.append((a, W - kept))
        if mlp == 0:
            break                                # more groups would only overshoot the budget
    if not pairs:
        raise PruneLabError(f"allocator.ratio cannot be met with one shape for every layer (at most "
                            f"{n * ((K - block) * c_g + (W - multiple_of) * c_m)} of {target} params removable): "
                            f"lower the ratio or use allocator.shape=free")
    attn = sorted({0, *(a for a, _ in pairs)})
    mlp = sorted({0, *(m for _, m in pairs)})
    parts = []
    for v in views:
        parts.append(Part(v.index, "attn", K, 1, c_g, True, tuple(attn)))
        parts.append(Part(v.index, "mlp", W, max(1, max(np.diff(mlp), default=1)), c_m, True, tuple(mlp)))
    candidates = [np.array([attn.index(a), mlp.index(m)] * n) for a, m in pairs]
    return parts, candidates
