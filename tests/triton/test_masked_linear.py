"""The fused masked matmul and MaskedLinear on the triton backend, through the interpreter, against the
float64 reference: reference.masked_weight + F.linear forward, and for the backward grad_input = g Wm,
(grad_θ, grad_s) = reference.hypergrad of G = gᵀ x. Every structure, float32/float16/bfloat16, odd sizes
(none a multiple of the 16-wide tiles), leading dimensions, empty sizes, NaN/inf pruned weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton

import bipkernels
from bipkernels import ops, reference
from bipkernels.reference import IMPLICIT_FORMS
from bipkernels.structures import parse_structure

from conftest import EPS, assert_close, needs_interpreter, tied_scores

pytestmark = needs_interpreter
STRUCTURES = ["unstructured", "filter", "channel", "2:4", "tile3x5"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INV_GAMMA = 0.37


def _threshold(scores, structure, keep=0.5):
    if not structure.uses_threshold:
        return None
    blocks = reference.block_scores(scores, structure)
    return reference.topk_threshold([blocks], int(blocks.numel() * keep))[0]


def _check(x, weight, scores, threshold, structure, bias, grad):
    """Forward and backward of the fused matmul against the float64 reference, within the accumulation
    error of float32 sums over K (forward, grad_input: over N) and M (G) terms."""
    M, (N, K) = math.prod(x.shape[:-1]), weight.shape
    x64, grad64 = x.double().reshape(M, K), grad.double().reshape(M, N)
    masked = reference.masked_weight(weight, scores, threshold, structure).double()
    bias64 = torch.zeros(N, dtype=torch.float64) if bias is None else bias.double()
    got = ops.masked_linear(x, weight, scores, threshold, structure, bias)
    assert got.shape == (*x.shape[:-1], N) and got.dtype == weight.dtype
    assert_close(got.reshape(M, N), F.linear(x64, masked, bias64),
                 scale=x64.abs() @ masked.abs().T + bias64.abs(), terms=K + 1)
    G, G_scale = grad64.T @ x64, grad64.abs().T @ x64.abs()
    for implicit in IMPLICIT_FORMS:
        grad_input, grad_weight, grad_scores = ops.masked_linear_backward(
            grad, x, weight, scores, threshold, structure, inv_gamma=INV_GAMMA, implicit=implicit)
        assert grad_input.shape == x.shape and grad_weight.shape == grad_scores.shape == weight.shape
        assert_close(grad_input.reshape(M, K), grad64 @ masked, scale=grad64.abs() @ masked.abs(), terms=N)
        want_weight, want_scores = reference.hypergrad(G, weight.double(), scores, threshold, structure, INV_GAMMA,
                                                       implicit)
        assert_close(grad_weight, want_weight, scale=G_scale, terms=M)
        # grad_s = θG − γ·I(G): G's error times the derivative, plus the rounding of the two terms.
        theta = weight.double().abs()
        slope = theta + 2 * INV_GAMMA * (theta * theta * G.abs() if implicit == "released" else G.abs())
        terms = (theta * G).abs() + (want_scores - weight.double() * G).abs()  # |θG| + γ|I|
        assert_close(grad_scores, want_scores, scale=slope * G_scale * M + terms)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", STRUCTURES)
def test_forward_and_backward_match_the_reference(seed, name, dtype):
    structure = parse_structure(name, p=int(torch.randint(1, 3, ())))
    N, K = 23, 28  # 2:4 needs K % 4 == 0
    weight = torch.randn(N, K, dtype=torch.float64).to(dtype)
    scores = tied_scores((N, K), dtype)
    x, grad = torch.randn(19, K, dtype=torch.float64).to(dtype), torch.randn(19, N, dtype=torch.float64).to(dtype)
    bias = torch.randn(N, dtype=torch.float64).to(dtype)
    _check(x, weight, scores, _threshold(scores, structure), structure, bias, grad)


def test_a_bfloat16_bias_of_subnormals_is_added_exactly(seed):
    """y = 0 · (m ⊙ θ)ᵀ + bias is the bias itself, subnormal bfloat16 values included (the interpreter's
    bfloat16 conversion rounds those wrongly: the kernel widens them by their bits)."""
    N, K = 9, 8
    weight, scores = torch.randn(N, K).bfloat16(), tied_scores((N, K), torch.bfloat16)
    bits = torch.randint(1, 128, (N,), dtype=torch.int16) | (torch.randint(0, 2, (N,), dtype=torch.int16) << 15)
    bias = bits.view(torch.bfloat16)  # random subnormals of either sign
    got = ops.masked_linear(torch.zeros(3, K, dtype=torch.bfloat16), weight, scores, None, "2:4", bias)
    assert torch.equal(got, bias.expand(3, N))


@pytest.mark.parametrize("leading, N, K", [((2, 5), 9, 13), ((), 7, 11), ((0,), 5, 3), ((4,), 5, 0), ((4,), 0, 6)])
def test_leading_and_empty_sizes(seed, leading, N, K):
    structure = parse_structure("unstructured")
    weight, scores = torch.randn(N, K), torch.rand(N, K)
    x, grad = torch.randn(*leading, K), torch.randn(*leading, N)
    _check(x, weight, scores, _threshold(scores, structure), structure, torch.randn(N), grad)
    _check(x, weight, scores, _threshold(scores, structure), structure, None, grad)


def test_weight_grad_slices_cover_the_rows(monkeypatch):
    from bipkernels.triton import masked_linear as kernels

    for rows in range(0, 400, 7):  # the interpreter's sizes
        for N, K in ((5, 7), (23, 28), (40, 40)):
            slices, per_slice = kernels.weight_grad_slices(rows, N, K, 8)
            assert 1 <= slices <= 16 and (slices - 1) * per_slice < max(rows, 1) and slices * per_slice >= rows
            assert slices == 1 or (per_slice >= 32 and per_slice % 16 == 0)
    for name, gpu_size in (("_SPLIT_TILE", 128), ("_MIN_SPLIT_ROWS", 1024), ("_SPLIT_ROW_ALIGN", 64)):
        monkeypatch.setattr(kernels, name, gpu_size)
    assert kernels.weight_grad_slices(4096, 768, 768, 132) == (3, 1408)  # 36 tiles of 128²: 3 × 36 fit 132 SMs
    assert kernels.weight_grad_slices(4096, 1024, 1088, 132) == (1, 4096)  # 72 tiles: two slices overfill
    assert kernels.weight_grad_slices(4096, 4096, 4096, 132) == (1, 4096)  # 1024 tiles fill them already
    assert kernels.weight_grad_slices(1500, 768, 768, 132) == (1, 1500)  # too few rows for two slices
    assert kernels.weight_grad_slices(10**6, 64, 64, 132) == (16, 62528)  # at most 16


def test_a_symbolic_row_count_adds_no_guards():
    """Traced with dynamic shapes (torch.compile), the row count stays symbolic: one slice, the count
    itself as the tuning key, and no guard that would recompile the graph at other batch sizes."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from bipkernels.triton import masked_linear as kernels

    shapes = ShapeEnv()
    rows = shapes.create_symintnode(shapes.create_symbol(100, ConstantSource("rows")), hint=100)
    assert kernels.weight_grad_slices(rows, 5, 7, 8) == (1, rows) and kernels.row_bucket(rows) is rows
    assert not shapes.guards
    assert kernels.weight_grad_slices(100, 5, 7, 8)[0] > 1  # the same count, concrete, splits


