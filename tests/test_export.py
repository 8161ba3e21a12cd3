"""Export: plain dense layers with the exact mask, torch.nn.utils.prune masks, physically smaller models
(structured masks), 2:4 semi-structured weights (CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

import bipkernels
from bipkernels import models

from conftest import HAS_CUDA_GPU


class Net(nn.Module):
    """Grouped convolution, batch norms, a flatten of a 2×2 map into a Linear layer: every layer kind."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 2 * 2, 8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.head(x.flatten(1))


def randomize(model: nn.Module) -> nn.Module:
    """Random batch-norm statistics and affine parameters (so a pruned filter's output is a nonzero
    constant) and random scores (so masks are not |θ|)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_()
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, bipkernels.MaskedConv2d | bipkernels.MaskedLinear):
                module.scores.uniform_()
    return model


@pytest.mark.parametrize("structure", ["unstructured", "filter", "channel", "2:4", "tile2x3"])
def test_export_dense_keeps_the_exact_mask_and_loads_into_the_plain_architecture(seed, structure):
    model = randomize(bipkernels.convert(Net().double(), 0.0, structure))
    bipkernels.project(model, 0.6, scope="layer")
    masks = bipkernels.masks(model)
    with torch.no_grad():  # non-finite pruned weights must still export as exact zeros (a select)
        model.head.weight[~model.head.mask()] = float("nan")
        model.conv1.weight[~model.conv1.mask()] = float("inf")
    weights = {name: layer.weight.detach().clone() for name, layer in bipkernels.masked_layers(model)}

    dense = bipkernels.export_dense(model)
    assert type(dense.conv1) is nn.Conv2d and type(dense.conv2) is nn.Conv2d and type(dense.head) is nn.Linear
    assert dense.conv2.groups == 2 and bipkernels.masked_layers(model)  # the model itself is untouched
    for name, mask in masks.items():
        weight = dense.get_submodule(name).weight
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
        assert torch.equal(weight[mask], weights[name][mask])

    fresh = Net().double()
    fresh.load_state_dict(dense.state_dict())  # strict: exactly the keys of the unconverted model
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    for mode in (True, False):
        for m in (model, dense, fresh):
            m.train(mode)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(dense(x), expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(fresh(x), expected, rtol=1e-12, atol=1e-12)


def test_export_dense_of_a_layer_and_of_a_plain_model():
    layer = bipkernels.MaskedLinear(6, 4)
    bipkernels.project(layer, 0.5)
    plain = bipkernels.export_dense(layer)
    assert type(plain) is nn.Linear and int((plain.weight != 0).sum()) == 12
    dense = nn.Sequential(nn.Linear(3, 3))
    copy = bipkernels.export_dense(dense)
    assert copy is not dense and torch.equal(copy[0].weight, dense[0].weight)


def test_prune_masks_are_the_exact_masks(seed):
    model = randomize(bipkernels.convert(Net(), 0.0, "filter"))
    bipkernels.project(model, 0.5)
    masks = bipkernels.masks(model)
    pruned = bipkernels.export_dense(model, prune_masks=True).eval()
    model.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
    for name, mask in masks.items():
        module = pruned.get_submodule(name)
        assert torch_prune.is_pruned(module) and torch.equal(module.weight_mask.bool(), mask)
        torch_prune.remove(module, "weight")
    Net().load_state_dict(pruned.state_dict())
    # On a plain model of the user's own: the same masks; a mask of the wrong shape is refused.
    plain = bipkernels.apply_prune_masks(bipkernels.export_dense(model), masks)
    assert torch.equal(plain.conv1.weight_mask.bool(), masks["conv1"])
    with pytest.raises(ValueError, match="conv2 has weight shape"):
        bipkernels.apply_prune_masks(Net(), {"conv2": masks["head"]})


# ----------------------------------------------------------------------------------------------- shrink


def _zero_rows_or_columns(model: nn.Module) -> set[str]:
    """Layers of a shrunk model that still hold an all-zero filter or input channel."""
    names = set()
    for name, module in model.named_modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            weight = module.weight.detach()
            rows = (weight.reshape(weight.shape[0], -1) == 0).all(1)
            columns = (weight.transpose(0, 1).reshape(weight.shape[1], -1) == 0).all(1)
            if rows.any() or (module.groups == 1 if isinstance(module, nn.Conv2d) else True) and columns.any():
                names.add(name)
    return names


def _weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Plain(nn.Module):
    """VGG-like: biased convolutions (a pruned filter outputs a nonzero constant even without batch norm),
    max pooling, dropout, and a flatten of a 2×2 map into the classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16 * 2 * 2, 20), nn.ReLU(), nn.Linear(20, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _torchvision(name, **kwargs):
    return lambda: getattr(pytest.importorskip("torchvision").models, name)(num_classes=10, **kwargs)


SHRINK_CASES = {  # (model, input shape, structure, dtype)
    "plain filter": (Plain, (2, 3, 4, 4), "filter", torch.float64),
    "plain channel": (Plain, (2, 3, 4, 4), "channel", torch.float64),
    "small resnet filter": (lambda: models.SmallResNet(10, 8, 3), (2, 3, 8, 8), "filter", torch.float64),
    "small resnet channel": (lambda: models.SmallResNet(10, 8, 3), (2, 3, 8, 8), "channel", torch.float64),
    "resnet18 filter": (_torchvision("resnet18"), (2, 3, 32, 32), "filter", torch.float32),
    # float32: CPU depthwise convolutions in float64 take a slow path (minutes).
    "mobilenet_v2 filter": (_torchvision("mobilenet_v2", width_mult=0.5), (2, 3, 32, 32), "filter", torch.float32),
    "mobilenet_v2 channel": (_torchvision("mobilenet_v2", width_mult=0.5), (2, 3, 32, 32), "channel", torch.float32),
}


@pytest.mark.parametrize("case", list(SHRINK_CASES))
def test_shrunk_model_equals_the_masked_model_and_reports_what_stays(seed, case):
    build, shape, structure, dtype = SHRINK_CASES[case]
    model = randomize(bipkernels.convert(build().to(dtype), 0.0, structure)).eval()
    bipkernels.project(model, 0.5, scope="layer")
    x = torch.randn(shape, dtype=dtype)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert type(small) is type(model) and not small.training
    assert _weights(small) < _weights(bipkernels.export_dense(model))
    assert set(report.shapes) and all(after < before for before, after in report.shapes.values())
    # Every zero filter or input channel left in the smaller model is listed, with a reason.
    assert _zero_rows_or_columns(small) <= set(report.kept)
    assert all(reason for reason in report.kept.values())
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    with torch.no_grad():
        for inputs in (x, torch.randn(shape, dtype=dtype) * 3):  # fresh inputs, not only the example
            torch.testing.assert_close(small(inputs), model(inputs), rtol=tolerance, atol=tolerance)


def test_residual_stream_shrinks_only_where_every_writer_prunes(seed):
    model = models.SmallResNet(10, 8, 3).double().eval()  # default batch norms: pruned outputs are 0
    with torch.no_grad():  # the first stream is written by stem.0 and layer1.conv2
        model.stem[0].weight[[1, 5, 6]] = 0
        model.layer1.conv2.weight[[1, 5]] = 0
        model.layer1.conv1.weight[[2, 4]] = 0  # inside the block: free to go
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # Channel 6 is constant (0) where layer1.conv1 reads it, but not after the residual add.
    with pytest.warns(UserWarning, match=r"stem\.0: 1 zero filter \(layer2\.conv1 reads it and it varies"):
        small, report = bipkernels.export_shrunk(model, x)
    assert small.stem[0].out_channels == 6 and small.stem[1].num_features == 6
    assert small.layer1.conv1.in_channels == 6 and small.layer1.conv1.out_channels == 6
    assert small.layer1.conv2.in_channels == 6 and small.layer1.conv2.out_channels == 6
    assert small.layer2.conv1.in_channels == 6 and small.layer2.shortcut[0].in_channels == 6
    assert small.layer2.conv1.out_channels == 16  # nothing pruned there
    assert set(report.kept) == {"stem.0"}
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)


