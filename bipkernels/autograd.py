"""The masked weight as a differentiable function: forward z = m ⊙ θ, backward the fused hypergradient.

One backward yields both levels' gradients in one pass (bipkernels.ops.hypergrad):
weight.grad = m ⊙ g and scores.grad = sign(s) ⊙ (θ ⊙ g − inv_gamma · I) (straight-through for the
scores, through the |s| the mask ranks).
``masked_linear`` is the same for a linear layer with the mask inside the matmuls (ops.masked_linear):
the gradients are those of F.linear(input, masked_weight(...), bias).

The backwards are once differentiable: the hypergradient has no derivative of its own here. Running them
without grad also keeps torch.func.grad from tracing into the triton ops, which functorch rejects.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import ops
from .structures import Structure


class _MaskedWeight(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(weight, scores, threshold, structure, inv_gamma, implicit):
        return ops.masked_weight(weight, scores, threshold, structure)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, scores, threshold, ctx.structure, ctx.inv_gamma, ctx.implicit = inputs
        ctx.save_for_backward(weight, scores, threshold)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, scores, threshold = ctx.saved_tensors
        grad_weight, grad_scores = ops.hypergrad_checked(grad, weight, scores, threshold, ctx.structure, None,
                                                         ctx.inv_gamma, ctx.implicit)
        return grad_weight, grad_scores, None, None, None, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: Structure, inv_gamma: float = 0.0, implicit: str = "paper") -> torch.Tensor:
    """Differentiable θ ⊙ m (same shape as ``weight``), gradients to both ``weight`` and ``scores``."""
    inv_gamma = ops.check_implicit_term("bipkernels.autograd.masked_weight", inv_gamma, implicit)
    return _MaskedWeight.apply(weight, scores, threshold, structure, inv_gamma, implicit)


class _MaskedLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, scores, threshold, structure, inv_gamma, implicit):
        return ops.masked_linear(input, weight, scores, threshold, structure, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _, scores, threshold, ctx.structure, ctx.inv_gamma, ctx.implicit = inputs
        ctx.save_for_backward(input, weight, scores, threshold)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        input, weight, scores, threshold = ctx.saved_tensors
        grad_input, grad_weight, grad_scores = ops.masked_linear_backward_checked(
            grad, input, weight, scores, threshold, ctx.structure, None, ctx.inv_gamma, ctx.implicit,
            ctx.needs_input_grad[0])
        grad_bias = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, grad_scores, None, None, None, None


def masked_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scores: torch.Tensor,
                  threshold: torch.Tensor | None, structure: Structure, inv_gamma: float = 0.0,
                  implicit: str = "paper") -> torch.Tensor:
    """Differentiable input (m ⊙ θ)ᵀ + bias by the fused masked matmul (ops.masked_linear), gradients to
    input, weight, bias and scores: (..., in) -> (..., out)."""
    inv_gamma = ops.check_implicit_term("bipkernels.autograd.masked_linear", inv_gamma, implicit)
    return _MaskedLinear.apply(input, weight, bias, scores, threshold, structure, inv_gamma, implicit)
