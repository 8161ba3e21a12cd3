"""Inference speed of exported models: the physically smaller model (export_shrunk) against the dense
export (same architecture, zeros where pruned: the cost of the unpruned model) on the CPU, and 2:4
semi-structured Linear weights against dense ones on a CUDA GPU.

CPU models: torchvision ResNet-18, MobileNetV2, DenseNet-121 and EfficientNet-B0 (1000 classes), 50% of the
filters of every layer pruned (random scores), batch norms with random shifts as a trained model has (so pruned
filters output nonzero constants) and running statistics recalibrated after pruning; batch 8 at 224×224, eval
mode, no_grad.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bipkernels

CPU_MODELS = ("resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0")
CPU_METHODS = ("shrunk", "dense")
_cache: dict[str, tuple[nn.Module, nn.Module, torch.Tensor]] = {}


def _models(name: str):
    """(dense export, shrunk export, input) of a filter-pruned torchvision model, built once per run."""
    if name not in _cache:
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)()
        bipkernels.convert(model, 0.0, "filter")
        norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
        with torch.no_grad():
            for _, layer in bipkernels.masked_layers(model):
                layer.scores.uniform_()
            bipkernels.project(model, 0.5, scope="layer")
            # Statistics recalibrated after pruning, as a pruned model is evaluated (DESIGN: BiP pitfalls).
            for norm in norms:
                norm.bias.normal_(0, 0.1)
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the calibration batches
            model.train()
            for _ in range(2):
                model(torch.randn(8, 3, 224, 224))
        x = torch.randn(8, 3, 224, 224)
        small, _ = bipkernels.export_shrunk(model.eval(), x, warn=False)
        _cache[name] = (bipkernels.export_dense(model).eval(), small, x)
    return _cache[name]


@pytest.mark.parametrize("model_name", CPU_MODELS)
@pytest.mark.parametrize("method", CPU_METHODS)
def test_export_inference_cpu(benchmark, method, model_name):
    dense, small, x = _models(model_name)
    model = small if method == "shrunk" else dense
    benchmark.group = f"export inference cpu {model_name} 50% filters batch 8 224x224"
    benchmark.extra_info["baseline"] = method != "shrunk"
    benchmark.extra_info["parameters"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = benchmark.pedantic(model, (x,), rounds=5, warmup_rounds=1)
        torch.testing.assert_close(out, dense(x), rtol=1e-3, atol=1e-3)


GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not GPU, reason="2:4 semi-structured sparsity needs a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("method", ["semi-structured 2:4", "dense"])
def test_semi_structured_linear_gpu(benchmark, method):
    """GPT-2 small's MLP (768 -> 3072 -> 768), float16, 4096 tokens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).half().cuda()
    bipkernels.convert(model, structure="2:4")
    exported = bipkernels.export_semi_structured(model)[0] if method != "dense" else bipkernels.export_dense(model)
    x = torch.randn(4096, 768, dtype=torch.float16, device="cuda")
    benchmark.group = "export inference cuda GPT-2 mlp 2:4 fp16 4096 tokens"
    benchmark.extra_info["baseline"] = method == "dense"

    def run():
        out = exported(x)
        torch.cuda.synchronize()
        return out

    with torch.no_grad():
        benchmark.pedantic(run, rounds=20, warmup_rounds=3)
