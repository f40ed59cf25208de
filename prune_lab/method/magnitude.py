"""method=magnitude."""
from __future__ import annotations

from .base import Unstructured


class Magnitude(Unstructured):
    """|W| with one threshold per matrix (N:M: per group); no weight update."""

    name = "magnitude"