class Returns(nn.Module):
    """Its first convolution's output is returned, its second's goes through an op shrinking does not
    know (a cat), its third's into a grouped convolution."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.conv2 = nn.Conv2d(3, 6, 1)
        self.conv3 = nn.Conv2d(12, 8, 1)
        self.grouped = nn.Conv2d(8, 4, 1, groups=2)

    def forward(self, x):
        a = self.conv1(x)
        return a, self.grouped(self.conv3(torch.cat([a, self.conv2(x)], 1)))


def test_shrink_keeps_and_names_what_it_cannot_remove(seed):
    model = bipkernels.convert(Returns(), 0.5, "filter", scope="layer")
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="zero filters or channels stay"):
        small, report = bipkernels.export_shrunk(model, x)
    assert report.shapes == {}
    assert "reaches the model output" in report.kept["conv1"]
    assert "cat" in report.kept["conv2"]
    assert "grouped (a grouped convolution) reads it" in report.kept["conv3"]
    assert "a grouped convolution): shrinking leaves it whole" in report.kept["grouped"]
    with torch.no_grad():
        for got, expected in zip(small(x), model(x)):
            torch.testing.assert_close(got, expected)
    assert "conv1: kept" in str(report)


class Entangled(nn.Module):
    """A layer called twice, two layers sharing a weight, a dropout that stays on in eval mode."""

    def __init__(self):
        super().__init__()
        self.stem, self.twice, self.a, self.b = (nn.Conv2d(3 if i == 0 else 4, 4, 1) for i in range(4))
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.twice(self.twice(F.dropout(self.stem(x), 0.0)))  # dropout: training=True by default
        return self.head(self.b(self.a(x)))


def test_shrink_leaves_entangled_layers_whole(seed):
    model = Entangled().eval()
    with torch.no_grad():  # a zero filter in every layer, plain model (export_shrunk takes one too)
        for module in (model.stem, model.twice, model.a, model.head):
            module.weight[0] = 0
    x = torch.randn(2, 3, 4, 4)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert report.shapes == {}
    assert "twice (called more than once)" in report.kept["twice"]
    assert "shares a parameter with another layer" in report.kept["a"]
    assert "dropout (an op shrinking does not handle) reads it" in report.kept["stem"]
    torch.testing.assert_close(small(x), model(x))


def test_shrink_refuses_an_untraceable_model():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx cannot trace Branching"):
        bipkernels.export_shrunk(Branching(), torch.randn(1, 3, 2, 2))


# -------------------------------------------------------------------------------------- semi-structured


def test_semi_structured_lists_every_layer_it_leaves_dense():
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(4, 4, 1))
    bipkernels.convert(model, structure="2:4")
    converted, left = bipkernels.export_semi_structured(model)
    assert set(left) == {"0", "1"}  # on the CPU torch refuses the Linear layer; a convolution never fits
    assert "CUDA" in left["0"] and "convolution" in left["1"]
    assert type(converted[0].weight) is nn.Parameter and not converted[0].weight.is_sparse
    unstructured = bipkernels.convert(nn.Sequential(nn.Linear(8, 8)), 0.5)
    assert "is not 2:4" in bipkernels.export_semi_structured(unstructured)[1]["0"]


@pytest.mark.skipif(not HAS_CUDA_GPU or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 semi-structured sparsity needs a CUDA GPU of compute capability 8.0+")
def test_semi_structured_linear_equals_dense_on_gpu(seed):
    from torch.sparse import SparseSemiStructuredTensor

    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda()
    bipkernels.convert(model, structure="2:4")
    dense = bipkernels.export_dense(model)
    sparse, left = bipkernels.export_semi_structured(model)
    assert left == {} and isinstance(sparse[0].weight, SparseSemiStructuredTensor)
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-2, atol=1e-2)
