"""The compiled Triton kernels on a CUDA GPU (skipped without one, and under the interpreter): the ops and
the masked matmul at full sizes against the reference, torch.compile(fullgraph=True) of a model of
MaskedLinear layers against eager, and topk_threshold captured in a CUDA graph (no host synchronisation).

    TRITON_INTERPRET=0 BIPKERNELS_TRITON_AUTOTUNE=0 .venv/bin/python -m pytest -q tests/triton/test_gpu.py

(BIPKERNELS_TRITON_AUTOTUNE=0: one tile shape for the masked matmul, so one compile per case, not nine.)
"""

from __future__ import annotations

import pytest
import torch

import bipkernels
from bipkernels import ops, reference
from bipkernels.reference import IMPLICIT_FORMS
from bipkernels.structures import parse_structure

from conftest import DTYPES, TRITON_OP_NAMES, assert_close, needs_gpu, tied_scores, triton_op_call, with_specials

pytestmark = needs_gpu
STRUCTURES = ["unstructured", "filter", "channel", "2:4", "tile4x8"]
# Every structure in float32 and every other dtype under two structures, not the whole product: each
# (structure, dtype) pair compiles its own kernels, which is most of these tests' time.
CASES = [(name, torch.float32) for name in STRUCTURES] + \
    [(name, dtype) for dtype in DTYPES if dtype != torch.float32 for name in ("unstructured", "channel")]


