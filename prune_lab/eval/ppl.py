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
def window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window of a [B, L] batch: a float64 [B] tensor (L - 1 tokens each)."""
    logits = model(batch.to(model.device)).logits.float()
    targets = batch[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).double().sum(1).cpu()


@torch.no_grad()
def perplexities(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16,
                 max_windows: int | None = None, prefix_windows: Sequence[int] = (), progress: bool = True,
                 desc: str = "ppl") -> dict:
    """One pass over the windows -> {None: PPL of every window (up to max_windows), n: PPL of the first n
    windows for each n of prefix_windows}. A prefix equals a separate max_windows=n evaluation: the
    per-window NLL sums are the same numbers, accumulated in window order (float64)."""
    was_training = model.training
    model.eval()
    sums = []
    for batch in tqdm(windows(stream, seq_len, max_windows).split(batch_size), desc=desc,
                      disable=not progress, leave=False):
        sums.append(window_nll(model, batch))
    model.train(was_training)
    sums = torch.cat(sums)
    out = {}
    for n in (None, *prefix_windows):
        if n is not None and n > len(sums):
            raise PruneLabError(f"eval.ppl.prefix_windows: {n} windows asked, the evaluated split holds "
                                f"{len(sums)} of {seq_len} tokens")
        part = sums if n is None else sums[:n]
        nll = float(part.sum()) / (part.numel() * (seq_len - 1))
        if math.isnan(nll):
            raise PruneLabError(f"{desc}: the mean NLL is NaN (NaN/inf logits: fp16 overflow? use "
                                f"model.dtype=bfloat16 or float32)")
        out[n] = math.exp(nll) if nll < 700 else math.inf
    return out


def perplexity(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16,
               max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> float:
    """exp(mean NLL) over the non-overlapping seq_len windows of the stream (the first max_windows)."""
    return perplexities(model, stream, seq_len, batch_size, max_windows, (), progress, desc)[None]
