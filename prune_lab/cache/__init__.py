"""Content-keyed caches: unit/layer scores on disk (scores.py), the dense model in memory across the
jobs of one multirun (dense.py)."""
