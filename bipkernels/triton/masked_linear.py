"""MaskedLinear's matmuls in Triton, with the mask applied to the weight tiles as they load: no θ ⊙ m
tensor is ever written. For input x (M, K), weight θ and scores s (N, K), g = ∂l/∂y (M, N):

    masked_linear              y = x (m ⊙ θ)ᵀ + bias                               (M, N)
    masked_linear_grad_input   ∂l/∂x = g (m ⊙ θ)                                   (M, K)
    masked_linear_grad_weight  G = gᵀ x, and from its epilogue (hypergrad.values)   (N, K) twice
                               grad_θ = m ⊙ G,  grad_s = sign(s) ⊙ (θ ⊙ G − inv_gamma · I),
                               I = m ⊙ G ⊙ G (paper) or (θ ⊙ G)² (released)

Inputs of more than two dimensions are flattened to (M, K) rows. float32 (TF32 when torch allows it
for float32 matmuls: float32_matmuls_use_tf32), float16 and bfloat16; products
accumulate in float32 and the hypergradient is computed from the float32 G (the unfused chain rounds G
to the weight's dtype first). Every structure of a 2-D weight: unstructured, filter, channel, N:M, tile
(mask_rule.kept). float64 has no matmul here: bipkernels.ops.masked_linear_fused sends it, like autocast
and mixed dtypes, to the unfused path (masked_weight + F.linear).

The weight gradient's tiles cover the (N, K) weight and each reduces over all M rows: a small weight
(few tiles) with many rows would leave most of the GPU idle, so its rows are split (split-K over M,
weight_grad_slices): each slice writes its float32 partial G, and the hypergradient kernel sums the
partials in slice order (deterministic, no atomics) before its epilogue.

Tiles: autotuned over common configurations on a GPU, one small configuration under the interpreter.
The tuning is keyed on the weight's shape and the row count's power-of-two bucket (row_bucket), not the
exact rows: a new batch size or sequence length reuses the tiles tuned for its bucket instead of
benchmarking every configuration again. Offsets are int64.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import hypergrad, mask_rule
from .layout import (INTERPRETING, check_float, check_like, launch_size, narrow, on_device, structure_of, traceable,
                     widen)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): output rows, output columns, reduction.
_GPU_CONFIGS = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
                (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 32, 32, 2, 5), (32, 64, 32, 2, 5)]


def _configs() -> list[triton.Config]:
    """The autotuned tile shapes. BIPKERNELS_TRITON_AUTOTUNE=0 (read at import) keeps one, a middle
    size: no tuning pass, one compile per kernel variant (the GPU tests use it to keep their compiles
    few)."""
    if INTERPRETING:
        tiles = [(16, 16, 16, 1, 1)]
    elif os.environ.get("BIPKERNELS_TRITON_AUTOTUNE", "1") == "0":
        tiles = [(128, 128, 32, 4, 4)]
    else:
        tiles = _GPU_CONFIGS
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=warps, num_stages=stages)
            for m, n, k, warps, stages in tiles]


# Split-K of the weight gradient (weight_grad_slices): tiles of about _SPLIT_TILE² are counted against the
# processors. The interpreter's small values (8 "processors") send the tests' small inputs down the split
# path too.
_SPLIT_TILE = launch_size(128, 16)
_MIN_SPLIT_ROWS = launch_size(1024, 32)
_SPLIT_ROW_ALIGN = launch_size(64, 16)
_MAX_SPLITS = 16


def processors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a CUDA GPU); 8 for any other device (the interpreter's CPU
    tensors, and tests/triton/gpu_compile.py's)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def weight_grad_slices(rows: int, N: int, K: int, processor_count: int) -> tuple[int, int]:
    """(slices, rows per slice): how the (N, K) weight gradient splits its reduction over M = ``rows``.
    One slice of all rows when the weight's tiles already fill the ``processor_count`` processors or the
    rows are few; else as many slices as fit the processors in one wave (rounded down: a second, partly
    filled wave would cost a whole slice's time), at most 16, each of at least _MIN_SPLIT_ROWS rows and a
    multiple of _SPLIT_ROW_ALIGN (the widest BLOCK_K), the last one shorter. A symbolic row count (traced
    by torch.compile with dynamic shapes) takes one slice: deciding would add guards on it."""
    if isinstance(rows, torch.SymInt):
        return 1, rows
    tiles = triton.cdiv(N, _SPLIT_TILE) * triton.cdiv(K, _SPLIT_TILE)
    wanted = 1 if tiles >= processor_count else \
        min(processor_count // tiles, rows // _MIN_SPLIT_ROWS, _MAX_SPLITS)
    if wanted <= 1:
        return 1, rows
    rows_per_slice = triton.cdiv(triton.cdiv(rows, wanted), _SPLIT_ROW_ALIGN) * _SPLIT_ROW_ALIGN
    return triton.cdiv(rows, rows_per_slice), rows_per_slice


def row_bucket(rows: int) -> int:
    """The autotuning key's stand-in for ``rows`` (M): the next power of two, at least 16 (the smallest
    tile), so rows 65 to 128 share one tuned configuration. A symbolic row count passes through (no
    guards on it): a compiled graph tunes its kernels itself, not by Triton's key."""
    return rows if isinstance(rows, torch.SymInt) else max(16, triton.next_power_of_2(rows))


