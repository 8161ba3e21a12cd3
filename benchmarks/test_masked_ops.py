"""masked_weight and the fused hypergrad on every backend against the unfused PyTorch chain.

Shapes: ResNet-50 layers (layer4's 3×3 convolution 512×512×3×3 = 2.4M, its 1×1 expansion 2048×512) and
GPT-2 small (an MLP projection 3072×768 = 2.4M, the token embedding 50257×768 = 38.6M). The baseline
"unfused torch" is bipkernels.reference: the mask from the threshold, then a select; the hypergradient as
separate elementwise ops: the same results, one pass per operation.
"""

from __future__ import annotations

import pytest
import torch

import bipkernels
from bipkernels import reference
from bipkernels.structures import parse_structure

SHAPES = {"conv 512x512x3x3": (512, 512, 3, 3), "conv 2048x512x1x1": (2048, 512, 1, 1),
          "GPT-2 mlp 3072x768": (3072, 768), "GPT-2 embedding 50257x768": (50257, 768)}
STRUCTURE = parse_structure("unstructured")


def _inputs(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    grad = torch.randn(shape, generator=generator)
    scores = weight.abs()
    threshold = bipkernels.topk_threshold(scores, bipkernels.keep_count(scores.numel(), 0.9))
    return weight, grad, scores, threshold


CALLS = {
    ("masked_weight", "bipkernels cpu"): lambda w, g, s, t, structure: bipkernels.masked_weight(w, s, t, structure),
    ("masked_weight", "unfused torch"): lambda w, g, s, t, structure: reference.masked_weight(w, s, t, structure),
    ("hypergrad", "bipkernels cpu"):
        lambda w, g, s, t, structure: bipkernels.hypergrad(g, w, s, t, structure, inv_gamma=1e-4)[0],
    ("hypergrad", "unfused torch"): lambda w, g, s, t, structure: reference.hypergrad(g, w, s, t, structure, 1e-4)[0],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["masked_weight", "hypergrad"])
@pytest.mark.parametrize("method", ["bipkernels cpu", "unfused torch"])
def test_masked_op_cpu(benchmark, op, shape, method):
    weight, grad, scores, threshold = _inputs(SHAPES[shape])
    benchmark.group = f"{op} cpu {shape}"
    benchmark.extra_info["baseline"] = method != "bipkernels cpu"
    out = benchmark(CALLS[op, method], weight, grad, scores, threshold, STRUCTURE)
    assert int((out != 0).sum()) == bipkernels.keep_count(weight.numel(), 0.9)


@pytest.mark.parametrize("shape", ["conv 512x512x3x3", "GPT-2 mlp 3072x768"])
@pytest.mark.parametrize("op", ["masked_weight", "hypergrad"])
@pytest.mark.parametrize("method", ["bipkernels cpu", "unfused torch"])
def test_masked_op_2_4_cpu(benchmark, op, shape, method):
    """The same ops under a 2:4 mask, which every forward and backward of a 2:4 BiP run recomputes: two
    of every four input channels by |s|, with no threshold."""
    weight, grad, scores, _ = _inputs(SHAPES[shape])
    benchmark.group = f"{op} cpu 2:4 {shape}"
    benchmark.extra_info["baseline"] = method != "bipkernels cpu"
    out = benchmark(CALLS[op, method], weight, grad, scores, None, parse_structure("2:4"))
    assert int((out != 0).sum()) == weight.numel() // 2


BLOCK_STRUCTURES = ["filter", "channel", "tile4x4", "2:4"]


@pytest.mark.parametrize("structure_name", BLOCK_STRUCTURES)
@pytest.mark.parametrize("op", ["block_scores", "block_mask"])
@pytest.mark.parametrize("method", ["bipkernels cpu", "unfused torch"])
def test_block_ops_cpu(benchmark, monkeypatch, op, structure_name, method):
    """block_scores and block_mask of ResNet-50's 512×512×3×3 convolution against the reference."""
    structure = parse_structure(structure_name)
    scores = torch.randn(SHAPES["conv 512x512x3x3"], generator=torch.Generator().manual_seed(0))
    threshold = None
    if structure.uses_threshold:
        block = reference.block_scores(scores, structure)
        threshold = reference.topk_threshold([block], bipkernels.keep_count(block.numel(), 0.9))[0]
    monkeypatch.setenv("BIPKERNELS_BACKEND", "cpu" if method == "bipkernels cpu" else "torch")
    benchmark.group = f"{op} cpu {structure_name} conv 512x512x3x3"
    benchmark.extra_info["baseline"] = method != "bipkernels cpu"
    if op == "block_scores":
        out = benchmark(bipkernels.block_scores, scores, structure)
        assert torch.equal(out, reference.block_scores(scores, structure))
    else:
        out = benchmark(bipkernels.block_mask, scores, threshold, structure)
        assert torch.equal(out, reference.block_mask(scores, threshold, structure))


@pytest.mark.parametrize("method", ["MaskedConv2d", "nn.Conv2d"])
def test_masked_conv2d_cpu(benchmark, method):
    """Forward + backward of a ResNet-50 layer3 3×3 convolution (256 channels, 14×14, batch 16)."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1, bias=False))
    if method == "MaskedConv2d":
        bipkernels.convert(layer, 0.9)
    inputs = torch.randn(16, 256, 14, 14, requires_grad=True)
    grad = torch.randn(16, 256, 14, 14)
    benchmark.group = "conv fwd+bwd cpu layer3 3x3 256, 14x14, batch 16"
    benchmark.extra_info["baseline"] = method != "MaskedConv2d"
    benchmark.pedantic(lambda: layer(inputs).backward(grad), rounds=9, warmup_rounds=1)
