"""block_scores in Triton: Σ|s| (p = 1) or Σs² (p = 2) per block, accumulated in float64 and rounded once
to the score type (bipkernels.reference.block_scores).

One kernel for every structure: a program owns BLOCK_B blocks and walks their elements BLOCK_J at a
time, element j of a block at the flat index of math.h's BlockLayout::element. Unstructured and N:M
blocks are single elements (|s| in the score type; p is not used). Each BLOCK_J chunk adds as a tree
(tl.sum), not in flat-index order as the reference and the C++ kernels: float64 scores can then differ
in the last bit (README, determinism), so a block at the threshold can rank differently.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..reference import score_dtype
from ..structures import Structure
from .layout import (CHANNEL, FILTER, TILE, Matrix, check_float, launch_size, matrix_of, on_device, product,
                     structure_of, traceable, widen)


@triton.jit
def _element(block, j, rows, cols, inner, tile_cols, KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    """(flat index, exists) of element j of ``block`` (math.h BlockLayout::element; tiles are walked as
    full A×B tiles whose elements past the matrix edge do not exist)."""
    if KIND == FILTER:
        flat = block * cols + j
        exists = j < cols
    elif KIND == CHANNEL:
        flat = (j // inner) * cols + block * inner + j % inner
        exists = j // inner < rows  # not j < rows * inner: the int32 arguments' product can wrap
    elif KIND == TILE:
        tile_row = block // tile_cols
        row = tile_row * A + j // B
        col = (block - tile_row * tile_cols) * B + j % B
        flat = row * cols + col
        exists = (j < A * B) & (row < rows) & (col < cols)
    else:
        flat = block + j
        exists = j < 1
    return flat, exists


@triton.jit
def _block_scores_kernel(scores_ptr, out_ptr, n_blocks, block_len, rows, cols, inner, tile_cols,
                         KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, SQUARE: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    blocks = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    total = tl.zeros([BLOCK_B], dtype=tl.float64)
    for start in range(0, block_len, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J).to(tl.int64)
        flat, exists = _element(blocks[:, None], j[None, :], rows, cols, inner, tile_cols, KIND, A, B)
        exists = exists & (blocks[:, None] < n_blocks)
        magnitude = tl.abs(widen(tl.load(scores_ptr + flat, mask=exists, other=0.0)).to(tl.float64))
        if SQUARE:  # not fused into the sum (layout.product): float64 squares round, as in the C++ kernels
            magnitude = product(magnitude, magnitude)
        total += tl.sum(magnitude, axis=1)
    tl.store(out_ptr + blocks, total.to(out_ptr.dtype.element_ty), mask=blocks < n_blocks)


def _launch(structure: Structure, matrix: Matrix) -> tuple[int, int, int]:
    """(elements per block, BLOCK_B, BLOCK_J): a few long rows for filter, many short blocks otherwise."""
    if structure.kind == "filter":
        return matrix.cols, launch_size(4, 2), launch_size(256, 8)
    if structure.kind == "channel":
        return matrix.rows * matrix.inner, launch_size(32, 4), launch_size(32, 8)
    if structure.kind == "tile":
        size = structure.a * structure.b
        return size, launch_size(32, 4), min(triton.next_power_of_2(size), launch_size(128, 8))
    return 1, launch_size(1024, 32), 1


def compute(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Block scores of contiguous ``scores``, shape structure.block_scores_shape, dtype score_dtype.

    Empty in, empty out (no launch); blocks of no element (a filter of a (rows, 0) weight) score 0.
    """
    out = torch.empty(structure.block_scores_shape(scores.shape), dtype=score_dtype(scores.dtype),
                      device=scores.device)
    if out.numel() == 0:
        return out
    matrix = matrix_of(scores.shape, structure)
    block_len, block_b, block_j = _launch(structure, matrix)
    traceable(_block_scores_kernel)[(triton.cdiv(out.numel(), block_b),)](
        scores, out, out.numel(), block_len, matrix.rows, matrix.cols, matrix.inner, matrix.tile_cols,
        KIND=structure.kind_id, A=structure.a, B=structure.b,
        SQUARE=structure.p == 2 and structure.kind not in ("unstructured", "nm"), BLOCK_B=block_b, BLOCK_J=block_j)
    return out


@triton_op("bipkernels_triton::block_scores", mutates_args=())
def block_scores(scores: torch.Tensor, kind: int, a: int, b: int, p: int) -> torch.Tensor:
    """|s| reduced per block (see bipkernels.ops.block_scores): the schema of the compiled op."""
    check_float("block_scores", "scores", scores)
    with on_device(scores):
        return compute(scores.contiguous(), structure_of("block_scores", scores, kind, a, b, p))
