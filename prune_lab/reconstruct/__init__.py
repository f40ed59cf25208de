"""Reconstruction of the consumer projections (twin of conf/reconstruct/*.yaml): the lifecycle and
the engine method in base.py, the least-squares / structured-OBS math in refit.py."""
from .base import MODES, PlanRefit, Reconstruct, summarize

__all__ = ["MODES", "PlanRefit", "Reconstruct", "summarize"]
