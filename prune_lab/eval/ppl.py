"""Perplexity: the whole split as one token stream, non-overlapping windows, exp(mean NLL)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import PruneLabError


def windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into [n, seq_len] non-overlapping windows; the remainder is dropped."""
    n = len(stream) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than seq_len={seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def nll_sum(model, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the predicted positions of a [B, L] batch."""
    logits = model(batch.to(model.device)).logits.float()
    targets = batch[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                           reduction="sum")
    return loss.item(), targets.numel()


@torch.no_grad()
def batch_nll(model, batch: torch.Tensor, cuts: Sequence[int] = ()) -> tuple[float, dict]:
    """nll_sum's summed NLL of a [B, L] batch (the same numbers: one log-softmax, summed by nll_loss) and,
    for each k of cuts (0 < k < B), the summed NLL of its first k windows."""
    logits = model(batch.to(model.device)).logits.float()
    targets = batch[:, 1:].to(logits.device).reshape(-1)
    logp = F.log_softmax(logits[:, :-1].reshape(-1, logits.size(-1)), 1)
    del logits
    per = targets.numel() // len(batch)
    parts = {k: F.nll_loss(logp[: k * per], targets[: k * per], reduction="sum").item() for k in cuts}
    return F.nll_loss(logp, targets, reduction="sum").item(), parts


@torch.no_grad()
def perplexities(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16,
                 max_windows: int | None = None, prefix_windows: Sequence[int] = (), progress: bool = True,
                 desc: str = "ppl") -> dict:
    """One pass over the windows -> {None: PPL of every window (up to max_windows), n: PPL of the first n
    windows for each n of prefix_windows}. The full PPL is perplexity()'s of old (batch sums, in order); a
    prefix sums the same batch sums up to its last whole batch, and the NLL of its first windows of the batch
    it ends in: equal to a separate max_windows=n evaluation when n is a multiple of batch_size (the same
    numbers), within round-off otherwise (a smaller last batch)."""
    wins = windows(stream, seq_len, max_windows)
    for n in prefix_windows:
        if n > len(wins):
            raise PruneLabError(f"eval.ppl.prefix_windows: {n} windows asked, the evaluated split holds "
                                f"{len(wins)} of {seq_len} tokens")
    was_training = model.training
    model.eval()
    total, prefix = 0.0, dict.fromkeys(prefix_windows, 0.0)
    for i, batch in enumerate(tqdm(wins.split(batch_size), desc=desc, disable=not progress, leave=False)):
        start = i * batch_size
        cuts = sorted({n - start for n in prefix_windows if start < n < start + len(batch)})
        s, parts = batch_nll(model, batch, cuts)
        total += s
        for n in prefix_windows:
            if n >= start + len(batch):
                prefix[n] += s
            elif n > start:
                prefix[n] += parts[n - start]
    model.train(was_training)
    out = {}
    for n, nll_total in ((None, total), *prefix.items()):
        nll = nll_total / ((len(wins) if n is None else n) * (seq_len - 1))
        if math.isnan(nll):
            raise PruneLabError(f"{desc}: the mean NLL is NaN (NaN/inf logits: fp16 overflow? use "
                                f"model.dtype=bfloat16 or float32)")
        out[n] = math.exp(nll) if nll < 700 else math.inf
    return out


def perplexity(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16,
               max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> float:
    """exp(mean NLL) over the non-overlapping seq_len windows of the stream (the first max_windows)."""
    return perplexities(model, stream, seq_len, batch_size, max_windows, (), progress, desc)[None]
