"""Distillation losses (finetune=distill), pure tensor math over whole batches.

All positions of a window count: teacher and student see the same context, so every position's
next-token distribution is a target (the CE term drops the last one, as Hugging Face's loss does).
"""
from __future__ import annotations

import torch


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over positions of KL(softmax(t/T) ‖ softmax(s/T)) (the T² keeps the gradient scale of
    T = 1, Hinton et al.). Logits (..., V); fp32 whatever the model dtype."""
    log_p = (teacher_logits.float() / temperature).log_softmax(-1)
    log_q = (student_logits.float() / temperature).log_softmax(-1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kl_topk(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """kl() over the teacher's top-k tokens of each position: `values`/`indices` (..., k) are the
    teacher's k largest logits; both distributions are renormalised on that support (so k = V is kl())."""
    return kl(student_logits.gather(-1, indices.long()), values, temperature)


def hidden_mse(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over the chosen layers of the mean squared error between the student's and the teacher's
    output hidden states ((student, teacher) pairs of (..., hidden) tensors)."""
    return torch.stack([(s.float() - t.float()).pow(2).mean() for s, t in pairs]).mean()


def layer_map(num_dense_layers: int, removed: list[int] | tuple[int, ...]) -> dict[int, int]:
    """Dense layer index -> the student's index of the same layer; layers removed whole are absent."""
    kept = [i for i in range(num_dense_layers) if i not in set(removed)]
    return {dense: student for student, dense in enumerate(kept)}