@pytest.mark.parametrize("rows, N, K", [(100, 5, 8), (150, 23, 28), (64, 8, 12), (97, 3, 8)])  # 2:4: K % 4 == 0
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("align", [16, 5])  # 5: slices end inside a BLOCK_K step of rows
def test_weight_gradient_split_over_rows(monkeypatch, seed, name, dtype, rows, N, K, align):
    """A small weight with many rows takes the split-K path (partial G per slice of rows, summed in the
    hypergradient kernel): the same gradients as the reference."""
    from bipkernels.triton import masked_linear as kernels

    monkeypatch.setattr(kernels, "_SPLIT_ROW_ALIGN", align)

    structure = parse_structure(name, p=int(torch.randint(1, 3, ())))
    launches = []
    launch = kernels.hypergrad.launch
    monkeypatch.setattr(kernels.hypergrad, "launch", lambda *args: launches.append(args[1].shape) or launch(*args))
    weight = torch.randn(N, K, dtype=torch.float64).to(dtype)
    scores = tied_scores((N, K), dtype)
    x, grad = torch.randn(rows, K, dtype=torch.float64).to(dtype), torch.randn(rows, N, dtype=torch.float64).to(dtype)
    _check(x, weight, scores, _threshold(scores, structure), structure, None, grad)
    slices = kernels.weight_grad_slices(rows, N, K, 8)[0]
    assert slices > 1 and launches == [(slices, N, K)] * len(IMPLICIT_FORMS)


