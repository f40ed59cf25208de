"""Fitness of a candidate (one level per layer part): KL divergence of its next-token distribution from
the dense model's (Týr, EvoPress), or its NLL, on calibration windows. A candidate is assembled by
swapping the database's o_proj / down_proj weights into the model (no copy of the model).

What is not recomputed per candidate:
- the dense model's log-probabilities (kept once, fp32, while they fit in `dense_cache_bytes`; else its
  final hidden states are kept and the head re-applied);
- the layers before the first one where the candidate differs from the *anchor* (the evolution's
  parent): the anchor's input to every decoder layer is kept per window (computed once, when first
  needed), and a candidate runs from the first layer it changes, the earlier layers standing in with
  the kept inputs (prefix.py). The values are those of a full forward (the same layers on the same
  inputs).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ...core.adapter import layer_views
from .levels import Database
from .prefix import Prefix

KINDS = ("kl", "ppl")


class Fitness:
    def __init__(self, model, db: Database, batches: list[torch.Tensor], kind: str = "kl",
                 dense_cache_bytes: int = 4 << 30):
        self.model, self.db, self.kind = model, db, kind
        self.batches = [b.to(model.device) for b in batches]
        self.linears = self.linears_of(model, db.parts)
        self.part_layer = np.array([p.layer for p in db.parts])
        self.evaluations = self.tokens = self.layers_run = 0
        self.memo: dict[tuple[bytes, int], float] = {}   # a candidate is evaluated once per token count
        self.prefix = Prefix(model)
        self.anchor_levels: np.ndarray | None = None
        self.anchor_inputs: dict[int, list] = {}      # batch -> the anchor's input to every layer
        self.recent: tuple[np.ndarray | None, dict[int, list]] = (None, {})   # the last candidate's
        self.dense = None
        if kind == "kl":
            vocab = model.get_output_embeddings().weight.shape[0]
            keep_logp = sum(b.numel() for b in self.batches) * vocab * 4 <= dense_cache_bytes
            with torch.no_grad():
                self.dense = [self._dense(b, keep_logp) for b in self.batches]
            self.dense_is_logp = keep_logp

    @staticmethod
    def linears_of(model, parts) -> list:
        """The o_proj / down_proj of every part (what a candidate's levels replace)."""
        views = {v.index: v for v in layer_views(model)}
        return [views[p.layer].attn.o if p.kind == "attn" else views[p.layer].mlp.down for p in parts]

    def rebase(self, db: Database) -> None:
        """Score candidates from another database of the same parts (the search's next round): the
        dense reference is kept, the memo and the anchor's kept inputs are dropped."""
        self.db, self.memo, self.anchor_levels, self.anchor_inputs = db, {}, None, {}
        self.recent = (None, {})

    def _dense(self, batch, keep_logp: bool):
        hidden = self.prefix.run(batch, 0, None)[0]
        return F.log_softmax(self.model.get_output_embeddings()(hidden).float(), -1) if keep_logp else hidden

    @contextmanager
    def assembled(self, levels: np.ndarray):
        originals = [lin.weight.data for lin in self.linears]
        try:
            for lin, ws, lv in zip(self.linears, self.db.weights, levels):
                lin.weight.data = ws[int(lv)].to(lin.weight.device)
            yield
        finally:
            for lin, w in zip(self.linears, originals):
                lin.weight.data = w

    def first_change(self, levels: np.ndarray) -> int:
        """The first decoder layer whose weights differ from the anchor's (0 without an anchor)."""
        if self.anchor_levels is None:
            return 0
        diff = np.flatnonzero(np.asarray(levels) != self.anchor_levels)
        return int(self.part_layer[diff].min()) if len(diff) else self.prefix.n_layers - 1

    @torch.no_grad()
    def anchor(self, levels: np.ndarray) -> None:
        """Make `levels` the anchor. Its input to every layer is kept per window: inherited from its
        evaluation if it was the last candidate evaluated (the evolution anchors the survivor it has just
        evaluated), else computed when a candidate first needs it (counted in `tokens`, not in
        `evaluations`)."""
        levels = np.asarray(levels).copy()
        if self.anchor_levels is not None and np.array_equal(levels, self.anchor_levels):
            return
        recent_levels, recent = self.recent
        same = recent_levels is not None and np.array_equal(levels, recent_levels)
        self.anchor_levels, self.anchor_inputs = levels, dict(recent) if same else {}

    def _anchor_inputs(self, windows: list[int]) -> None:
        missing = [b for b in windows if b not in self.anchor_inputs]
        if not missing:
            return
        with self.assembled(self.anchor_levels):
            for b in missing:
                self.anchor_inputs[b] = self.prefix.run(self.batches[b], 0, None)[1]
                self.layers_run += self.prefix.n_layers
                self.tokens += self.batches[b].numel()

    def windows(self, which=None) -> list[int]:
        """Window indices: None = all, n = the first n, else the given indices."""
        if which is None:
            return list(range(len(self.batches)))
        return list(range(which)) if isinstance(which, (int, np.integer)) else [int(b) for b in which]

    @torch.no_grad()
    def __call__(self, levels: np.ndarray, which=None) -> float:
        """Mean per-token KL(dense || candidate) (or NLL) over the windows `which` (see `windows`)."""
        windows = self.windows(which)
        key = (np.asarray(levels, dtype=np.int64).tobytes(), tuple(windows))
        if key in self.memo:
            return self.memo[key]
        total = count = 0.0
        head = self.model.get_output_embeddings()
        start = self.first_change(levels)
        is_anchor = self.anchor_levels is not None and np.array_equal(levels, self.anchor_levels)
        if start > 0 and not is_anchor:
            self._anchor_inputs(windows)
        recent: dict[int, list] = {}
        with self.assembled(levels):
            for b in windows:
                batch = self.batches[b]
                kept = self.anchor_inputs.get(b) if start > 0 else None
                begin = start if kept is not None else 0
                hidden, recent[b] = self.prefix.run(batch, begin, kept)
                self.layers_run += self.prefix.n_layers - begin
                logits = head(hidden).float()
                if self.kind == "kl":
                    dense = self.dense[b] if self.dense_is_logp else F.log_softmax(head(self.dense[b]).float(), -1)
                    total += float(F.kl_div(F.log_softmax(logits, -1), dense, log_target=True, reduction="sum"))
                    count += batch.numel()
                else:
                    total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                   reduction="sum"))
                    count += batch[:, 1:].numel()
        if is_anchor:
            self.anchor_inputs.update(recent)
        self.recent = (np.asarray(levels).copy(), recent)
        self.evaluations += 1
        self.tokens += sum(self.batches[b].numel() for b in windows)
        self.memo[key] = total / count
        return self.memo[key]
