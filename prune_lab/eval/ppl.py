"""Perplexity: the whole split as one token stream, non-overlapping windows, exp(mean NLL)."""
from __future__ import annotations

import math

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
def perplexity(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 16,
               max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(windows(stream, seq_len, max_windows).split(batch_size), desc=desc,
                      disable=not progress, leave=False):
        s, c = nll_sum(model, batch)
        total, count = total + s, count + c
    model.train(was_training)
    nll = total / count
    if math.isnan(nll):
        raise PruneLabError(f"{desc}: the mean NLL is NaN (NaN/inf logits: fp16 overflow? use "
                            f"model.dtype=bfloat16 or float32)")
    return math.exp(nll) if nll < 700 else math.inf
