"""importance=taylor | taylor_2nd (the gradient folding itself is in gradients.py)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.adapter import decoder_layers, layer_views
from ..core.scores import UnitScores
from .base import Importance
from .gradients import GradientStatistics, checkpointed


class Taylor(Importance):
    """First-order Taylor |θ·g| (g = mean gradient over calibration batches).

    With second_order=True adds ½·θ²·E[g²] (diagonal Fisher), accumulated per unit batch by batch
    so no full-size second-moment copy is kept. Gradients are folded into fp32 accumulators as
    autograd produces them and freed at once (prune_lab/gradients.py); `offload=True` keeps the
    per-weight accumulators in CPU memory and `gradient_checkpointing=True` recomputes each decoder
    layer's activations in the backward pass: together they leave the weights, one layer's
    activations and one layer's gradients on the device.
    """

    def __init__(self, second_order: bool = False, offload: bool = False,
                 gradient_checkpointing: bool = False):
        self.second_order, self.offload = second_order, offload
        self.gradient_checkpointing = gradient_checkpointing
        self.name = "taylor_2nd" if second_order else "taylor"

    def __call__(self, model, batches: list[torch.Tensor], seed: int = 0) -> UnitScores:
        views = layer_views(model)
        saved_flags = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        stats = GradientStatistics(views, self.second_order, self.offload)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in stats.params:
            p.requires_grad_(True)
        model.eval()
        try:
            with stats, checkpointed(decoder_layers(model), self.gradient_checkpointing):
                for batch in tqdm(batches, desc=self.name, leave=False):
                    batch = batch.to(model.device)
                    model(batch, labels=batch, use_cache=False).loss.backward()
        finally:
            for p, flag in saved_flags.items():
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)
        return stats.scores(len(batches))
