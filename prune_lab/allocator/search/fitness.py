"""Fitness of a candidate (one level per layer part): KL divergence of its next-token distribution from
the dense model's (Týr, EvoPress), or its perplexity on the tokens, on calibration windows. The dense
model's final hidden states are computed once; its logits are recomputed from them through the
(unchanged) lm_head, so no vocabulary-sized tensor is kept. A candidate is assembled by swapping the
database's o_proj / down_proj weights into the model (no copy of the model)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ...core.adapter import layer_views
from .levels import Database

KINDS = ("kl", "ppl")


class Fitness:
    def __init__(self, model, db: Database, batches: list[torch.Tensor], kind: str = "kl"):
        self.model, self.db, self.kind = model, db, kind
        self.batches = [b.to(model.device) for b in batches]
        views = {v.index: v for v in layer_views(model)}
        self.linears = [views[p.layer].attn.o if p.kind == "attn" else views[p.layer].mlp.down for p in db.parts]
        self.evaluations = self.tokens = 0
        self.dense_hidden = [self._hidden(b) for b in self.batches] if kind == "kl" else None

    @torch.no_grad()
    def _hidden(self, batch):
        return self.model.model(input_ids=batch).last_hidden_state

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

    @torch.no_grad()
    def __call__(self, levels: np.ndarray, n_batches: int | None = None) -> float:
        """Mean per-token KL(dense || candidate) (or NLL) over the first n_batches windows."""
        n = len(self.batches) if n_batches is None else n_batches
        total = count = 0.0
        head = self.model.get_output_embeddings()
        with self.assembled(levels):
            for b in range(n):
                batch = self.batches[b]
                logits = head(self._hidden(batch)).float()
                if self.kind == "kl":
                    dense = F.log_softmax(head(self.dense_hidden[b]).float(), -1)
                    total += float(F.kl_div(F.log_softmax(logits, -1), dense, log_target=True,
                                            reduction="sum"))
                    count += batch.numel()
                else:
                    total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                   reduction="sum"))
                    count += batch[:, 1:].numel()
        self.evaluations += 1
        self.tokens += sum(self.batches[b].numel() for b in range(n))
        return total / count
