"""importance=file: unit scores saved by an earlier run."""
from __future__ import annotations

import logging

from ..artifacts.scores import load_scores, read_scores, scores_file
from ..core.fingerprint import model_fingerprint, tokens_fingerprint
from ..core.scores import UnitScores
from ..errors import PruneLabError
from .base import Importance

log = logging.getLogger("prune_lab")


def short(fingerprint: str) -> str:
    return fingerprint[:25] + "…" if len(fingerprint) > 25 else fingerprint


class FromFile(Importance):
    """Unit scores saved by an earlier run (scores.safetensors; a run dir also works): analyse once,
    prune many times. The file is read and checked whole when the job is built. When called (with the
    model), the model fingerprint the file records must be this model's -- else an error, or a warning
    with allow_other_model=true; other calibration tokens are a warning; a file written before the
    fingerprints were recorded cannot be checked (a warning). Shapes are checked by the allocator."""

    cacheable = False
    name = "file"

    def __init__(self, path: str, allow_other_model: bool = False):
        self.path = scores_file(path, "scores.safetensors")
        self.scores = load_scores(self.path)
        self.scores.check_finite(f"the unit scores in {self.path}", "the file is damaged or was written by a "
                                 "diverged run: recompute it")        # not the computed criteria's fp16 hint
        self.recorded = read_scores(self.path)[1]
        self.allow_other_model = allow_other_model

    def __call__(self, model, batches=None, seed: int = 0) -> UnitScores:
        here, there = model_fingerprint(model), self.recorded.get("model")
        if there is None:
            log.warning("%s records no model fingerprint (written before prune_lab recorded it): cannot check "
                        "that its scores are this model's", self.path)
        elif there != here:
            what = (f"'{self.path}' holds the scores of another model (fingerprint {short(there)} there, "
                    f"{short(here)} here; the same weights in another dtype differ too)")
            if not self.allow_other_model:
                raise PruneLabError(f"{what}: set importance.allow_other_model=true to use them anyway")
            log.warning("%s: used anyway (importance.allow_other_model=true)", what)
        tokens = tokens_fingerprint(batches) if batches else None
        if there is not None and tokens is not None and self.recorded.get("tokens") not in (None, tokens):
            log.warning("%s was scored on other calibration tokens (%s there, %s here): the plan follows "
                        "those scores", self.path, short(self.recorded["tokens"]), short(tokens))
        return self.scores

    def origin(self, model_fingerprint: str, tokens_fingerprint: str | None) -> dict:
        """The file's own record (unknown stays unknown: these scores were not computed in this job)."""
        return {"model": self.recorded.get("model"), "tokens": self.recorded.get("tokens")}
