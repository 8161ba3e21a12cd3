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
def logical_index(offset, size0, stride0, size1, stride1, size2, stride2, size3, stride3, ORDER: tl.constexpr):
    """The row-major index of the element at memory ``offset`` of a dense tensor whose ORDER dims (Order:
    merged, size > 1, in logical order) have these sizes and strides; ORDER 0: the offset itself."""
    index = offset
    if ORDER > 0:
        index = (offset // stride0) % size0
    if ORDER > 1:
        index = index * size1 + (offset // stride1) % size1
    if ORDER > 2:
        index = index * size2 + (offset // stride2) % size2
    if ORDER > 3:
        index = index * size3 + (offset // stride3) % size3
    return index


@triton.jit
def kept_flat(scores_ptr, block_scores_ptr, threshold_ptr, flat, valid, cols, inner, tile_cols,
              size0, stride0, size1, stride1, size2, stride2, size3, stride3,
              KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr, ORDER: tl.constexpr):
    """``kept`` at int64 flat indices of the weight (the elementwise kernels' entry): logical indices, or
    for an unstructured mask with an Order (ORDER > 0, its sizes and strides) memory offsets."""
    value, cut = load_threshold(threshold_ptr, F64)
    if KIND == UNSTRUCTURED and ORDER > 0:  # tied scores rank by logical index, wherever they lie
        index = logical_index(flat, size0, stride0, size1, stride1, size2, stride2, size3, stride3, ORDER)
        keep = is_kept(_magnitude(scores_ptr, flat, valid, F64), value, cut, index)
    else:
        row = flat // cols  # unused (and compiled away) for unstructured masks
        keep = kept(scores_ptr, block_scores_ptr, value, cut, row, flat - row * cols, valid, cols, inner, tile_cols,
                    KIND, A, B, F64)
    return keep


class Mask(NamedTuple):
    """The launch arguments of the keep rule: ``args`` lead a kernel's positional arguments
    (scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols), ``meta`` are its constexprs."""

    args: tuple
    meta: dict


_ORDER_DIMS = 4  # the most dims logical_index reads


class Order(NamedTuple):
    """Where the elements of the tensors an elementwise kernel runs over lie: ``args`` the (size, stride)
    pairs that kept_flat takes (padded with (1, 1)), ``meta`` its ORDER, how many of them count (0: the
    elements lie in logical order)."""

    args: tuple
    meta: dict


LOGICAL = Order((1, 1) * _ORDER_DIMS, {"ORDER": 0})


def memory_order(tensor: torch.Tensor) -> Order | None:
    """The Order of a dense ``tensor`` (reference.keeps_weight_layout), for a kernel that runs over it
    where it lies: its dims of size > 1 in logical order, each run that memory keeps together (stride =
    the next one's stride × size) merged into one. LOGICAL where that leaves the dims of a contiguous
    tensor; None where it leaves more than logical_index reads (a permuted layout of 5 or more dims: at
    most 3 for a channels_last 4-D or 5-D one), which then runs on contiguous copies."""
    dims = []
    for size, stride in zip(tensor.shape, tensor.stride()):
        if size == 1:  # any stride: it moves nothing
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) <= 1 and all(stride == 1 for _, stride in dims):
        return LOGICAL
    if len(dims) > _ORDER_DIMS:
        return None
    return Order(tuple(n for dim in dims + [(1, 1)] * (_ORDER_DIMS - len(dims)) for n in dim), {"ORDER": len(dims)})


def prepare(op: str, scores: torch.Tensor, threshold: torch.Tensor, structure: Structure) -> Mask:
    """The keep rule of contiguous ``scores`` (or, for an unstructured mask, scores in the layout of an
    Order, which the kernel then takes too): block scores computed here for filter, channel and tile
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
