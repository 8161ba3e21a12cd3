"""The CUDA kernels against what users would otherwise run on a GPU (skipped without one).

- topk_threshold over real models' layer shapes (ResNet-18 11.2M, ResNet-50 25.6M, GPT-2 124M) against
  torch.topk and torch.kthvalue (the threshold alone, as ours) and the official implementation's torch.sort
  of all scores + index.
- masked_weight and the fused hypergrad against the unfused PyTorch chain (bipkernels.reference).
- MaskedConv2d forward + backward against nn.Conv2d (cuDNN) on ResNet-50 layer shapes, batch 64.
Each records the CUDA-event median and, for the memory-bound kernels, the fraction of a measured device
copy's bandwidth (benchmarks/gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bipkernels
from bipkernels import reference
from bipkernels.structures import parse_structure

from .conftest import model_scores
from .gpu import record
from .test_masked_ops import SHAPES as MASKED_SHAPES
from .test_topk_threshold import kthvalue_threshold, official_sort_and_index, topk_threshold_value

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SPARSITY = 0.9
MODELS = ["ResNet-18", "ResNet-50", "GPT-2"]
_cache: dict[str, list[torch.Tensor]] = {}


def _model_scores(model: str) -> list[torch.Tensor]:
    # All three models stay (0.7 GB of GPU memory): the model is the parameter that varies fastest, so
    # keeping one regenerated every model's scores on the CPU for every method.
    if model not in _cache:
        _cache[model] = [s.cuda() for s in model_scores(model)]
    return _cache[model]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["bipkernels cuda", "torch.topk", "torch.kthvalue", "official sort+index"])
def test_topk_threshold_cuda(benchmark, monkeypatch, model, method):
    scores = _model_scores(model)
    n = sum(s.numel() for s in scores)
    k = bipkernels.keep_count(n, SPARSITY)
    benchmark.group = f"topk_threshold cuda {model} {n / 1e6:.1f}M"
    benchmark.extra_info["baseline"] = method != "bipkernels cuda"
    read_once = n * scores[0].element_size()
    if method == "bipkernels cuda":
        monkeypatch.setenv("BIPKERNELS_BACKEND", "cuda")
        thresholds = record(benchmark, bipkernels.topk_threshold, (scores, k), read_once)
        assert sum(int(bipkernels.block_mask(s, t).sum()) for s, t in zip(scores, thresholds)) == k
    elif method == "torch.topk":  # the threshold, as ours (not the masks too: a layer's loop of writes)
        record(benchmark, topk_threshold_value, (scores, k), read_once)
    elif method == "torch.kthvalue":
        record(benchmark, kthvalue_threshold, (scores, k), read_once)
    else:
        record(benchmark, official_sort_and_index, (scores, k), read_once)


@pytest.mark.parametrize("shape", list(MASKED_SHAPES))
@pytest.mark.parametrize("op", ["masked_weight", "hypergrad"])
@pytest.mark.parametrize("method", ["bipkernels cuda", "unfused torch"])
def test_masked_op_cuda(benchmark, monkeypatch, op, shape, method):
    structure = parse_structure("unstructured")
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(MASKED_SHAPES[shape], device="cuda", generator=generator)
    grad = torch.randn_like(weight)
    scores = weight.abs()
    monkeypatch.setenv("BIPKERNELS_BACKEND", "cuda")  # ours: the cuda kernels or an error, never the reference
    threshold = bipkernels.topk_threshold(scores, bipkernels.keep_count(scores.numel(), SPARSITY))
    ours = method == "bipkernels cuda"
    if op == "masked_weight":  # reads θ and s, writes θ ⊙ m
        call = bipkernels.masked_weight if ours else reference.masked_weight
        args, tensors_moved = (weight, scores, threshold, structure), 3
    else:  # reads g, θ and s, writes grad_θ and grad_s
        call = (lambda *a: bipkernels.hypergrad(*a, inv_gamma=1e-4)) if ours else \
            (lambda *a: reference.hypergrad(*a, 1e-4))
        args, tensors_moved = (grad, weight, scores, threshold, structure), 5
    benchmark.group = f"{op} cuda {shape}"
    benchmark.extra_info["baseline"] = not ours
    record(benchmark, call, args, tensors_moved * weight.numel() * weight.element_size())


# (out, in, kernel, input size) of ResNet-50 convolutions at 224×224.
CONV_SHAPES = {"layer1 3x3 64": (64, 64, 3, 56), "layer2 3x3 128": (128, 128, 3, 28),
               "layer3 3x3 256": (256, 256, 3, 14), "layer4 3x3 512": (512, 512, 3, 7),
               "layer4 1x1 512->2048": (2048, 512, 1, 7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(CONV_SHAPES))
@pytest.mark.parametrize("method", ["MaskedConv2d", "nn.Conv2d"])
def test_masked_conv2d_cuda(benchmark, method, shape, dtype):
    out_channels, in_channels, kernel, size = CONV_SHAPES[shape]
    layer = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False))
    layer = layer.to(device="cuda", dtype=dtype, memory_format=torch.channels_last)
    if method == "MaskedConv2d":
        bipkernels.convert(layer, SPARSITY)
    inputs = torch.randn(64, in_channels, size, size, device="cuda", dtype=dtype,
                         requires_grad=True).to(memory_format=torch.channels_last)
    grad = torch.randn(64, out_channels, size, size, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)

    def forward_backward():
        layer(inputs).backward(grad)

    benchmark.group = f"conv fwd+bwd cuda {shape} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["baseline"] = method != "MaskedConv2d"
    record(benchmark, forward_backward, ())