@pytest.mark.parametrize("name, dtype", CASES)
def test_ops_at_full_size(triton_backend, seed, name, dtype):
    """A ResNet-50 layer4 convolution (2.4M weights): masks and thresholds exact, the rest within the
    written tolerance (a GPU may fuse a multiply and an add)."""
    structure = parse_structure(name, p=int(torch.randint(1, 3, ())))
    shape = (512, 512, 3, 3)
    scores = with_specials(tied_scores(shape, dtype, device="cuda"))
    weight, grad = (torch.randn(shape, device="cuda").to(dtype) for _ in range(2))
    blocks = ops.block_scores(scores, structure)
    torch.testing.assert_close(blocks, reference.block_scores(scores, structure), rtol=0, atol=0, equal_nan=True)
    threshold = None
    if structure.uses_threshold:
        threshold = ops.topk_threshold(blocks, blocks.numel() // 3)
        assert torch.equal(threshold, reference.topk_threshold([blocks], blocks.numel() // 3)[0])
    assert torch.equal(ops.block_mask(scores, threshold, structure), reference.block_mask(scores, threshold, structure))
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight, scores, threshold, structure))
    for implicit in IMPLICIT_FORMS:
        got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.1, implicit=implicit)
        want = reference.hypergrad(grad.double(), weight.double(), scores, threshold, structure, 0.1, implicit)
        direct = (weight.double() * grad.double()).abs()
        assert_close(got[0], want[0])
        assert_close(got[1], want[1], scale=direct + 0.1 * (direct**2 if implicit == "released" else grad.double()**2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_threshold_over_a_model(triton_backend, seed, dtype):
    """ResNet-18-like list (11M scores, many tensors), heavy ties: rows exact."""
    sizes = [9408, 36864, 36864, 73728, 147456, 8192, 589824, 2359296, 4718592, 512000, 1, 0]
    tensors = [with_specials(tied_scores((n,), dtype, levels=64, device="cuda")).abs() for n in sizes]
    total = sum(sizes)
    for k in (0, 1, total // 10, total // 2, total):
        assert torch.equal(ops.topk_threshold(tensors, k), reference.topk_threshold(tensors, k)), k


def test_topk_threshold_in_a_cuda_graph(triton_backend, seed):
    tensors = [torch.rand(n, device="cuda") for n in (1000, 33, 70001)]
    expected = reference.topk_threshold(tensors, 5000)
    ops.topk_threshold(tensors, 5000)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows = ops.topk_threshold(tensors, 5000)
    graph.replay()
    assert torch.equal(rows, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ["unstructured", "channel", "2:4"])
def test_ops_on_a_device_other_than_the_current(triton_backend, seed, name):
    """A triton launch goes to the current device: the ops make the tensors' own device current."""
    structure = parse_structure(name)
    shape = (48, 64)
    scores = tied_scores(shape, torch.float32, device="cuda:1")
    weight, grad, x = (torch.randn(size, device="cuda:1") for size in (shape, shape, (8, 64)))
    assert torch.cuda.current_device() == 0
    blocks = ops.block_scores(scores, structure)
    assert torch.equal(blocks, reference.block_scores(scores, structure))
    threshold = reference.topk_threshold([blocks], blocks.numel() // 3)[0]
    if structure.uses_threshold:
        assert torch.equal(ops.topk_threshold(blocks, blocks.numel() // 3), threshold)
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight, scores, threshold, structure))
    got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.1)
    want = reference.hypergrad(grad.double(), weight.double(), scores, threshold, structure, 0.1)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], scale=(weight.double() * grad.double()).abs() + 0.1 * grad.double() ** 2)
    masked = reference.masked_weight(weight, scores, threshold, structure).double()
    assert_close(ops.masked_linear(x, weight, scores, threshold, structure), x.double() @ masked.T,
                 scale=x.double().abs() @ masked.abs().T, terms=64)


@pytest.fixture
def ieee_float32():
    """float32 matmuls without TF32 for the test (the tolerance assumes float32 products)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("N, K, M", [(2752, 1024, 4096), (256, 384, 8192)])
@pytest.mark.parametrize("name, dtype", [(name, dtype) for name, dtype in CASES if dtype != torch.float64])
def test_masked_linear_at_full_size(ieee_float32, seed, name, dtype, N, K, M):
    """4096 tokens through a 2752×1024 weight (a quarter of a LLaMA MLP projection, to keep the float64
    reference quick), and 8192 through a 256×384 one, whose few tiles make the weight gradient split over
    the rows: forward, grad_input, grad_θ, grad_s against float64."""
    from bipkernels.triton.masked_linear import processors, weight_grad_slices

    if N == 256:  # 6 tiles of 128²: every GPU has more processors
        assert weight_grad_slices(M, N, K, processors(torch.device("cuda")))[0] > 1
    structure = parse_structure(name)
    weight = torch.randn(N, K, device="cuda").to(dtype)
    scores = tied_scores((N, K), dtype, levels=64, device="cuda")
    threshold = None
    if structure.uses_threshold:
        blocks = reference.block_scores(scores, structure)
        threshold = reference.topk_threshold([blocks], blocks.numel() // 2)[0]
    x, grad = torch.randn(M, K, device="cuda").to(dtype), torch.randn(M, N, device="cuda").to(dtype)
    masked = reference.masked_weight(weight, scores, threshold, structure).double()
    x64, grad64 = x.double(), grad.double()
    assert_close(ops.masked_linear(x, weight, scores, threshold, structure), x64 @ masked.T,
                 scale=x64.abs() @ masked.abs().T, terms=K)
    grad_input, grad_weight, grad_scores = ops.masked_linear_backward(grad, x, weight, scores, threshold, structure,
                                                                      inv_gamma=1e-4)
    assert_close(grad_input, grad64 @ masked, scale=grad64.abs() @ masked.abs(), terms=N)
    G = grad64.T @ x64
    G_scale = grad64.abs().T @ x64.abs()
    want_weight, want_scores = reference.hypergrad(G, weight.double(), scores, threshold, structure, 1e-4)
    assert_close(grad_weight, want_weight, scale=G_scale, terms=M)
    slope = weight.double().abs() + 2e-4 * G.abs()
    assert_close(grad_scores, want_scores, scale=slope * G_scale * M + (weight.double() * G).abs() + 1e-4 * G * G)


def _model(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.GELU(), torch.nn.Linear(384, 128))
    model = bipkernels.convert(model.to("cuda", dtype), sparsity=0.6, structure="unstructured")
    for _, layer in bipkernels.masked_layers(model):
        layer.inv_gamma = 1e-2
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph_equals_eager(triton_backend, seed, dtype):
    """MaskedLinear layers on the fused matmul, forward and backward, compiled into one graph."""
    model = _model(dtype)
    x, grad = torch.randn(512, 256, device="cuda", dtype=dtype), torch.randn(512, 128, device="cuda", dtype=dtype)
    assert ops.masked_linear_fused(x, model[0].weight)
    results = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        out = run(x)
        out.backward(grad)
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, **tolerance)


@pytest.mark.parametrize("name", TRITON_OP_NAMES)
def test_opcheck(name):
    """Schema, autograd registration, fake tensors and AOT dispatch with dynamic shapes: what
    torch.compile and torch.export rely on."""
    op, args = triton_op_call(name, "cuda")
    torch.library.opcheck(op, args)
