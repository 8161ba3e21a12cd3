"""CPU masked_weight and fused hypergrad against the unfused PyTorch chains a user would otherwise write.

Shapes: ResNet-50 layers (layer4's 3×3 convolution 512×512×3×3 = 2.4M, its 1×1 expansion 2048×512).
Baseline "unfused torch": bipkernels.reference (mask from the threshold, then a select; the
hypergradient as separate elementwise ops) — the same results, one pass per operation.
"""

from __future__ import annotations

import pytest
import torch

import bipkernels
from bipkernels import reference
from bipkernels.structures import parse_structure

SHAPES = {"conv 512x512x3x3": (512, 512, 3, 3), "conv 2048x512x1x1": (2048, 512, 1, 1)}


def _inputs(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    grad = torch.randn(shape, generator=generator)
    scores = weight.abs()
    threshold = bipkernels.topk_threshold(scores, bipkernels.keep_count(scores.numel(), 0.9))
    return weight, grad, scores, threshold


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", ["bipkernels", "unfused torch"])
def test_masked_weight_cpu(benchmark, shape, method):
    weight, _, scores, threshold = _inputs(SHAPES[shape])
    benchmark.group = f"masked_weight cpu {shape}"
    benchmark.extra_info["baseline"] = method != "bipkernels"
    structure = parse_structure("unstructured")
    if method == "bipkernels":
        out = benchmark(bipkernels.masked_weight, weight, scores, threshold, structure)
    else:
        out = benchmark(reference.masked_weight, weight, scores, threshold, structure)
    assert int((out != 0).sum()) == bipkernels.keep_count(weight.numel(), 0.9)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", ["bipkernels", "unfused torch"])
def test_hypergrad_cpu(benchmark, shape, method):
    weight, grad, scores, threshold = _inputs(SHAPES[shape])
    benchmark.group = f"hypergrad cpu {shape}"
    benchmark.extra_info["baseline"] = method != "bipkernels"
    structure = parse_structure("unstructured")
    if method == "bipkernels":
        grad_weight, _ = benchmark(bipkernels.hypergrad, grad, weight, scores, threshold, structure, inv_gamma=1e-4)
    else:
        grad_weight, _ = benchmark(reference.hypergrad, grad, weight, scores, threshold, structure, 1e-4)
    assert int((grad_weight != 0).sum()) == bipkernels.keep_count(weight.numel(), 0.9)
