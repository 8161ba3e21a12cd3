"""The fused backward of z = m ⊙ θ in Triton (bipkernels.reference.hypergrad), in one elementwise pass:

    grad_θ = m ⊙ g      grad_s = sign(s) ⊙ (θ ⊙ g − inv_gamma · I),  I = m ⊙ g ⊙ g (paper) or (θ ⊙ g)² (released)

computed in the score type (float32 for half types). ``values`` is the arithmetic alone; the masked
matmul's weight-gradient epilogue applies it too. Under an unstructured mask, dense g, θ and s of one
layout (channels_last, any permutation) run where they lie, into results of that layout, as the C++
kernels and the reference give them (keeps_weight_layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..reference import IMPLICIT_FORMS, in_result_layout, keeps_weight_layout, largest_inv_gamma, score_dtype
from . import mask_rule
from .layout import (check_float, check_like, launch_size, narrow, on_device, product, structure_of, traceable,
                     widen)

_BLOCK = launch_size(1024, 64)


@triton.jit
def values(grad, theta, keep, negative, inv_gamma, RELEASED: tl.constexpr):
    """(grad_θ, grad_s) of one element from g and θ in the accumulation type (math.h hypergrad_element).
    grad_θ is a select: g may be inf or NaN where pruned. ``negative``: s < 0, where grad_s changes sign."""
    direct = product(theta, grad)  # products rounded on their own, as in the C++ kernels (layout.product)
    if RELEASED:
        implicit = direct * direct
    else:
        implicit = tl.where(keep, grad * grad, tl.zeros_like(grad))
    # inv_gamma 0 is the plain straight-through gradient, even where g * g overflows (0 * inf is NaN).
    grad_mask = tl.where(inv_gamma == 0, direct, direct - product(inv_gamma, implicit))
    # The sign flip as a product: triton 3.6 builds -x as 0 - x (3.8 as a negation), so -(+0.0) was +0.0
    # where the reference's grad_s is -0.0; x · -1 is exact and gives -0.0 on every version.
    return tl.where(keep, grad, tl.zeros_like(grad)), tl.where(negative, grad_mask * -1.0, grad_mask)


def inv_gamma_tensor(inv_gamma: float, device: torch.device) -> torch.Tensor:
    """inv_gamma as a float64 device scalar: a float kernel argument would be float32, too coarse for
    float64 weights (the kernels convert it to their accumulation type, as the C++ kernels do)."""
    return torch.full((1,), inv_gamma, dtype=torch.float64, device=device)


def implicit_is_released(op: str, weight: torch.Tensor, inv_gamma: float, implicit: int) -> bool:
    """Whether ``implicit`` names the released form, after checking it (0 or 1) and inv_gamma: a number in
    [0, reference.largest_inv_gamma] for ``weight``'s dtype, as checks.h and the ops do. ValueError names
    both."""
    if implicit not in range(len(IMPLICIT_FORMS)):
        raise ValueError(f"bipkernels.{op}: implicit must be 0 (paper) or 1 (released), got {implicit}")
    arithmetic, largest = score_dtype(weight.dtype), largest_inv_gamma(weight.dtype)
    if not 0 <= inv_gamma <= largest:  # NaN fails too
        raise ValueError(f"bipkernels.{op}: inv_gamma must be a number in [0, {largest:g}] (the {arithmetic} "
                         f"arithmetic of {weight.dtype} weights), got {inv_gamma}")
    return IMPLICIT_FORMS[implicit] == "released"


@triton.jit
def _hypergrad_kernel(scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols, grad_ptr, weight_ptr,
                      inv_gamma_ptr, grad_weight_ptr, grad_scores_ptr, n, parts, size0, stride0, size1, stride1,
                      size2, stride2, size3, stride3, KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                      F64: tl.constexpr, ORDER: tl.constexpr, RELEASED: tl.constexpr, BLOCK: tl.constexpr):
    """g is the sum of the ``parts`` slices (each n long) at grad_ptr, added in slice order. ``flat``: the
    elements' memory offsets, in logical order unless ORDER (mask_rule.Order)."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = flat < n
    keep = mask_rule.kept_flat(scores_ptr, block_scores_ptr, threshold_ptr, flat, valid, cols, inner, tile_cols,
                               size0, stride0, size1, stride1, size2, stride2, size3, stride3, KIND, A, B, F64, ORDER)
    grad = mask_rule.to_score(tl.load(grad_ptr + flat, mask=valid), F64)
    offsets = flat
    for _ in range(1, parts):
        offsets += n  # int64, as flat
        grad += mask_rule.to_score(tl.load(grad_ptr + offsets, mask=valid), F64)
    theta = mask_rule.to_score(tl.load(weight_ptr + flat, mask=valid), F64)
    inv_gamma = mask_rule.to_score(tl.load(inv_gamma_ptr), F64)
    # Widened: the interpreter reads a negative bfloat16 subnormal as 0, which would keep its sign.
    negative = widen(tl.load(scores_ptr + flat, mask=valid, other=0.0)) < 0
    grad_weight, grad_scores = values(grad, theta, keep, negative, inv_gamma, RELEASED)
    tl.store(grad_weight_ptr + flat, narrow(grad_weight, grad_weight_ptr.dtype.element_ty), mask=valid)
    tl.store(grad_scores_ptr + flat, narrow(grad_scores, grad_scores_ptr.dtype.element_ty), mask=valid)


