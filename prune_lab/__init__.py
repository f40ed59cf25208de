"""prune_lab: structured (GQA-aware) pruning of decoder LLMs, driven by Hydra and Optuna."""

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Rebuild a model saved with output.save_model=true (see prune_lab.checkpoint)."""
    from .artifacts.checkpoint import load_pruned as _load
    return _load(path, **kwargs)