@pytest.mark.parametrize("rows", [5, 100])  # 100: the weight gradient splits over the rows
def test_pruned_nan_and_inf_weights_contribute_zero(seed, rows):
    """A select, not a multiply: the output and the input's gradient stay finite, grad_θ is 0 there."""
    structure = parse_structure("unstructured")
    weight, scores = torch.randn(9, 17), torch.rand(9, 17) + 1
    places = torch.randperm(weight.numel())[:3]
    weight.view(-1)[places] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    scores.view(-1)[places] = 0.0  # the lowest scores: pruned
    threshold = _threshold(scores, structure, keep=0.7)
    x, grad = torch.randn(rows, 17), torch.randn(rows, 9)
    assert ops.masked_linear(x, weight, scores, threshold, structure).isfinite().all()
    grad_input, grad_weight, _ = ops.masked_linear_backward(grad, x, weight, scores, threshold, structure)
    assert grad_input.isfinite().all() and bool((grad_weight.view(-1)[places] == 0).all())
    _check(x, weight, scores, threshold, structure, None, grad)


@pytest.mark.parametrize("implicit", IMPLICIT_FORMS)
@pytest.mark.parametrize("name", ["unstructured", "2:4", "tile3x5"])
def test_masked_linear_layer_on_the_triton_backend(monkeypatch, seed, name, implicit):
    """MaskedLinear runs the fused matmul under BIPKERNELS_BACKEND=triton and gives what the unfused
    PyTorch path gives: output and every gradient (input, weight, bias, scores), in both implicit forms
    (a fused path that dropped the layer's ``implicit`` gave the paper form's scores gradient)."""
    layer = bipkernels.MaskedLinear(28, 13, structure=name)
    bipkernels.project(layer, 0.5)
    layer.inv_gamma, layer.implicit = INV_GAMMA, implicit
    x, grad = torch.randn(3, 5, 28), torch.randn(3, 5, 13)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("BIPKERNELS_BACKEND", backend)
        assert ops.masked_linear_fused(x, layer.weight) == (backend == "triton")
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        layer(inputs).backward(grad)
        results[backend] = [layer(x).detach(), inputs.grad, layer.weight.grad, layer.bias.grad, layer.scores.grad]
    for fused, unfused in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, input_shape", [(lambda: bipkernels.MaskedLinear(7, 5, structure="filter"), (7,)),
                                               (lambda: bipkernels.MaskedConv2d(2, 3, 3), (2, 4, 4))])
def test_torch_func_on_the_triton_backend(monkeypatch, seed, make, input_shape):
    """torch.func.grad and vmap (per-sample gradients) through the triton ops (the fused matmul for the
    linear layer) give the gradients the torch backend's loss.backward() gives, example by example."""
    layer = make()
    bipkernels.project(layer, 0.5)
    layer.inv_gamma = INV_GAMMA
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    inputs = torch.randn(2, *input_shape)

    def loss(params, inputs):
        return torch.func.functional_call(layer, {**params, **buffers}, (inputs,)).sin().sum()

    monkeypatch.setenv("BIPKERNELS_BACKEND", "triton")
    whole = torch.func.grad(loss)(params, inputs)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, inputs[:, None])
    monkeypatch.setenv("BIPKERNELS_BACKEND", "torch")
    for index, batch in [(None, inputs), (0, inputs[:1]), (1, inputs[1:])]:
        layer.zero_grad()
        loss(params, batch).backward()
        for name, param in params.items():
            got = whole[name] if index is None else per_example[name][index]
            torch.testing.assert_close(got, param.grad, rtol=1e-5, atol=1e-5)


