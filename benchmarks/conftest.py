"""Benchmark inputs with the sizes of real models (layer shapes from torchvision, built on the meta device)."""

from __future__ import annotations

import pytest
import torch


def resnet18_weight_shapes() -> list[tuple[int, ...]]:
    """Shapes of ResNet-18's prunable weights (20 convolutions + fc: 11.2M weights for 1000 classes)."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    """Shapes of ResNet-50's prunable weights (53 convolutions + fc: 25.5M weights)."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def gpt2_weight_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small's matrices: token and position embeddings, then per block the attention (qkv, output)
    and MLP (up, down) projections: 124M weights."""
    block = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    return [(50257, 768), (1024, 768)] + block * 12


MODEL_SHAPES = {"ResNet-18": resnet18_weight_shapes, "ResNet-50": resnet50_weight_shapes, "GPT-2": gpt2_weight_shapes}


def model_scores(model: str) -> list[torch.Tensor]:
    """|θ|-like scores with the layer shapes of ``model`` (a key of MODEL_SHAPES)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).abs() for shape in MODEL_SHAPES[model]()]


def scores_of_size(total: int) -> list[torch.Tensor]:
    """|θ|-like scores split like a model's layers: ResNet-18's shapes, scaled down for smaller totals."""
    shapes = resnet18_weight_shapes()
    sizes = [torch.Size(s).numel() for s in shapes]
    scale = total / sum(sizes)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(max(1, round(n * scale)), generator=generator).abs() for n in sizes]
