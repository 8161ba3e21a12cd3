"""Model zoo: conversion and one fused BiP step on torchvision classifiers and on a transformer encoder,
at tiny sizes (32×32 images or 5 tokens, batch 2, random weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bipkernels


def _one_bip_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, sparsity: float) -> None:
    """One fused BiP step; checks the exact kept count before and after, the lower-level gradient masked
    by the mask of the forward, and a score step that can move the mask."""
    solver = bipkernels.BiP(model, sparsity, total_steps=10)
    layers = bipkernels.masked_layers(model)
    total = sum(layer.weight.numel() for _, layer in layers)
    kept = bipkernels.keep_count(total, sparsity)
    before = bipkernels.masks(model)
    scores_before = {name: layer.scores.detach().clone() for name, layer in layers}
    assert sum(int(mask.sum()) for mask in before.values()) == kept

    def closure():
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    loss = solver.step(closure)
    assert torch.isfinite(loss)
    for name, layer in layers:
        assert not layer.weight.grad[~before[name]].any(), name
    assert any(not torch.equal(layer.scores, scores_before[name]) for name, layer in layers)
    assert sum(int(mask.sum()) for mask in bipkernels.masks(model).values()) == kept


CNNS = ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn"]


@pytest.mark.parametrize("name", CNNS)
def test_torchvision_classifier_converts_and_takes_a_bip_step(seed, name, recwarn):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    layers = {n: (type(m), m.weight.shape, getattr(m, "groups", 1)) for n, m in model.named_modules()
              if type(m) in (nn.Conv2d, nn.Linear)}
    bipkernels.convert(model, 0.5)  # at 90% global a random MobileNetV2 loses whole 1×1 layers: no gradient
    assert not [w for w in recwarn if "left dense" in str(w.message)]
    assert bipkernels.unmasked_layers(model) == {}
    plain = {bipkernels.MaskedConv2d: nn.Conv2d, bipkernels.MaskedLinear: nn.Linear}
    converted = {n: (plain[type(m)], m.weight.shape, getattr(m, "groups", 1))
                 for n, m in bipkernels.masked_layers(model)}
    assert converted == layers  # every layer, its shape and its groups (MobileNetV2: depthwise)
    if name == "mobilenet_v2":
        assert any(groups == shape[0] > 1 and shape[1] == 1 for _, shape, groups in converted.values())
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _one_bip_step(model, x, y, 0.5)


class Encoder(nn.Module):
    """nn.TransformerEncoder (2 layers, batch first) and a linear classifier on the mean token."""

    def __init__(self, width: int = 16, classes: int = 4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_transformer_encoder_lists_attention_as_dense_and_takes_a_bip_step(seed):
    model = Encoder()
    attention = {f"encoder.layers.{i}.self_attn{part}": kind for i in range(2)
                 for part, kind in (("", "MultiheadAttention"), (".out_proj", "NonDynamicallyQuantizableLinear"))}
    with pytest.warns(UserWarning, match=r"left dense .*encoder\.layers\.1\.self_attn\.out_proj"):
        bipkernels.convert(model, 0.8)
    assert bipkernels.unmasked_layers(model) == attention
    assert [name for name, _ in bipkernels.masked_layers(model)] == [
        "encoder.layers.0.linear1", "encoder.layers.0.linear2", "encoder.layers.1.linear1",
        "encoder.layers.1.linear2", "head"]
    x = torch.randn(2, 5, 16)
    # In eval mode without grad the layer's fused fast path reads linear1/linear2.weight directly: the
    # masked model must still give the output of its dense export (zeros where pruned).
    model.eval()
    dense = bipkernels.export_dense(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x))
    torch.testing.assert_close(model(x), dense(x))
    model.train()
    in_proj = model.encoder.layers[0].self_attn.in_proj_weight
    _one_bip_step(model, x, torch.randint(0, 4, (2,)), 0.8)
    assert in_proj.grad is not None and in_proj.grad.any()  # attention trains, dense
