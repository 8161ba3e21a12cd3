"""The Triton tests: every kernel through the Triton interpreter on CPU tensors, and the GPU checks where
there is a GPU. They run in a pytest process of their own, because the interpreter is chosen when triton
is first imported (this file sets TRITON_INTERPRET=1 unless it is set already):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/triton     # CPU: the interpreter checks
    TRITON_INTERPRET=0 .venv/bin/python -m pytest -q tests/triton     # GPU: test_gpu.py, compiled kernels

Without triton installed the folder is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

from bipkernels import triton as bipkernels_triton  # noqa: E402  (imports no triton)

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = bipkernels_triton.interpreting()
HAS_CUDA_GPU = torch.cuda.is_available()

if not HAS_TRITON:
    collect_ignore_glob = ["test_*.py"]

# The generators of tests/conftest.py, loaded by path: both folders' conftest modules are "conftest".
_spec = importlib.util.spec_from_file_location("bipkernels_tests_conftest", Path(__file__).parents[1] / "conftest.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)
fits, tied_scores, with_specials, LAYOUTS = _shared.fits, _shared.tied_scores, _shared.with_specials, _shared.LAYOUTS
check_topk_threshold_under_vmap = _shared.check_topk_threshold_under_vmap
check_channels_last_conv_equals_torchs = _shared.check_channels_last_conv_equals_torchs

needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs CPU tensors through TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not HAS_CUDA_GPU or INTERPRETING, reason="needs a CUDA GPU and TRITON_INTERPRET unset")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Tolerance of floating outputs, in units of the output dtype's epsilon (its spacing at 1.0): a result
# may differ from the float64 reference by ULPS · eps · |reference| plus what the float32 arithmetic
# (the score type; its epsilon for float64 outputs is float64's) loses on the terms that were summed
# (``scale``, per element). The interpreter converts float32 to half types by truncation, not rounding
# (triton 3.8), and a GPU may fuse a multiply and add: both stay within one unit.
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ULPS = 2
# Below the smallest normal number the spacing stops shrinking with |x|: it is this, absolute.
SUBNORMAL_SPACING = {dtype: torch.finfo(dtype).tiny * eps for dtype, eps in EPS.items()}


def assert_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | float = 0.0, terms: int = 4) -> None:
    """``got`` (any dtype) equals the float64 ``want`` within ULPS · eps(got) · |want| + terms · eps_acc ·
    scale, eps_acc that of got's arithmetic (float64 for float64, else float32), and ULPS subnormal
    spacings; NaN where want is NaN, the same infinities."""
    assert got.shape == want.shape, (got.shape, want.shape)
    got64, want64 = got.double(), want.double()
    acc = EPS[torch.float64] if got.dtype == torch.float64 else EPS[torch.float32]
    tolerance = ULPS * (EPS[got.dtype] * want64.abs() + SUBNORMAL_SPACING[got.dtype]) \
        + terms * acc * torch.as_tensor(scale, dtype=torch.float64)
    finite = want64.isfinite()
    assert torch.equal(got64.isnan(), want64.isnan()), "NaN in different places"
    assert torch.equal(got64[~finite & ~want64.isnan()], want64[~finite & ~want64.isnan()]), "different infinities"
    error = (got64 - want64).abs()[finite]
    excess = error - tolerance.expand_as(want64)[finite]
    worst = int(excess.argmax()) if excess.numel() else 0
    assert bool((excess <= 0).all()), (f"error {error[worst].item():.3g} at reference value "
                                       f"{want64[finite][worst].item():.6g} is over its tolerance by "
                                       f"{excess[worst].item():.3g}")


@pytest.fixture
def triton_backend(monkeypatch):
    """BIPKERNELS_BACKEND=triton for the test."""
    monkeypatch.setenv("BIPKERNELS_BACKEND", "triton")


TRITON_OP_NAMES = ("block_scores", "topk_threshold", "block_mask", "masked_weight", "hypergrad",
                   "masked_linear", "masked_linear_grad_input", "masked_linear_grad_weight")


def triton_op_call(name: str, device: str) -> tuple:
    """(op, args) of triton op ``name`` on small inputs of ``device``, for torch.library.opcheck."""
    bipkernels_triton.load()
    scores, x, grad = torch.rand(6, 8, device=device), torch.rand(5, 8, device=device), torch.rand(5, 6, device=device)
    threshold = torch.tensor([0.5, 20.0], dtype=torch.float64, device=device)
    tile = (4, 2, 3, 1)  # tile2x3, p = 1
    args = {
        "block_scores": (scores, *tile),
        "topk_threshold": ([scores, x], 17, False),
        "block_mask": (scores, threshold, *tile),
        "masked_weight": (scores, scores, threshold, *tile),
        "hypergrad": (scores, scores, scores, threshold, *tile, 0.1, 0),
        "masked_linear": (x, scores, scores, threshold, scores[:, 0], *tile),
        "masked_linear_grad_input": (grad, scores, scores, threshold, *tile),
        "masked_linear_grad_weight": (grad, x, scores, scores, threshold, *tile, 0.1, 1),
    }[name]
    return getattr(torch.ops.bipkernels_triton, name).default, args


def pytest_configure(config):
    # The interpreter evaluates masked-off lanes too (inf - inf there is expected and never stored).
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
