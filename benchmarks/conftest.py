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


def scores_of_size(total: int) -> list[torch.Tensor]:
    """|θ|-like scores split like a model's layers: ResNet-18's shapes, scaled down for smaller totals."""
    shapes = resnet18_weight_shapes()
    sizes = [torch.Size(s).numel() for s in shapes]
    scale = total / sum(sizes)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(max(1, round(n * scale)), generator=generator).abs() for n in sizes]
