"""verify=true: the pruned model must compute what the dense model computes with the pruned units
zeroed. The verdict is printed and recorded; a difference beyond the dtype's tolerance fails the run.

Tolerance = rtol(dtype) x max(1, max |reference logit|): pruned and masked models sum the same
products in a different order and shape, so they agree to rounding, which scales with the logits
and the dtype's precision (measured: README "verify").
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..errors import PruneLabError
from .executor import zero_units
from .plan import PruningPlan

log = logging.getLogger("prune_lab")
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@torch.no_grad()
def verify_pruning(pruned: nn.Module, dense: nn.Module, plan: PruningPlan, batch: torch.Tensor) -> dict:
    """-> {max_logit_diff, tolerance, dtype, passed}. Zeroes `dense` in place: pass a copy."""
    reference = zero_units(dense, plan)
    a = pruned(batch.to(pruned.device)).logits.float()
    b = reference(batch.to(reference.device)).logits.float()
    diff = (a - b).abs().max().item()
    dtype = next(pruned.parameters()).dtype
    tolerance = RTOL.get(dtype, 1e-2) * max(1.0, b.abs().max().item())
    passed = diff <= tolerance                  # False for NaN too
    log.info("verify: max |pruned - masked dense| logit = %.3g, tolerance %.3g (%s): %s", diff, tolerance,
             str(dtype).removeprefix("torch."), "PASS" if passed else "FAIL")
    return {"max_logit_diff": diff, "tolerance": tolerance, "dtype": str(dtype).removeprefix("torch."),
            "passed": passed}


def require_passed(verdict: dict) -> None:
    if not verdict["passed"]:
        raise PruneLabError(f"verify failed: the pruned model's logits differ from the masked dense model's "
                            f"by {verdict['max_logit_diff']:.3g}, over the {verdict['dtype']} tolerance "
                            f"{verdict['tolerance']:.3g}")
