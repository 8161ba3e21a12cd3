"""Shared fixtures: fresh random inputs per test (the seed is printed, so a failure can be replayed),
score generators with ties, NaN and inf, and random batch norms and scores for masked models."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn

from bipkernels import ops
from bipkernels.nn import MaskedConv2d, MaskedLinear

HAS_CPU_KERNELS = "CPU" in ops._KERNELS.get("masked_weight", [])
HAS_CUDA_GPU = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
# torchvision is optional (its models and image folders); .ci/setup installs it except beside a CPU torch.
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
# Weight shapes: sizes 1, primes, 1-D, Linear and Conv2d layouts.
SHAPES = [(1,), (17,), (1, 1), (7, 5), (13, 12, 3, 3), (5, 8, 1, 1), (11, 4, 3, 1), (3, 12, 2, 5)]
STRUCTURES = ["unstructured", "filter", "channel", "2:4", "1:3", "tile3x5", "tile1x1", "tile4x4"]


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so that a failing case can be replayed with BIPKERNELS_TEST_SEED."""
    value = int(os.environ.get("BIPKERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    print(f"seed {value} ({request.node.name})")
    return value


def fits(structure: str, shape) -> bool:
    """Whether a tensor of ``shape`` can carry ``structure`` (N:M needs in % M == 0, blocks need a dim)."""
    from bipkernels.structures import parse_structure

    try:
        parse_structure(structure).check_shape(shape)
    except ValueError:
        return False
    return True


def tied_scores(shape, dtype=torch.float64, levels: int = 8, device="cpu") -> torch.Tensor:
    """Signed multiples of 1/levels (a power of two): many exact ties, and block sums (of |s| or s²) that
    are exact in any order, so every backend's block scores are bit-identical."""
    assert levels & (levels - 1) == 0, "levels must be a power of two for exact sums"
    values = torch.randint(0, levels, shape, dtype=torch.int64) / levels
    signs = torch.randint(0, 2, shape) * 2 - 1
    return (values * signs).to(dtype=dtype, device=device)


# Dense layouts of a 4-D tensor other than the contiguous one (the permuted one keeps no two neighbouring
# dims together in memory: none merge into one).
LAYOUTS = {
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "permuted": lambda t: t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2),  # dense, no named format
    "transposed": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
}


def with_specials(scores: torch.Tensor) -> torch.Tensor:
    """A copy with a few NaN, +inf, -inf and -0.0 entries at random places (on the device of ``scores``)."""
    out = scores.clone().reshape(-1)
    if out.numel() >= 4:
        places = torch.randperm(out.numel())[:4]
        # The values on the scores' device: a CUDA tensor refuses a CPU tensor of several values in an
        # indexed assignment (only a CPU scalar crosses devices there).
        out[places] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=out.dtype,
                                   device=out.device)
    return out.reshape(scores.shape)


def check_topk_threshold_under_vmap(dtype=torch.float32, empty_batch: bool = True) -> None:
    """torch.vmap of bipkernels.topk_threshold on the backend in force equals the reference entry by entry:
    the list form batched along dim 1 beside an unbatched tensor (ties, NaN, ±inf, -0.0), the per-tensor
    form with absolute=True under two nested vmaps, and (``empty_batch``) an empty batch."""
    from bipkernels import ops, reference

    first, second = (with_specials(tied_scores(shape, dtype, levels=4)) for shape in ((7, 5), (3, 5)))
    shared = tied_scores((11,), dtype, levels=4)
    k = int(torch.randint(0, 23, ()))
    got = torch.vmap(lambda a, b, c: ops.topk_threshold([a, b, c], k), in_dims=(1, 1, None))(first, second, shared)
    assert torch.equal(got, torch.stack([reference.topk_threshold([first[:, i], second[:, i], shared], k)
                                         for i in range(5)])), (k, got)
    grid = tied_scores((2, 3, 6), dtype, levels=4)
    got = torch.vmap(torch.vmap(lambda scores: ops.topk_threshold(scores, 2, absolute=True)))(grid)
    assert torch.equal(got, torch.stack([torch.stack([reference.topk_threshold([row], 2, True)[0] for row in rows])
                                         for rows in grid]))
    if empty_batch:
        assert torch.vmap(lambda scores: ops.topk_threshold([scores], 2))(torch.rand(0, 4, dtype=dtype)).shape == \
            (0, 1, 2)


