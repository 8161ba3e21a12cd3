"""The masked weight as a differentiable function: forward z = m ⊙ θ, backward the fused hypergradient.

One backward yields both levels' gradients in one pass (bipkernels.ops.hypergrad):
weight.grad = m ⊙ g and scores.grad = sign(s) ⊙ (θ ⊙ g − inv_gamma · I) (straight-through for the
scores, through the |s| the mask ranks).
``masked_linear`` is the same for a linear layer with the mask inside the matmuls (ops.masked_linear):
the gradients are those of F.linear(input, masked_weight(...), bias).

Under torch.autograd's create_graph (a Hessian, a grad of a grad) a backward computes the same gradients
from the forward's mask with the reference's torch operations (reference.hypergrad_of_mask, the matmuls
in the weight's accumulation type), which autograd differentiates again: grad_θ = m ⊙ g is linear in g,
grad_s is a polynomial in θ and g, and the mask is piecewise constant in the scores (no derivative
through it). Otherwise the fused kernels run, also under torch.func transforms: torch.func.grad runs
every backward with grad on, so taking the unfused path there would slow its first-order gradients
(twice the time of a step measured on a 1024×1024 layer) for the rare nested transform, whose second
derivatives through these layers are zero. Both run the ops without grad, which keeps functorch from
tracing into the triton ops, which it rejects.
"""

from __future__ import annotations

import math

import torch

from . import ops, reference
from .structures import Structure


# torch.compile of the torch backend's (bipkernels.reference's) backward inside these Functions gives zero
# weight and score gradients on torch 2.11 (measured; 2.14.1 is right): refused there rather than wrong.
COMPILES_TORCH_BACKEND = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


def _check_compilable(owner: str, weight: torch.Tensor) -> None:
    if (not COMPILES_TORCH_BACKEND and torch.compiler.is_compiling()
            and ops.backend_for("masked_weight", weight.device) == "torch"):
        raise RuntimeError(f"{owner}: torch.compile of the masked layers on the torch backend (no compiled "
                           f"extension) needs torch >= 2.14: torch {torch.__version__} compiles their backward with "
                           "zero gradients; build the extension (the cpu backend compiles) or run eagerly")


def _differentiable_backward() -> bool:
    """Whether a backward runs under torch.autograd's create_graph (see the module docstring)."""
    return torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()


@torch.no_grad()  # functorch's grad transform would trace into the triton op, which it rejects
def _mask(scores: torch.Tensor, threshold: torch.Tensor | None, structure: Structure) -> torch.Tensor:
    return ops.block_mask(scores, threshold, structure)


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
    def backward(ctx, grad):
        weight, scores, threshold = ctx.saved_tensors
        if _differentiable_backward():  # the forward's mask, the reference's differentiable formula
            mask = _mask(scores, threshold, ctx.structure)
            grad_weight, grad_scores = reference.hypergrad_of_mask(grad, weight, scores, mask, ctx.inv_gamma,
                                                                   ctx.implicit)
        else:
            with torch.no_grad():  # the fused kernel (see _mask)
                grad_weight, grad_scores = ops.hypergrad_checked(grad, weight, scores, threshold, ctx.structure,
                                                                 None, ctx.inv_gamma, ctx.implicit)
        return grad_weight, grad_scores, None, None, None, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: Structure, inv_gamma: float = 0.0, implicit: str = "paper") -> torch.Tensor:
    """Differentiable θ ⊙ m (same shape as ``weight``), gradients to both ``weight`` and ``scores``."""
    inv_gamma = ops.check_implicit_term("bipkernels.autograd.masked_weight", inv_gamma, implicit, weight.dtype)
    _check_compilable("bipkernels.autograd.masked_weight", weight)
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
    def backward(ctx, grad):
        input, weight, scores, threshold = ctx.saved_tensors
        rows = math.prod(grad.shape[:-1])  # (reshape cannot infer -1 for an empty layer)
        if _differentiable_backward():  # unfused matmuls, the reference's differentiable formula
            mask = _mask(scores, threshold, ctx.structure)
            grad_input = grad @ torch.where(mask, weight, 0) if ctx.needs_input_grad[0] else None
            # G = gᵀ x in the accumulation type, as the fused epilogue keeps it (θ G − γ I may cancel).
            acc = reference.score_dtype(weight.dtype)
            grad_masked = grad.reshape(rows, grad.shape[-1]).mT.to(acc) @ input.reshape(rows, input.shape[-1]).to(acc)
            grad_weight, grad_scores = reference.hypergrad_of_mask(grad_masked, weight, scores, mask, ctx.inv_gamma,
                                                                   ctx.implicit)
        else:
            with torch.no_grad():  # the fused kernels (see _mask)
                grad_input, grad_weight, grad_scores = ops.masked_linear_backward_checked(
                    grad, input, weight, scores, threshold, ctx.structure, None, ctx.inv_gamma, ctx.implicit,
                    ctx.needs_input_grad[0])
        grad_bias = grad.reshape(rows, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, grad_scores, None, None, None, None


def masked_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scores: torch.Tensor,
                  threshold: torch.Tensor | None, structure: Structure, inv_gamma: float = 0.0,
                  implicit: str = "paper") -> torch.Tensor:
    """Differentiable input (m ⊙ θ)ᵀ + bias by the fused masked matmul (ops.masked_linear), gradients to
    input, weight, bias and scores: (..., in) -> (..., out)."""
    inv_gamma = ops.check_implicit_term("bipkernels.autograd.masked_linear", inv_gamma, implicit, weight.dtype)
    _check_compilable("bipkernels.autograd.masked_linear", weight)
    return _MaskedLinear.apply(input, weight, bias, scores, threshold, structure, inv_gamma, implicit)
