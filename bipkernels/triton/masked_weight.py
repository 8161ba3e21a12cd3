"""block_mask and masked_weight in Triton: one elementwise pass over the weight with the shared keep rule
(mask_rule.kept). masked_weight is a select, so a pruned NaN or inf weight gives exactly 0. Under an
unstructured mask, a dense weight and scores of one layout (channels_last, any permutation) run where they
lie, into a result of that layout, as the C++ kernels and the reference give it (keeps_weight_layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..reference import in_result_layout, keeps_weight_layout
from . import mask_rule
from .layout import check_float, check_like, launch_size, on_device, structure_of, traceable

_BLOCK = launch_size(1024, 64)


@triton.jit
def _masked_weight_kernel(scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols, weight_ptr, out_ptr,
                          n, size0, stride0, size1, stride1, size2, stride2, size3, stride3, KIND: tl.constexpr,
                          A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr, ORDER: tl.constexpr,
                          MASK_ONLY: tl.constexpr, BLOCK: tl.constexpr):
    """``flat``: the elements' memory offsets, in logical order unless ORDER (mask_rule.Order)."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = flat < n
    keep = mask_rule.kept_flat(scores_ptr, block_scores_ptr, threshold_ptr, flat, valid, cols, inner, tile_cols,
                               size0, stride0, size1, stride1, size2, stride2, size3, stride3, KIND, A, B, F64, ORDER)
    if MASK_ONLY:
        tl.store(out_ptr + flat, keep, mask=valid)
    else:
        weight = tl.load(weight_ptr + flat, mask=valid)
        tl.store(out_ptr + flat, tl.where(keep, weight, tl.zeros_like(weight)), mask=valid)


def _apply(op: str, scores: torch.Tensor, threshold: torch.Tensor, structure, weight: torch.Tensor | None,
           order: mask_rule.Order | None = None):
    """The mask (``weight`` None) or θ ⊙ m, shaped like ``scores``: over the tensors where they lie, into
    a result of weight's strides, for an ``order`` of theirs (mask_rule.memory_order, unstructured mask,
    scores of weight's strides); contiguous for None. No launch when empty."""
    if order is None:
        scores, weight = scores.contiguous(), None if weight is None else weight.contiguous()
    out = torch.empty(scores.shape, dtype=torch.bool if weight is None else weight.dtype, device=scores.device) \
        if order is None else weight.new_empty_strided(weight.shape, weight.stride())
    if out.numel():
        mask = mask_rule.prepare(op, scores, threshold, structure)
        traceable(_masked_weight_kernel)[(triton.cdiv(out.numel(), _BLOCK),)](
            *mask.args, scores if weight is None else weight, out, out.numel(),
            *(order or mask_rule.LOGICAL).args, **mask.meta, **(order or mask_rule.LOGICAL).meta,
            MASK_ONLY=weight is None, BLOCK=_BLOCK)
    return out


@triton_op("bipkernels_triton::block_mask", mutates_args=())
def block_mask(scores: torch.Tensor, threshold: torch.Tensor, kind: int, a: int, b: int, p: int) -> torch.Tensor:
    """Bool mask shaped like ``scores`` (bipkernels.ops.block_mask)."""
    check_float("block_mask", "scores", scores)
    with on_device(scores):
        return _apply("block_mask", scores, threshold, structure_of("block_mask", scores, kind, a, b, p), None)


@triton_op("bipkernels_triton::masked_weight", mutates_args=())
def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor, kind: int, a: int, b: int,
                  p: int) -> torch.Tensor:
    """θ ⊙ m, shape and dtype of ``weight``, in its layout under keeps_weight_layout, else contiguous
    (bipkernels.ops.masked_weight)."""
    op = "masked_weight"
    check_float(op, "weight", weight)
    check_like(op, "scores", scores, "weight", weight)
    structure = structure_of(op, scores, kind, a, b, p)
    keep_layout = keeps_weight_layout(structure, weight, scores)
    order = mask_rule.memory_order(weight) if keep_layout else None
    with on_device(weight):
        masked = _apply(op, scores, threshold, structure, weight, order)
    # A layout of more dims than the kernel indexes ran on contiguous copies: the result takes weight's.
    return in_result_layout(masked, True, weight) if keep_layout and order is None else masked
