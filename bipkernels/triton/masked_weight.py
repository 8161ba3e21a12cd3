"""block_mask and masked_weight in Triton: one elementwise pass over the weight with the shared keep rule
(mask_rule.kept). masked_weight is a select, so a pruned NaN or inf weight gives exactly 0."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import mask_rule
from .layout import check_float, check_like, launch_size, on_device, structure_of, traceable

_BLOCK = launch_size(1024, 64)


@triton.jit
def _masked_weight_kernel(scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols, weight_ptr, out_ptr,
                          n, KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr,
                          MASK_ONLY: tl.constexpr, BLOCK: tl.constexpr):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = flat < n
    keep = mask_rule.kept_flat(scores_ptr, block_scores_ptr, threshold_ptr, flat, valid, cols, inner, tile_cols,
                               KIND, A, B, F64)
    if MASK_ONLY:
        tl.store(out_ptr + flat, keep, mask=valid)
    else:
        weight = tl.load(weight_ptr + flat, mask=valid)
        tl.store(out_ptr + flat, tl.where(keep, weight, tl.zeros_like(weight)), mask=valid)


def _apply(op: str, scores: torch.Tensor, threshold: torch.Tensor, structure, weight: torch.Tensor | None):
    """The mask (``weight`` None) or θ ⊙ m, contiguous, shaped like ``scores``; no launch when empty."""
    scores = scores.contiguous()
    out = torch.empty(scores.shape, dtype=torch.bool if weight is None else weight.dtype, device=scores.device)
    if out.numel():
        mask = mask_rule.prepare(op, scores, threshold, structure)
        traceable(_masked_weight_kernel)[(triton.cdiv(out.numel(), _BLOCK),)](
            *mask.args, scores if weight is None else weight.contiguous(), out, out.numel(), **mask.meta,
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
    """θ ⊙ m, contiguous, shape and dtype of ``weight`` (bipkernels.ops.masked_weight)."""
    op = "masked_weight"
    check_float(op, "weight", weight)
    check_like(op, "scores", scores, "weight", weight)
    with on_device(weight):
        return _apply(op, scores, threshold, structure_of(op, scores, kind, a, b, p), weight)
