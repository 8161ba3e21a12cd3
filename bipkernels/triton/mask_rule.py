"""The keep rule of every Triton kernel that applies a mask: the Triton twin of math.h's MaskRule.

An element (row, col) of the weight's matrix view is kept
- unstructured: iff |s| (in the score type) passes the threshold at its flat index;
- filter, channel, tile: iff its block's score (block_scores, computed once per call) passes the
  threshold at the block's flat index;
- N:M: iff |s| is not NaN and fewer than N members of its group of M beat it (a larger |s|, or an equal
  one at a lower position); no threshold.
The threshold (value, cut) keeps a score iff score > value, or score == value and index < cut (NaN never).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..structures import Structure
from . import block_scores
from .layout import CHANNEL, FILTER, NM, UNSTRUCTURED, check_threshold, matrix_of, widen


@triton.jit
def to_score(x, F64: tl.constexpr):
    """``x`` in the score type: float64 for float64 tensors, float32 for the others (exactly: widen)."""
    if F64:
        return widen(x).to(tl.float64)
    else:
        return widen(x).to(tl.float32)


@triton.jit
def load_threshold(threshold_ptr, F64: tl.constexpr):
    """(value in the score type, cut in float64); the value converts exactly (it came from such a score)."""
    return to_score(tl.load(threshold_ptr), F64), tl.load(threshold_ptr + 1)


@triton.jit
def is_kept(score, value, cut, index):
    # A NaN score fails both comparisons; the index converts exactly (below 2^53).
    return (score > value) | ((score == value) & (index.to(tl.float64) < cut))


@triton.jit
def _magnitude(scores_ptr, offsets, valid, F64: tl.constexpr):
    return tl.abs(to_score(tl.load(scores_ptr + offsets, mask=valid, other=0.0), F64))


@triton.jit
def kept(scores_ptr, block_scores_ptr, value, cut, row, col, valid, cols, inner, tile_cols,
         KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr):
    """Whether the elements at (row, col) (int64 tensors that broadcast together) are kept; ``valid``
    masks the loads of the elements that do not exist."""
    if KIND == UNSTRUCTURED:
        flat = row * cols + col
        keep = is_kept(_magnitude(scores_ptr, flat, valid, F64), value, cut, flat)
    elif KIND == NM:
        position = (col // inner) % B
        first = row * cols + col - position * inner  # the group's member 0: same row and kernel position
        mine = _magnitude(scores_ptr, first + position * inner, valid, F64)
        beaten_by = tl.zeros(mine.shape, dtype=tl.int32)
        for j in tl.static_range(B):
            other = _magnitude(scores_ptr, first + j * inner, valid, F64)
            beaten_by += ((other > mine) | ((other == mine) & (position > j))).to(tl.int32)
        keep = (mine == mine) & (beaten_by < A)
    else:
        if KIND == FILTER:
            block = row + col * 0
        elif KIND == CHANNEL:
            block = col // inner + row * 0
        else:
            block = (row // A) * tile_cols + col // B
        keep = is_kept(tl.load(block_scores_ptr + block, mask=valid, other=0.0), value, cut, block)
    return keep


@triton.jit
def kept_flat(scores_ptr, block_scores_ptr, threshold_ptr, flat, valid, cols, inner, tile_cols,
              KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr):
    """``kept`` at int64 flat indices of the weight (the elementwise kernels' entry)."""
    value, cut = load_threshold(threshold_ptr, F64)
    row = flat // cols  # unused (and compiled away) for unstructured masks
    return kept(scores_ptr, block_scores_ptr, value, cut, row, flat - row * cols, valid, cols, inner, tile_cols,
                KIND, A, B, F64)


class Mask(NamedTuple):
    """The launch arguments of the keep rule: ``args`` lead a kernel's positional arguments
    (scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols), ``meta`` are its constexprs."""

    args: tuple
    meta: dict


def prepare(op: str, scores: torch.Tensor, threshold: torch.Tensor, structure: Structure) -> Mask:
    """The keep rule of contiguous ``scores``: block scores computed here for filter, channel and tile
    (unused placeholders stand in for the block scores, and for N:M's threshold, that are never read)."""
    check_threshold(op, threshold, scores, structure)
    matrix = matrix_of(scores.shape, structure)
    blocks = block_scores.compute(scores, structure) if structure.kind in ("filter", "channel", "tile") else scores
    # N:M's threshold may be any tensor anywhere (even a CPU one for GPU scores, which the launcher would
    # refuse as a pointer): a placeholder beside the scores stands in, as in the C++ ops.
    threshold = threshold.contiguous() if structure.uses_threshold else \
        torch.empty(2, dtype=torch.float64, device=scores.device)
    # cols >= 1 keeps flat // cols defined in a matmul over an empty weight (it loads no tile).
    return Mask((scores, blocks, threshold, max(matrix.cols, 1), matrix.inner, matrix.tile_cols),
                dict(KIND=structure.kind_id, A=structure.a, B=structure.b, F64=scores.dtype == torch.float64))
