"""method=structured (default): whole GQA groups / MLP channels / layers, scored by `importance`,
planned by `allocator`, refit by `reconstruct` and sliced by the executor (recipes/structured.py)."""
from __future__ import annotations


class Structured:
    """The structured family's method node: its work is done by the importance, allocator and
    reconstruct components; it only declares the family the recipe registry dispatches on."""

    family = "structured"
    name = "structured"
