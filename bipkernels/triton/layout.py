"""The host side every Triton kernel file shares: structure numbers, the matrix view of a weight, the
argument checks of the ops (errors name the op) and the launch sizes (GPU or interpreter).

A weight of shape (out, in, *kernel) is the matrix (rows, cols) = (out, in·inner), inner = prod(kernel),
as in bipkernels.structures; the kernels index it by int64 flat offsets.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from ..structures import KINDS, Structure
from . import interpreting

# Read once, when the kernels are first imported: that is also when triton.jit picks the interpreter.
INTERPRETING = interpreting()

UNSTRUCTURED = tl.constexpr(KINDS.index("unstructured"))
FILTER = tl.constexpr(KINDS.index("filter"))
CHANNEL = tl.constexpr(KINDS.index("channel"))
NM = tl.constexpr(KINDS.index("nm"))
TILE = tl.constexpr(KINDS.index("tile"))

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Matrix(NamedTuple):
    """The matrix view of a tensor of some shape (structures.Structure.matrix_shape) plus its tile columns."""

    rows: int
    cols: int
    inner: int
    tile_cols: int  # ceil(cols / tile width) for tile structures, else 0 (unused)


def matrix_of(shape, structure: Structure) -> Matrix:
    rows, cols, _, inner = structure.matrix_shape(shape)
    tile_cols = -(-cols // structure.b) if structure.kind == "tile" else 0
    return Matrix(rows, cols, inner, tile_cols)


def structure_of(op: str, tensor: torch.Tensor, kind: int, a: int, b: int, p: int) -> Structure:
    """The Structure of the op arguments (kind, a, b, p), checked against ``tensor``'s shape."""
    try:
        if not 0 <= kind < len(KINDS):
            raise ValueError(f"structure kind must be in [0, {len(KINDS)}), got {kind}")
        structure = Structure(KINDS[kind], a, b, p)
        structure.check_shape(tensor.shape, "scores")
    except ValueError as error:
        raise ValueError(f"bipkernels.{op}: {error}") from None
    return structure


def check_float(op: str, name: str, tensor: torch.Tensor, dtypes=_FLOATING) -> None:
    if tensor.dtype not in dtypes:
        raise TypeError(f"bipkernels.{op}: {name} must be one of {', '.join(map(str, dtypes))}, got {tensor.dtype}")


def check_like(op: str, name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor, shape=True) -> None:
    """``tensor`` has the dtype and device (and, with ``shape``, the shape) of ``like``."""
    checks = [("dtype", tensor.dtype, like.dtype), ("device", tensor.device, like.device)]
    if shape:
        checks.append(("shape", tuple(tensor.shape), tuple(like.shape)))
    for what, mine, theirs in checks:
        if mine != theirs:
            raise ValueError(f"bipkernels.{op}: {name} has {what} {mine} but {like_name} has {what} {theirs}")


def check_threshold(op: str, threshold: torch.Tensor, scores: torch.Tensor, structure: Structure) -> None:
    """A threshold is float64 (value, cut) on the scores' device; N:M does not read it."""
    if not structure.uses_threshold:
        return
    if threshold.dtype != torch.float64 or threshold.numel() != 2:
        raise ValueError(f"bipkernels.{op}: threshold must be float64 of 2 elements (value, cut), got "
                         f"{threshold.dtype} of shape {tuple(threshold.shape)}")
    if threshold.device != scores.device:
        raise ValueError(f"bipkernels.{op}: threshold is on {threshold.device} but scores are on {scores.device}")


# Compiled kernels contract a · b + c into one fused multiply-add (rounded once) unless told not to; the
# C++ and CUDA kernels never do (-ffp-contract=off, --fmad=false), and the triton backend's gradients
# must equal theirs. libdevice's mul_rn is a product the compiler does not fuse. The interpreter computes
# in NumPy, which never fuses, and has no libdevice.
_FUSES = tl.constexpr(not INTERPRETING)


@triton.jit
def product(a, b):
    """a · b (float32 or float64), rounded on its own before any add it meets."""
    if _FUSES:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def widen(x):
    """``x`` in float32 (float64 stays float64), exactly: bfloat16 by its bits, because the interpreter's
    conversion rounds bfloat16 subnormals wrongly (1.0e-39 became 4.4e-39, 9.2e-41 became 0)."""
    if x.dtype == tl.float64:
        return x
    elif x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def narrow(x, dtype: tl.constexpr):
    """float32 (or float64) ``x`` in ``dtype``, rounded to nearest even: bfloat16 by its bits, because the
    interpreter's conversion truncates (0.10107 became 0.10059) and misrounds subnormals (8.8e-39 became
    5.9e-39, 2.9e-39 became 0), so a select of a bfloat16 gradient came back changed. NaN gives 0x7FC0."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        # Adding 0x7FFF plus the kept lowest bit rounds the magnitude to nearest even (past the largest
        # finite value to inf); only a NaN's payload can carry into the sign, and NaN is set apart.
        rounded = tl.where(x != x, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def on_device(tensor: torch.Tensor):
    """A context that makes ``tensor``'s GPU the current one: a triton launch goes to the current device
    and its stream, whichever device its tensors are on. Nothing to do for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def traceable(kernel):
    """``kernel`` for launching inside a triton_op: wrap_triton's (torch.compile and torch.export trace the
    launch), or under the interpreter the kernel itself, which nothing traces and which torch before 2.14
    refuses to wrap ("wrap_triton only works on functions annotated with triton.jit", seen with 2.11)."""
    return kernel if INTERPRETING else wrap_triton(kernel)


def launch_size(gpu: int, interpreted: int) -> int:
    """A block size: ``gpu`` on a GPU, ``interpreted`` (small, so that the tests' small inputs cross many
    blocks and every loop runs more than once) under the interpreter."""
    return interpreted if INTERPRETING else gpu