def launch(mask: mask_rule.Mask, grad: torch.Tensor, weight: torch.Tensor, inv_gamma: float, released: bool,
           grad_weight: torch.Tensor, grad_scores: torch.Tensor, order: mask_rule.Order = mask_rule.LOGICAL) -> None:
    """Writes grad_θ and grad_s (laid out like ``weight``, not empty) from g = the sum of grad's slices of
    weight's size in order (grad (slices, *weight.shape) or weight.shape, any float dtype); ``mask`` from
    mask_rule.prepare for weight's scores. All contiguous, or for an ``order`` (mask_rule.memory_order;
    an unstructured mask, one slice) all of weight's strides."""
    traceable(_hypergrad_kernel)[(triton.cdiv(weight.numel(), _BLOCK),)](
        *mask.args, grad, weight, inv_gamma_tensor(inv_gamma, weight.device), grad_weight, grad_scores,
        weight.numel(), grad.numel() // weight.numel(), *order.args, **mask.meta, **order.meta, RELEASED=released,
        BLOCK=_BLOCK)


@triton_op("bipkernels_triton::hypergrad", mutates_args=())
def hypergrad(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor, kind: int,
              a: int, b: int, p: int, inv_gamma: float, implicit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_θ, grad_s), shape and dtype of ``weight``, in its layout under keeps_weight_layout, else
    contiguous (bipkernels.ops.hypergrad)."""
    op = "hypergrad"
    check_float(op, "weight", weight)
    check_like(op, "grad", grad, "weight", weight)
    check_like(op, "scores", scores, "weight", weight)
    structure = structure_of(op, scores, kind, a, b, p)
    released = implicit_is_released(op, weight, inv_gamma, implicit)
    keep_layout = keeps_weight_layout(structure, weight, scores, grad)
    order = mask_rule.memory_order(weight) if keep_layout else None
    weight_in = weight
    if order is None:  # contiguous copies
        grad, weight_in, scores = grad.contiguous(), weight.contiguous(), scores.contiguous()
        grad_weight, grad_scores = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                                    for _ in range(2))
    else:  # strides given, not empty_like: a fake (torch.compile's) empty_like of an empty tensor is contiguous
        grad_weight, grad_scores = (weight.new_empty_strided(weight.shape, weight.stride()) for _ in range(2))
    if weight.numel():
        with on_device(weight):
            mask = mask_rule.prepare(op, scores, threshold, structure)
            launch(mask, grad, weight_in, inv_gamma, released, grad_weight, grad_scores, order or mask_rule.LOGICAL)
    if keep_layout and order is None:  # a layout of more dims than the kernel indexes: the results take weight's
        return in_result_layout(grad_weight, True, weight), in_result_layout(grad_scores, True, weight)
    return grad_weight, grad_scores
