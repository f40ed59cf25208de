"""finetune=full: every parameter, AdamW (memory: weights + grads + 2 Adam moments)."""
from __future__ import annotations

import torch.nn as nn

from .base import Trainer


class Full(Trainer):
    """Full fine-tuning: every parameter, AdamW."""

    method = "full"

    def __init__(self, lr: float = 5e-5, **train):
        super().__init__(lr=lr, **train)

    def wrap(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
