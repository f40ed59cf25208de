"""Layer-sequential calibration engine (pure of Hydra): walk the decoder one layer at a time.

`walk` captures what the model passes its decoder layers (hidden states entering layer 0, position
embeddings, the attention mask of each layer, ...) for the calibration batches, then per layer:
moves it to the compute device, runs each stage of the method with hooks that collect InputStats of
the stage's linears (padding tokens excluded), lets the method modify the layer, and computes the
next layer's inputs from the modified layer (propagate="pruned") or the unmodified one ("dense").

Two streams: a method with `needs_cross = True` (reconstruction on the pruned path) gets, per linear,
the Gram of the pruned-path inputs X~, the cross-Gram X·X~ᵀ with the dense-path inputs X and the
dense Gram X·Xᵀ; the engine then keeps the dense stream too, through an unmodified copy of the layer.
"""
from __future__ import annotations

import torch.nn as nn

from ..core.adapter import LayerView, resolve_device
from ..errors import PruneLabError
from .capture import split_batch  # noqa: F401  (part of the API)
from .stats import InputStats
from .walk import LINEAR_PATHS, PROPAGATE, linear_at, walk  # noqa: F401  (part of the API)


class LayerMethod:
    """What a method declares to the engine (the defaults: sums only, one stream) and does per layer.

    needs_gram: the Gram X·Xᵀ of each linear's inputs (else sums only); needs_cross: two streams, X on
    the dense path next to X~ on the modified one; needs_residual: with needs_cross, the
    residual-stream drift where attn.o / mlp.down add."""

    needs_gram: bool = False
    needs_cross: bool = False
    needs_residual: bool = False

    def stages(self, view: LayerView) -> list[list[str]]:
        """Groups of linear paths calibrated together, in order ("attn.o", "mlp.down", ...)."""
        raise NotImplementedError

    def apply(self, index: int, view: LayerView, stats: dict[str, InputStats]) -> dict:
        """Modify layer `index` from its stage's input statistics; returns its record."""
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
