"""Autograd of the compiled ops that have a derivative, so that calling them on tensors that require grad
gives the gradients the torch backend (bipkernels.reference) gives:

- ``masked_weight``: ∂(m ⊙ θ)/∂θ = m, so grad_θ = m ⊙ g (masked_weight applied to g: a select, exact);
  the mask is piecewise constant in the scores, which get no gradient (as torch.where gives none).
- ``block_scores``: the reference's own derivative (sign(s) · g of the block for p = 1, 2s · g for
  p = 2; 0 at s = 0), by differentiating reference.block_scores in the backward (again under
  create_graph: a Hessian).

topk_threshold, block_mask and hypergrad have none (a threshold, a bool mask, gradients): bipkernels.ops
runs them without grad on every backend. The masked layers never reach these: they call the ops inside
their own autograd.Functions (bipkernels.autograd), whose backward is the fused hypergradient.

And the one vmap rule they need: torch.vmap's fallback (a loop over the batch) serves the ops of tensor
arguments, but not topk_threshold, whose scores are a list ("Batching rule not implemented ... could not
generate a fallback", where the torch backend's reference vmaps as it is).
"""

from __future__ import annotations

import torch

from . import reference
from .structures import KINDS, Structure


def _structure(kind: int, a: int, b: int, p: int) -> Structure:
    return Structure(KINDS[kind], a, b, p)


def _save_masked_weight(ctx, inputs, output) -> None:
    _, scores, threshold, *ctx.structure = inputs
    ctx.save_for_backward(scores, threshold)


def _save_block_scores(ctx, inputs, output) -> None:
    scores, *ctx.structure = inputs
    ctx.save_for_backward(scores)


def _block_scores_backward(ctx, grad):
    (scores,) = ctx.saved_tensors
    # Under create_graph the derivative is built on the scores themselves, so that autograd can
    # differentiate it again (2 · g for p = 2); otherwise on a detached copy, keeping no graph.
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        source = scores if create_graph and scores.requires_grad else scores.detach().requires_grad_()
        summed = reference.block_scores(source, _structure(*ctx.structure))
        (grad_scores,) = torch.autograd.grad(summed, source, grad, create_graph=create_graph)
    return grad_scores, None, None, None, None


def register(namespace: str) -> None:
    """Registers the derivatives of ``namespace``'s masked_weight and block_scores, and the vmap rule of its
    topk_threshold ("bipkernels" for the C++ ops, "bipkernels_triton" for the triton ones, once they are
    defined)."""
    ops = getattr(torch.ops, namespace)

    def topk_threshold_batched(info, in_dims, block_scores, k, absolute=False):
        # One top-k per batch entry, over that entry's tensors (an unbatched tensor takes part in every one),
        # as the reference gives under vmap: (batch, L, 2). An empty batch gives (0, L, 2) (the reference
        # cannot: torch's vmap of its reshape raises there).
        rows = [ops.topk_threshold([scores if dim is None else scores.select(dim, entry)
                                    for scores, dim in zip(block_scores, in_dims[0])], k, absolute)
                for entry in range(info.batch_size)]
        if not rows:
            return torch.empty(0, len(block_scores), 2, dtype=torch.float64, device=block_scores[0].device), 0
        return torch.stack(rows), 0

    torch.library.register_vmap(f"{namespace}::topk_threshold", topk_threshold_batched)

    def masked_weight_backward(ctx, grad):
        scores, threshold = ctx.saved_tensors
        return ops.masked_weight(grad.contiguous(), scores, threshold, *ctx.structure), None, None, None, None, \
            None, None

    torch.library.register_autograd(f"{namespace}::masked_weight", masked_weight_backward,
                                    setup_context=_save_masked_weight)
    torch.library.register_autograd(f"{namespace}::block_scores", _block_scores_backward,
                                    setup_context=_save_block_scores)
