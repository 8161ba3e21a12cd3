"""The triton backend's place in the backend choice: forced by BIPKERNELS_BACKEND=triton (CPU tensors under
the interpreter), its reasons when it cannot run, the automatic table for CUDA, and the lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bipkernels import ops
from bipkernels import triton as bipkernels_triton

from conftest import TRITON_OP_NAMES, needs_interpreter, triton_op_call


@needs_interpreter
def test_forced_triton_runs_cpu_tensors_under_the_interpreter(triton_backend):
    for op in ops.OP_NAMES:
        assert ops.backend_for(op, torch.device("cpu")) == "triton"
    with pytest.raises(RuntimeError, match="BIPKERNELS_BACKEND=triton cannot run on meta: triton kernels run on cuda"):
        ops.block_scores(torch.ones(3, device="meta"))


def test_without_the_interpreter_cpu_tensors_are_refused(triton_backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in bipkernels_triton.unavailable("masked_weight", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="bipkernels.masked_weight: BIPKERNELS_BACKEND=triton cannot run on cpu"):
        ops.masked_weight(torch.ones(3), torch.ones(3), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_automatic_choice_table_covers_every_op():
    """Every op has a row naming a backend it can pick and the measurement (or its absence) behind it;
    no CUDA GPU has measured yet, so cuda stays the default and the layer stays unfused."""
    assert set(bipkernels_triton.AUTO_ON_CUDA) == set(ops.OP_NAMES) | {"masked_linear"}
    for op, (backend, measurement) in bipkernels_triton.AUTO_ON_CUDA.items():
        assert backend in (("triton", "unfused") if op == "masked_linear" else ("cuda", "triton")), op
        assert measurement.strip(), op
    assert all(backend in ("cuda", "unfused") for backend, _ in bipkernels_triton.AUTO_ON_CUDA.values())


def test_unknown_op_is_refused():
    assert "no kernel for nonsense" in bipkernels_triton.unavailable("nonsense", torch.device("cuda"))


def test_importing_bipkernels_imports_no_triton_and_no_cuda():
    code = ("import sys, torch, bipkernels, bipkernels.nn, bipkernels.triton\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert not any(m.startswith('bipkernels.triton.') for m in sys.modules), 'kernels imported'\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@needs_interpreter
def test_backend_choice_traces_into_one_graph(triton_backend):
    """What MaskedLinear decides before its kernels (backend, dtype, autocast, the lazy import) compiles
    into one graph: torch.compile(fullgraph=True) of a model of masked layers must not break on it."""
    weight = torch.randn(4, 6)

    def decide(x):
        ops._kernels("triton")
        return x * 2 if ops.masked_linear_fused(x, weight) else x

    x = torch.randn(3, 6)
    assert torch.equal(torch.compile(decide, backend="eager", fullgraph=True)(x), x * 2)
    marked = torch.compiler.assume_constant_result(lambda: None)  # the mark bipkernels.triton sets by hand
    assert vars(marked) == vars(bipkernels_triton._constant_to_torch_compile(lambda: None))


@needs_interpreter
@pytest.mark.parametrize("name", TRITON_OP_NAMES)
def test_opcheck_schema_and_autograd_registration(name):
    """The checks that need no fake tensors: the interpreter cannot run kernels on them (test_gpu.py runs
    the full opcheck)."""
    op, args = triton_op_call(name, "cpu")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
