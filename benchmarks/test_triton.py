"""The Triton kernels on a GPU (skipped without one): what bipkernels.triton.AUTO_ON_CUDA is to be filled from.

- MaskedLinear forward + backward with the hypergradient (inv_gamma 1e-4), bfloat16, 4096 tokens, at a
  4096×4096 and an 11008×4096 weight (LLaMA-7B's attention and MLP projections) and a 768×768 one (BERT-base
  attention: too few tiles to fill the GPU, so its weight gradient is split over the rows): the fused masked matmul
  (BIPKERNELS_BACKEND=triton) against the unfused layer (cuda masked_weight + cuBLAS + cuda hypergrad)
  and against dense nn.Linear.
- Every elementwise op and topk_threshold: the triton kernel against the cuda kernel, at the shapes of
  test_masked_ops.py and over ResNet-50's layers.
Each records the CUDA-event median and, for the memory-bound ops, the fraction of a measured device copy's
bandwidth (benchmarks/gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bipkernels
from bipkernels import ops
from bipkernels.structures import parse_structure

from .conftest import model_scores
from .gpu import record
from .test_masked_ops import SHAPES as MASKED_SHAPES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SPARSITY = 0.5
TOKENS = 4096
LINEAR_SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "768x768": (768, 768)}  # (out, in)
# The triton kernels against the cuda ones, in groups of their own ("ours": triton).
METHODS = ["bipkernels triton", "bipkernels cuda"]


def _needs(monkeypatch, backend: str, op: str) -> None:
    """Forces ``backend``, or skips where this build or machine cannot run ``op`` on it."""
    reason = ops._available(backend, op, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("BIPKERNELS_BACKEND", backend)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
@pytest.mark.parametrize("method", ["MaskedLinear triton (fused)", "MaskedLinear unfused", "nn.Linear"])
def test_masked_linear_triton(benchmark, monkeypatch, method, shape, structure):
    out_features, in_features = LINEAR_SHAPES[shape]
    layer = nn.Sequential(nn.Linear(in_features, out_features, bias=False)).to("cuda", torch.bfloat16)
    if method != "nn.Linear":
        bipkernels.convert(layer, SPARSITY if structure == "unstructured" else 0.0, structure=structure)
        layer[0].inv_gamma = 1e-4
    if method == "MaskedLinear triton (fused)":
        _needs(monkeypatch, "triton", "masked_linear")
    inputs = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(TOKENS, out_features, device="cuda", dtype=torch.bfloat16)
    if method != "nn.Linear":
        assert ops.masked_linear_fused(inputs, layer[0].weight) == (method == "MaskedLinear triton (fused)")

    def forward_backward():
        layer(inputs).backward(grad)

    benchmark.group = f"linear fwd+bwd bf16 {TOKENS} tokens {shape} {structure}"
    benchmark.extra_info.update(baseline=method != "MaskedLinear triton (fused)",
                                tflops=6 * TOKENS * in_features * out_features / 1e12)
    record(benchmark, forward_backward, ())


def _masked_inputs(shape):
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(shape, device="cuda", generator=generator)
    return weight, torch.randn_like(weight), weight.abs()


@pytest.mark.parametrize("shape", list(MASKED_SHAPES))
@pytest.mark.parametrize("op", ["block_scores", "masked_weight", "hypergrad"])
@pytest.mark.parametrize("method", METHODS)
def test_elementwise_triton_vs_cuda(benchmark, monkeypatch, method, op, shape):
    structure = parse_structure("filter" if op == "block_scores" else "unstructured")
    weight, grad, scores = _masked_inputs(MASKED_SHAPES[shape])
    threshold = torch.tensor([1.0, float("inf")], dtype=torch.float64, device="cuda")
    _needs(monkeypatch, method.split()[-1], op)
    if op == "block_scores":  # reads s, writes one score per filter
        call, args, tensors_moved = ops.block_scores, (scores, structure), 1
    elif op == "masked_weight":  # reads θ and s, writes θ ⊙ m
        call, args, tensors_moved = ops.masked_weight, (weight, scores, threshold, structure), 3
    else:  # reads g, θ and s, writes grad_θ and grad_s
        call, args, tensors_moved = (lambda *a: ops.hypergrad(*a, inv_gamma=1e-4)), \
            (grad, weight, scores, threshold, structure), 5
    benchmark.group = f"{op} triton vs cuda {shape}"
    benchmark.extra_info["baseline"] = method != METHODS[0]
    record(benchmark, call, args, tensors_moved * weight.numel() * weight.element_size())


@pytest.mark.parametrize("method", METHODS)
def test_topk_threshold_triton_vs_cuda(benchmark, monkeypatch, method):
    scores = [s.cuda() for s in model_scores("ResNet-50")]
    n = sum(s.numel() for s in scores)
    k = bipkernels.keep_count(n, 0.9)
    _needs(monkeypatch, method.split()[-1], "topk_threshold")
    benchmark.group = f"topk_threshold triton vs cuda ResNet-50 {n / 1e6:.1f}M"
    benchmark.extra_info["baseline"] = method != METHODS[0]
    thresholds = record(benchmark, ops.topk_threshold, (scores, k), n * scores[0].element_size())
    assert sum(int(ops.block_mask(s, t).sum()) for s, t in zip(scores, thresholds)) == k
