"""Layer-sequential calibration engine (pure of Hydra): walk the decoder one layer at a time.

`walk` (walk.py) captures what the model passes its decoder layers (hidden states entering layer 0,
position embeddings, the attention mask of each layer, ...) for the calibration batches, then per layer
(layer.py): moves it to the compute device, runs each stage of the method with hooks that collect
InputStats of the stage's linears (padding excluded; one accumulator per distinct input: q/k/v share
one, gate/up another), lets the method modify the layer, and computes the next layer's inputs from the
modified layer (propagate="pruned") or the unmodified one ("dense").

Two streams (`needs_cross`): per linear the Gram of the pruned-path inputs X~ and, of the dense-path
inputs X (an unmodified copy of the layer), what a refit reads: W₀·C (C = X·X~ᵀ) and ||W₀X||² (C, D =
X·Xᵀ with needs_dense_grams). Layer forwards per batch (`forwards` in the records): the copy runs once
per layer (later stages' dense inputs taped), not at all while the streams are one; the layer once per
stage (after its last attention change with o_proj on kept inputs for its attention: AttentionStandIn)
and once more for the next inputs unless the last stage is down_proj alone, replayed into the
last pass's outputs (y + (W' - W)x~, checked to be the layer's output) when the kept inputs fit
REPLAY_BYTES.
"""
from __future__ import annotations

import torch.nn as nn

from ..core.adapter import LayerView, resolve_device
from ..errors import PruneLabError
from .capture import split_batch  # noqa: F401  (part of the API)
from .stats import InputStats
from .layer import LINEAR_PATHS, linear_at  # noqa: F401  (part of the API)
from .walk import PROPAGATE, walk  # noqa: F401  (part of the API)


class LayerMethod:
    """What a method declares to the engine (the defaults: sums only, one stream) and does per layer.

    needs_gram: the Gram X·Xᵀ of each linear's inputs (else sums only); needs_cross: two streams, X on
    the dense path next to X~ on the modified one; needs_residual: with needs_cross, the
    residual-stream drift where attn.o / mlp.down add; needs_dense_grams: with needs_cross, the full
    C = X·X~ᵀ and D = X·Xᵀ (else only W₀·C and ||W₀X||², InputStats.w_cross / w_energy).

    The stats of linears that share an input (q/k/v, gate/up) share their tensors: read, never modify."""

    needs_gram: bool = False
    needs_cross: bool = False
    needs_residual: bool = False
    needs_dense_grams: bool = False

    def stages(self, view: LayerView) -> list[list[str]]:
        """Groups of linear paths calibrated together, in order ("attn.o", "mlp.down", ...)."""
        raise NotImplementedError

    def apply(self, index: int, view: LayerView, stats: dict[str, InputStats]) -> dict:
        """Modify layer `index` from its stage's input statistics; returns its record. May change the
        linears of its stage only (a last-stage down_proj change is replayed, not recomputed)."""
        raise NotImplementedError


class Engine:
    """The engine's settings (conf `engine:` node): compute device, offload, propagate, progress bar."""

    def __init__(self, device: str = "auto", offload: bool = False, propagate: str = "pruned",
                 progress: bool = True):
        if propagate not in PROPAGATE:
            raise PruneLabError(f"engine.propagate must be one of {PROPAGATE}, got '{propagate}'")
        self.device, self.offload = resolve_device(device, "engine.device"), offload
        self.propagate, self.progress = propagate, progress

    def walk(self, model: nn.Module, batches, method: LayerMethod, propagate: str | None = None, **kwargs):
        """walk() with these settings; `propagate` overrides engine.propagate (importance: "dense")."""
        return walk(model, batches, method, device=self.device, offload=self.offload,
                    propagate=propagate or self.propagate, progress=self.progress, **kwargs)

    def describe(self) -> dict:
        return {"device": str(self.device), "offload": self.offload, "propagate": self.propagate}