@triton.jit
def _tile(rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """int64 (row, column) offsets of this program's output tile; GROUP_M row tiles share their column
    tiles in consecutive programs (the triton tutorial's grouped order: better cache reuse)."""
    pid = tl.program_id(0)
    # In int64: a row count just under 2^31 arrives as an int32, whose cdiv would wrap (a count of 1 arrives
    # as a constant, hence the addition rather than .to).
    wide = tl.zeros([], dtype=tl.int64)
    row_tiles, col_tiles = tl.cdiv(rows + wide, BLOCK_M), tl.cdiv(cols + wide, BLOCK_N)
    group = pid // (GROUP_M * col_tiles)
    first = group * GROUP_M
    size = tl.minimum(row_tiles - first, GROUP_M)
    row_tile = first + (pid % (GROUP_M * col_tiles)) % size
    col_tile = (pid % (GROUP_M * col_tiles)) // size
    return (row_tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M),
            col_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N))


@triton.jit
def _dot(a, b, acc, TF32: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:  # the interpreter's dot misreads bfloat16 (triton 3.8); float32 products of it are exact
        a, b = widen(a), widen(b)
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _masked_weight_tile(weight_ptr, scores_ptr, block_scores_ptr, value, cut, tile_cols, n, k, N, K,
                        KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr):
    """θ ⊙ m at rows ``n`` and columns ``k`` of the (N, K) weight (broadcasting int64 offsets); a select,
    so a pruned NaN or inf weight contributes exactly 0."""
    valid = (n < N) & (k < K)
    weight = tl.load(weight_ptr + n * K + k, mask=valid, other=0.0)
    keep = mask_rule.kept(scores_ptr, block_scores_ptr, value, cut, n, k, valid, K, 1, tile_cols, KIND, A, B, F64)
    return tl.where(keep, weight, tl.zeros_like(weight))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "KIND", "TRANSPOSED", "TF32"])
@triton.jit
def _times_masked_weight_kernel(scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols, a_ptr,
                                weight_ptr, bias_ptr, out_ptr, M, M_BUCKET, N, K, KIND: tl.constexpr,
                                A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr, TRANSPOSED: tl.constexpr,
                                HAS_BIAS: tl.constexpr, TF32: tl.constexpr, WIDEN: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr):
    """out = a (m ⊙ θ)ᵀ (+ bias) with a (M, K) when TRANSPOSED (the forward), else out = a (m ⊙ θ) with
    a (M, N) (the input gradient). BLOCK_N spans out's columns, BLOCK_K the reduction. M_BUCKET
    (row_bucket(M)) only keys the autotuning."""
    if TRANSPOSED:
        out_cols, reduction = N, K
    else:
        out_cols, reduction = K, N
    rows, cols_out = _tile(M, out_cols, BLOCK_M, BLOCK_N, GROUP_M)
    value, cut = mask_rule.load_threshold(threshold_ptr, F64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, reduction, BLOCK_K):
        inner_index = start + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * reduction + inner_index[None, :],
                    mask=(rows[:, None] < M) & (inner_index[None, :] < reduction), other=0.0)
        if TRANSPOSED:  # the (BLOCK_K, BLOCK_N) tile of (m ⊙ θ)ᵀ
            w = _masked_weight_tile(weight_ptr, scores_ptr, block_scores_ptr, value, cut, tile_cols,
                                    cols_out[None, :], inner_index[:, None], N, K, KIND, A, B, F64)
        else:
            w = _masked_weight_tile(weight_ptr, scores_ptr, block_scores_ptr, value, cut, tile_cols,
                                    inner_index[:, None], cols_out[None, :], N, K, KIND, A, B, F64)
        acc = _dot(a, w, acc, TF32, WIDEN)
    if HAS_BIAS:
        acc += widen(tl.load(bias_ptr + cols_out, mask=cols_out < out_cols, other=0.0))[None, :]
    tl.store(out_ptr + rows[:, None] * out_cols + cols_out[None, :], narrow(acc, out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols_out[None, :] < out_cols))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "KIND", "PARTIAL", "TF32"])
