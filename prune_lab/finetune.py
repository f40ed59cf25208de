"""Recovery after pruning (twin of conf/finetune/*.yaml)."""
from __future__ import annotations


class NoFinetune:
    """No recovery: the pruned model is evaluated as is."""

    enabled = False

    def __call__(self, model, tokenizer, stream, seed: int = 0, run_dir=None) -> dict:
        return {}
