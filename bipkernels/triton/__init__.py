"""Triton kernels of every bipkernels op, and the fused masked matmul of MaskedLinear.

Importing this package imports neither triton nor the kernels, and never initialises CUDA: ``load()``
does, on the first call that runs the triton backend, and registers the ops ``torch.ops.bipkernels_triton.*``
with torch.library.triton_op (so torch.compile and torch.export see the kernels inside), with the
schemas of the compiled ops (csrc/registration.cpp) plus the masked matmul's three.

One kernel family per file:

    mask_rule.py       the keep rule every kernel shares (the Triton twin of math.h's MaskRule)
    block_scores.py    block_scores
    topk_threshold.py  the exact radix select of topk_threshold (the digits of csrc's GPU select)
    masked_weight.py   block_mask and masked_weight
    hypergrad.py       the fused backward (grad_θ, grad_s)
    masked_linear.py   MaskedLinear's matmuls with the mask applied to the weight tiles as they load

The kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported): that is how tests/triton checks them without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

OPS = ("block_scores", "topk_threshold", "block_mask", "masked_weight", "hypergrad", "masked_linear")

_NOT_MEASURED = ("not measured: no GPU has run benchmarks/test_triton.py yet; until one does, the cuda kernel "
                 "stays the default")

# The backend each op runs on a CUDA tensor when BIPKERNELS_BACKEND is unset, and the measurement that
# chose it (benchmarks/test_triton.py: median times of both backends in one run on one GPU). A choice
# that cannot serve a call (say a build without that CUDA kernel) falls back to the PyTorch reference
# with one warning, never to a kernel the table did not choose. "masked_linear" is the layer's matmul:
# "triton" is the fused masked matmul, "unfused" masked_weight + F.linear (cuBLAS) + hypergrad, each of
# those by its own row.
AUTO_ON_CUDA: dict[str, tuple[str, str]] = {
    "block_scores": ("cuda", _NOT_MEASURED),
    "topk_threshold": ("cuda", _NOT_MEASURED),
    "block_mask": ("cuda", _NOT_MEASURED),
    "masked_weight": ("cuda", _NOT_MEASURED),
    "hypergrad": ("cuda", _NOT_MEASURED),
    "masked_linear": ("unfused", "not measured: no GPU has run benchmarks/test_triton.py yet; until one shows "
                                 "the fused matmul faster than cuBLAS plus the elementwise kernels, the layer "
                                 "stays unfused"),
}


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (read the way triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


@functools.cache
def _import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton cannot be imported ({error})"
    return None


def _constant_to_torch_compile(fn):
    """torch.compiler.assume_constant_result(fn) without the import of torch._dynamo it makes (which
    imports triton): the mark it sets. torch.compile then calls ``fn`` while tracing instead of tracing
    into it, which it cannot do through an import (tests/triton/test_backend.py checks the mark)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_to_torch_compile
def unavailable(op: str, device: torch.device) -> str | None:
    """None if the triton backend can run ``op`` on ``device``, else the reason it cannot.

    Imports triton (once) to check it, so call it only when the triton backend is wanted.
    """
    if op not in OPS:
        return f"the triton backend has no kernel for {op}"
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"triton kernels run on cuda tensors (cpu ones under TRITON_INTERPRET=1), not on {device.type}"
    return _import_error()


@functools.cache
def _import_kernels() -> None:
    for module in ("block_scores", "topk_threshold", "masked_weight", "hypergrad", "masked_linear"):
        importlib.import_module(f"{__name__}.{module}")
    from .. import op_autograd

    op_autograd.register("bipkernels_triton")


@_constant_to_torch_compile
def load() -> None:
    """Import the kernels once, registering the ops ``torch.ops.bipkernels_triton.*``."""
    _import_kernels()