@triton.jit
def _weight_grad_kernel(scores_ptr, block_scores_ptr, threshold_ptr, cols, inner, tile_cols, grad_out_ptr, x_ptr,
                        weight_ptr, inv_gamma_ptr, grad_weight_ptr, grad_scores_ptr, partial_ptr, rows_per_slice, M,
                        M_BUCKET, N, K, KIND: tl.constexpr, A: tl.constexpr, B: tl.constexpr, F64: tl.constexpr,
                        RELEASED: tl.constexpr, PARTIAL: tl.constexpr, TF32: tl.constexpr, WIDEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """G = gᵀ x over rows [s·rows_per_slice, (s + 1)·rows_per_slice) ∩ [0, M) for slice s = program_id(1),
    tile by tile of the (N, K) weight (BLOCK_M × BLOCK_N). PARTIAL: the float32 G of the slice goes to
    partial_ptr's (slices, N, K); else (one slice over all rows) grad_θ and grad_s straight from the float32
    accumulator."""
    n, k = _tile(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    first_row = tl.program_id(1).to(tl.int64) * rows_per_slice
    end_row = tl.minimum(first_row + rows_per_slice, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(first_row, end_row, BLOCK_K):
        m = start + tl.arange(0, BLOCK_K).to(tl.int64)
        grad_t = tl.load(grad_out_ptr + m[None, :] * N + n[:, None],
                         mask=(m[None, :] < end_row) & (n[:, None] < N), other=0.0)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < end_row) & (k[None, :] < K), other=0.0)
        acc = _dot(grad_t, x, acc, TF32, WIDEN)
    n, k = n[:, None], k[None, :]
    valid = (n < N) & (k < K)
    if PARTIAL:
        tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * N * K + n * K + k, acc, mask=valid)
    else:
        value, cut = mask_rule.load_threshold(threshold_ptr, F64)
        keep = mask_rule.kept(scores_ptr, block_scores_ptr, value, cut, n, k, valid, K, 1, tile_cols, KIND, A, B,
                              F64)
        theta = widen(tl.load(weight_ptr + n * K + k, mask=valid, other=0.0))
        negative = widen(tl.load(scores_ptr + n * K + k, mask=valid, other=0.0)) < 0  # as in hypergrad
        grad_weight, grad_scores = hypergrad.values(acc, theta, keep, negative, tl.load(inv_gamma_ptr).to(tl.float32),
                                                    RELEASED)
        tl.store(grad_weight_ptr + n * K + k, narrow(grad_weight, grad_weight_ptr.dtype.element_ty), mask=valid)
        tl.store(grad_scores_ptr + n * K + k, narrow(grad_scores, grad_scores_ptr.dtype.element_ty), mask=valid)


def _check(op: str, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor, kind, a, b, p, **others):
    """The structure, after checking weight, scores and the ``others`` (name: tensor of weight's dtype and
    device whose last dimension is given as (tensor, size))."""
    check_float(op, "weight", weight, DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"bipkernels.{op}: weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    check_like(op, "scores", scores, "weight", weight)
    for name, (tensor, size) in others.items():
        check_like(op, name, tensor, "weight", weight, shape=False)
        if tensor.dim() == 0 or tensor.shape[-1] != size:
            raise ValueError(f"bipkernels.{op}: {name} must end in a dimension of {size}, got shape "
                             f"{tuple(tensor.shape)}")
    return structure_of(op, scores, kind, a, b, p)


def _common(weight: torch.Tensor) -> dict:
    # TF32 exactly when torch uses it for float32 matmuls (nn.Linear); the interpreter's dot misreads bf16.
    return dict(TF32=weight.dtype == torch.float32 and float32_matmuls_use_tf32(),
                WIDEN=INTERPRETING and weight.dtype == torch.bfloat16)


def float32_matmuls_use_tf32() -> bool:
    """Whether torch runs float32 matmuls on CUDA in TF32, read from the precision settings: the CUDA
    matmuls' own unless "none", else the global one (torch.get_float32_matmul_precision raises once these
    were set, as torch.backends.fp32_precision = "tf32" does), or on a torch without them, the legacy
    precision ("high" and "medium" allow TF32)."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:
        return torch.get_float32_matmul_precision() != "highest"
    return (matmul if matmul != "none" else torch.backends.fp32_precision) == "tf32"


def _grid(rows: int, cols: int, slices: int = 1):
    """The launch grid of a matmul over a (rows, cols) output: one program per tile of the chosen config
    (and per slice of the reduction)."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), slices)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (..., d) as a contiguous matrix (rows, d); also when d or the rows are 0."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1]).contiguous()