# Score lists of the GPU select (csrc/include/bipkernels/gpu_select.h): chunk edges (4096), more tensors than
# one launch's table (128), empty tensors, and more than 512 tensors before a launch's table (rows_kernel's
# block sum of the ties before it then reads beyond its first half).
GPU_TOPK_SIZES = [[1], [97], [13, 0, 7, 4097], [5000, 4096, 8193, 1], [3] * 200, [2] * 700, [70000, 12]]


def half_threshold(scores, structure):
    """The reference threshold that keeps half the blocks of ``scores`` (None for N:M, which reads none)."""
    from bipkernels import reference

    if not structure.uses_threshold:
        return None
    block_scores = reference.block_scores(scores, structure)
    return reference.topk_threshold([block_scores], block_scores.numel() // 2)[0]


def op_inputs(shape, dtype, structure):
    """(scores, weight, grad, threshold) for the mask ops: tied scores with NaN, ±inf and -0.0, random
    weight and gradient, and the half_threshold of the scores."""
    scores = with_specials(tied_scores(shape, dtype, levels=8))
    weight = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    return scores, weight, grad, half_threshold(scores, structure)


def topk_ks(total: int) -> list[int]:
    """k = 0, 1, 2, a third, a half, all but one, all, and more than all."""
    return sorted({0, 1, 2, total // 3, total // 2, total - 1, total, total + 5} - {-1})


def score_lists(sizes, dtype=torch.float64):
    """Three lists of 1-D scores with the given sizes: heavy ties with NaN/inf/-0.0, continuous values,
    and random bit patterns (keys over the whole float range, so every radix digit is exercised)."""
    tied = [with_specials(tied_scores((n,), dtype, levels=4).abs()) for n in sizes]
    continuous = [torch.rand(n, dtype=torch.float64).to(dtype) for n in sizes]
    bits = [torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int64).to(torch.int32).view(torch.float32).to(dtype)
            for n in sizes]
    return [tied, continuous, bits]


def randomize_masked(model: nn.Module) -> nn.Module:
    """Random batch-norm statistics and affine parameters (so a pruned filter's output is a nonzero
    constant) and random scores (so masks are not |θ|)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_()
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, (MaskedConv2d, MaskedLinear)):
                module.scores.uniform_()
    return model


def check_channels_last_conv_equals_torchs(structure: str) -> None:
    """A MaskedConv2d with a channels_last weight (model.to(memory_format=torch.channels_last)) on a contiguous
    input, on the backend in force: kept whole it equals that nn.Conv2d bit for bit, output layout and
    gradients included; pruned, it equals nn.Conv2d holding θ ⊙ m (also channels_last). The convolution
    picks its algorithm, and its output's layout, from the weight's layout too."""
    plain = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64).to(memory_format=torch.channels_last)
    masked = MaskedConv2d(4, 6, 3, padding=1, dtype=torch.float64, structure=structure)
    masked.load_state_dict(plain.state_dict())
    masked = masked.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    for sparsity in (0.0, 0.5):
        from bipkernels import project

        project(masked, sparsity)
        with torch.no_grad():
            plain.weight.copy_(torch.where(masked.mask(), masked.weight, 0))
        outputs, input_grads, weight_grads = [], [], []
        for layer in (masked, plain):
            layer.zero_grad(set_to_none=True)
            inputs = x.clone().requires_grad_()
            output = layer(inputs)
            output.backward(torch.ones_like(output))
            outputs.append(output)
            input_grads.append(inputs.grad)
            weight_grads.append(torch.where(masked.mask(), layer.weight.grad, 0))
        for name, (got, want) in zip(("output", "input grad", "weight grad"), (outputs, input_grads, weight_grads)):
            assert got.stride() == want.stride(), (sparsity, name, got.stride(), want.stride())
            assert torch.equal(got, want), (sparsity, name, (got - want).abs().max())


def resuming_text(saved: dict) -> str:
    """The start of what ``bipkernels prune --resume`` prints of where it goes on, for the contents of the
    resume.pt it resumes (a BiP state: its position is (epochs done, steps done in the next epoch))."""
    from bipkernels import data
    from bipkernels.solvers.bip import steps_per_epoch

    epoch, step = saved["position"]
    args = saved["args"]
    epochs = args["epochs"]
    if step >= steps_per_epoch(len(data.load(args["data"])["train"]), args["batch_size"], args["mode"]):
        epoch, step = epoch + 1, 0  # stopped at an epoch's last step: it goes on with the next epoch
    if epoch >= epochs:
        return "resuming after the last epoch"
    return f"resuming at epoch {epoch + 1} of {epochs}, step {step + 1} of "


def force_backend(monkeypatch, backend: str) -> None:
    monkeypatch.setenv("BIPKERNELS_BACKEND", backend)


@pytest.fixture(scope="session")
def emulated_cuda():
    """torch.ops.bipkernels_emulated_cuda: csrc/cuda's kernels on the CPU emulation (csrc/cuda/emulator.h,
    tests/emulated_cuda), built on first use into build/emulated_cuda (about a minute). Skipped off x86-64
    and where no C++ toolchain builds it, except under BIPKERNELS_REQUIRE_EXTENSION=1, as in CI."""
    from torch.utils import cpp_extension

    if platform.machine() != "x86_64":
        pytest.skip("the CUDA emulation runs on x86-64 only")

    build = ROOT / "build" / "emulated_cuda"
    build.mkdir(parents=True, exist_ok=True)
    # One translation unit with every .cu, so that a new kernel file is emulated without a change here.
    kernels = build / "kernels.cpp"
    text = "// Generated by tests/conftest.py (emulated_cuda): csrc/cuda/*.cu for the CPU emulation.\n" + "".join(
        f'#include "cuda/{path.name}"\n' for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")))
    if not kernels.exists() or kernels.read_text() != text:
        kernels.write_text(text)
    try:
        cpp_extension.load(
            name="bipkernels_emulated_cuda",
            sources=[str(ROOT / "tests" / "emulated_cuda" / "library.cpp"), str(kernels)],
            extra_include_paths=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],
            # -ffp-contract=off as the real builds (nvcc --fmad=false); hidden symbols, so that nothing here
            # binds to the same-named functions of bipkernels._C when its CUDA kernels are built too; no CET
            # (emulator.h switches stacks by hand).
            extra_cflags=["-O1", "-DBIPKERNELS_EMULATE_CUDA", "-ffp-contract=off", "-fvisibility=hidden",
                          "-fcf-protection=none", "-Wno-unknown-pragmas"],
            build_directory=str(build), is_python_module=False)
    except (RuntimeError, OSError) as error:
        if os.environ.get("BIPKERNELS_REQUIRE_EXTENSION") == "1":
            raise
        pytest.skip(f"cannot build the CUDA emulation: {error}")
    if HAS_CPU_KERNELS:  # bipkernels' fake kernels, for opcheck (they need _C); a session fixture: once
        for name in ("block_scores", "topk_threshold", "block_mask", "masked_weight", "hypergrad"):
            torch.library.register_fake(f"bipkernels_emulated_cuda::{name}", getattr(ops, f"_{name}_fake"))
    return torch.ops.bipkernels_emulated_cuda


def use_emulated_cuda(monkeypatch, emulated_cuda) -> None:
    """bipkernels.ops on CPU tensors runs the emulated CUDA kernels: the cpu backend, whose compiled ops
    are the emulation's (the same schemas), with ops' own checks and conversions in front."""
    force_backend(monkeypatch, "cpu")
    monkeypatch.setattr(ops, "_kernels", lambda backend: emulated_cuda)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``large`` (past 2^31 elements, many GB of memory) run only with BIPKERNELS_LARGE_TESTS=1."""
    if os.environ.get("BIPKERNELS_LARGE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="large: set BIPKERNELS_LARGE_TESTS=1 to run it")
    for item in items:
        if item.get_closest_marker("large") is not None:
            item.add_marker(skip)


def pytest_make_parametrize_id(config, val, argname):
    """dtypes by name in test ids (``float32``, not ``dtype0``), so that ``-k float32`` selects them."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None