def test_second_derivatives_through_the_fused_matmul(triton_backend, seed):
    """A Hessian and a mixed second derivative through the fused MaskedLinear equal the plain layer's on
    θ ⊙ m (its backward, under create_graph, is unfused torch operations that autograd differentiates)."""
    layer = bipkernels.MaskedLinear(7, 5, structure="filter")
    bipkernels.project(layer, 0.5)
    layer.inv_gamma = INV_GAMMA
    mask, x = layer.mask().float(), torch.randn(3, 7)
    assert ops.masked_linear_fused(x, layer.weight)
    weight = layer.weight.detach().clone()

    def masked_loss(w, inputs=x):
        return torch.func.functional_call(layer, {"weight": w}, (inputs,)).pow(2).sum()

    def plain_loss(w, inputs=x):
        return F.linear(inputs, w * mask, layer.bias.detach()).pow(2).sum()

    hessian = torch.autograd.functional.hessian
    torch.testing.assert_close(hessian(masked_loss, weight), hessian(plain_loss, weight), rtol=1e-5, atol=1e-5)
    for loss in (masked_loss, plain_loss):
        inputs, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        (grad_weight,) = torch.autograd.grad(loss(w, inputs), w, create_graph=True)
        grad_weight.pow(2).sum().backward()
        if loss is masked_loss:
            fused_input_grad = inputs.grad
    torch.testing.assert_close(fused_input_grad, inputs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features, out_features", [(4, 0), (0, 3)])
def test_second_derivatives_of_an_empty_fused_layer(triton_backend, seed, in_features, out_features):
    """A zero-size weight under create_graph: gradients of the right (empty or zero) shapes, no reshape of 0
    elements into [-1, 0]."""
    layer = bipkernels.MaskedLinear(in_features, out_features)
    x = torch.randn(2, in_features, requires_grad=True)
    (grad_weight, grad_scores) = torch.autograd.grad(layer(x).square().sum(), (layer.weight, layer.scores),
                                                     create_graph=True)
    assert grad_weight.shape == grad_scores.shape == layer.weight.shape
    (grad_x,) = torch.autograd.grad(grad_weight.sum() + grad_scores.sum(), x, allow_unused=True, materialize_grads=True)
    assert torch.equal(grad_x, torch.zeros_like(x))


def test_float64_and_mixed_dtypes_stay_unfused(triton_backend, seed):
    """The matmul has no float64 path: the layer runs masked_weight (a triton kernel) then F.linear."""
    layer = bipkernels.MaskedLinear(6, 5, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert not ops.masked_linear_fused(x, layer.weight)
    assert not ops.masked_linear_fused(x.float(), layer.weight.float().half())
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_autotuning_is_keyed_on_the_row_bucket(monkeypatch, seed):
    """Row counts in one power-of-two bucket reuse the tuned tiles (one round of benchmarks per bucket, not
    per batch size); every call still computes with its own row count. Benchmarks are stubbed: the
    interpreter has one configuration and nothing to time."""
    from bipkernels.triton import masked_linear as kernels

    assert [kernels.row_bucket(rows) for rows in (1, 16, 17, 32, 33, 100, 128, 129)] == [16, 16, 32, 32, 64, 128,
                                                                                          128, 256]
    structure = parse_structure("unstructured")
    weight, scores = torch.randn(33, 65), torch.randn(33, 65)  # 15 tiles: enough for 8 "processors", no split
    threshold = _threshold(scores, structure)
    benchmarked = []
    for kernel in (kernels._times_masked_weight_kernel, kernels._weight_grad_kernel):
        two = [triton.Config({**config.kwargs, "GROUP_M": group}, num_warps=config.num_warps,
                             num_stages=config.num_stages) for config in kernel.configs[:1] for group in (4, 8)]
        monkeypatch.setattr(kernel, "configs", two)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench", lambda *args, config, **meta: benchmarked.append(config) or [1.0])
    for rows, rounds in ((40, 1), (64, 1), (33, 1), (65, 2), (20, 3)):  # buckets 64, 64, 64, 128, 32
        x, grad = torch.randn(rows, 65), torch.randn(rows, 33)
        _check(x, weight, scores, threshold, structure, None, grad)
        # forward and input gradient (one kernel, TRANSPOSED in its key) and weight gradient: 3 launches a round
        assert len(benchmarked) == 2 * 3 * rounds


@pytest.mark.parametrize("setting", ["default", "legacy high", "legacy highest", "global tf32", "matmul tf32",
                                     "global tf32, matmul ieee"])
def test_tf32_follows_torchs_precision_settings(seed, setting):
    """The fused float32 matmul uses TF32 when torch's float32 CUDA matmuls do, whichever API set it:
    torch.get_float32_matmul_precision raises once the newer fp32_precision settings were made, so every
    float32 call through the fused path failed after torch.backends.fp32_precision = "tf32"."""
    from bipkernels.triton import masked_linear as kernels

    saved = (torch.get_float32_matmul_precision(), torch.backends.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision)
    try:
        if setting.startswith("legacy"):
            torch.set_float32_matmul_precision(setting.split()[1])
        if setting.startswith("global"):
            torch.backends.fp32_precision = "tf32"
        if setting.startswith("matmul"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        if setting.endswith("matmul ieee"):
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        expected = setting in ("legacy high", "global tf32", "matmul tf32")
        assert kernels.float32_matmuls_use_tf32() is expected
        weight = torch.randn(6, 8)
        assert kernels._common(weight)["TF32"] is expected and not kernels._common(weight.half())["TF32"]
        threshold = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
        x = torch.randn(5, 8)
        torch.testing.assert_close(torch.ops.bipkernels_triton.masked_linear(x, weight, weight, threshold, None,
                                                                            0, 0, 0, 1), x @ weight.T)
    finally:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[1:]


def test_errors_name_the_op(triton_backend):
    structure = parse_structure("unstructured")
    weight, keep_all = torch.randn(4, 6), torch.tensor([float("-inf"), float("inf")], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bipkernels.masked_linear: input must end in a dimension of 6"):
        ops.masked_linear(torch.randn(3, 5), weight, weight, keep_all, structure)
    with pytest.raises(ValueError, match=r"bipkernels.masked_linear: bias has dtype torch.float16"):
        ops.masked_linear(torch.randn(3, 6), weight, weight, keep_all, structure, torch.randn(4).half())
    with pytest.raises(TypeError, match=r"bipkernels.masked_linear: weight must be one of .*got torch.float64"):
        ops.masked_linear(torch.randn(3, 6).double(), weight.double(), weight.double(), keep_all, structure)
    with pytest.raises(ValueError, match=r"bipkernels.masked_linear: bias must have shape \(4,\), got \(3, 4\)"):
        ops.masked_linear(torch.randn(3, 6), weight, weight, keep_all, structure, torch.randn(3, 4))  # read 1 row
    for name, value in (("input", [[0.0] * 6]), ("bias", [0.0] * 4)):
        arguments = dict(input=torch.randn(3, 6), bias=None) | {name: value}
        with pytest.raises(TypeError, match=f"bipkernels.masked_linear: {name} must be a tensor, got list"):
            ops.masked_linear(arguments["input"], weight, weight, keep_all, structure, arguments["bias"])
    with pytest.raises(ValueError, match=r"bipkernels.masked_linear_grad_weight: grad_output has 2 rows but input"):
        ops.masked_linear_backward(torch.randn(2, 4), torch.randn(3, 6), weight, weight, keep_all, structure)
    assert EPS[torch.float32] == torch.finfo(torch.float32).eps  # the written tolerance table is torch's
