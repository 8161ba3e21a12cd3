"""The masked weight as a differentiable function: forward z = m ⊙ θ, backward the fused hypergradient.

One backward yields both levels' gradients in one pass (bipkernels.ops.hypergrad):
weight.grad = m ⊙ g and scores.grad = θ ⊙ g − inv_gamma · I (straight-through for the scores).
"""

from __future__ import annotations

import torch

from . import ops
from .structures import Structure


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scores, threshold, structure, inv_gamma, implicit):
        ctx.save_for_backward(weight, scores, threshold)
        ctx.structure, ctx.inv_gamma, ctx.implicit = structure, inv_gamma, implicit
        return ops.masked_weight(weight, scores, threshold, structure)

    @staticmethod
    def backward(ctx, grad):
        weight, scores, threshold = ctx.saved_tensors
        grad_weight, grad_scores = ops.hypergrad(grad, weight, scores, threshold, ctx.structure,
                                                 inv_gamma=ctx.inv_gamma, implicit=ctx.implicit)
        return grad_weight, grad_scores, None, None, None, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: Structure, inv_gamma: float = 0.0, implicit: str = "paper") -> torch.Tensor:
    """Differentiable θ ⊙ m (same shape as ``weight``), gradients to both ``weight`` and ``scores``."""
    return _MaskedWeight.apply(weight, scores, threshold, structure, inv_gamma, implicit)