def _times_masked_weight(op: str, a: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                         threshold: torch.Tensor, structure, bias: Optional[torch.Tensor], transposed: bool):
    N, K = weight.shape
    rows = _rows(a)
    out_cols = N if transposed else K
    out = torch.empty(rows.shape[0], out_cols, dtype=weight.dtype, device=weight.device)
    if out.numel():  # an empty reduction runs: it leaves the bias (or zeros)
        mask = mask_rule.prepare(op, scores.contiguous(), threshold, structure)
        traceable(_times_masked_weight_kernel)[_grid(rows.shape[0], out_cols)](
            *mask.args, rows, weight.contiguous(), weight if bias is None else bias.contiguous(), out, rows.shape[0],
            row_bucket(rows.shape[0]), N, K, **mask.meta, TRANSPOSED=transposed, HAS_BIAS=bias is not None,
            **_common(weight))
    return out.reshape(*a.shape[:-1], out_cols)


@triton_op("bipkernels_triton::masked_linear", mutates_args=())
def masked_linear(input: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor,
                  bias: Optional[torch.Tensor], kind: int, a: int, b: int, p: int) -> torch.Tensor:
    """y = input (m ⊙ θ)ᵀ + bias: input (..., K), weight and scores (N, K), bias (N,) or None -> (..., N)."""
    op = "masked_linear"
    others = dict(input=(input, weight.shape[-1]))
    if bias is not None:
        others["bias"] = (bias, weight.shape[0])
    structure = _check(op, weight, scores, threshold, kind, a, b, p, **others)
    if bias is not None and bias.dim() != 1:  # the kernel reads N values: a (r, N) bias would lose its rows
        raise ValueError(f"bipkernels.{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    with on_device(weight):
        return _times_masked_weight(op, input, weight, scores, threshold, structure, bias, transposed=True)


@triton_op("bipkernels_triton::masked_linear_grad_input", mutates_args=())
def masked_linear_grad_input(grad_output: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                             threshold: torch.Tensor, kind: int, a: int, b: int, p: int) -> torch.Tensor:
    """∂l/∂input = grad_output (m ⊙ θ): grad_output (..., N) -> (..., K)."""
    op = "masked_linear_grad_input"
    structure = _check(op, weight, scores, threshold, kind, a, b, p, grad_output=(grad_output, weight.shape[0]))
    with on_device(weight):
        return _times_masked_weight(op, grad_output, weight, scores, threshold, structure, None, transposed=False)


@triton_op("bipkernels_triton::masked_linear_grad_weight", mutates_args=())
def masked_linear_grad_weight(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                              scores: torch.Tensor, threshold: torch.Tensor, kind: int, a: int, b: int, p: int,
                              inv_gamma: float, implicit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_θ, grad_s), each (N, K) in weight's dtype, from G = grad_outputᵀ input over all leading
    dimensions. No rows (M = 0) gives G = 0, so grad_θ = 0 and grad_s = θ ⊙ 0 (NaN where θ is inf)."""
    op = "masked_linear_grad_weight"
    structure = _check(op, weight, scores, threshold, kind, a, b, p, grad_output=(grad_output, weight.shape[0]),
                       input=(input, weight.shape[-1]))
    N, K = weight.shape
    grad_rows, input_rows = _rows(grad_output), _rows(input)
    if grad_rows.shape[0] != input_rows.shape[0]:
        raise ValueError(f"bipkernels.{op}: grad_output has {grad_rows.shape[0]} rows but input has "
                         f"{input_rows.shape[0]}")
    released = hypergrad.implicit_is_released(op, weight, inv_gamma, implicit)
    grad_weight = torch.empty(N, K, dtype=weight.dtype, device=weight.device)
    grad_scores = torch.empty_like(grad_weight)
    if grad_weight.numel():
        rows = grad_rows.shape[0]
        slices, rows_per_slice = weight_grad_slices(rows, N, K, processors(weight.device))
        with on_device(weight):
            mask = mask_rule.prepare(op, scores.contiguous(), threshold, structure)
            dense_weight = weight.contiguous()
            # One slice writes no partials: a buffer of its own stands in (never an output's memory).
            partials = torch.empty(slices if slices > 1 else 0, N, K, dtype=torch.float32, device=weight.device)
            traceable(_weight_grad_kernel)[_grid(N, K, slices)](
                *mask.args, grad_rows, input_rows, dense_weight, hypergrad.inv_gamma_tensor(inv_gamma, weight.device),
                grad_weight, grad_scores, partials, rows_per_slice, rows, row_bucket(rows), N, K, **mask.meta,
                RELEASED=released, PARTIAL=slices > 1, **_common(weight))
            if slices > 1:
                hypergrad.launch(mask, partials, dense_weight, inv_gamma, released, grad_weight, grad_scores)
    return grad_weight, grad_scores
