"""export_shrunk: physically smaller models that equal the masked ones, and reports of what stays."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bipkernels
from bipkernels import models

from conftest import randomize_masked

try:  # torchvision's stochastic depth, a leaf of the trace as in torchvision's own modules
    from torchvision.ops.stochastic_depth import stochastic_depth
    torch.fx.wrap("stochastic_depth")
except ImportError:
    stochastic_depth = None


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


class Tokens(nn.Module):
    """A transformer's MLP block on (batch, tokens, features): Linear layers on 3-D inputs, GELU, dropout,
    a residual add and a LayerNorm (an op shrinking does not handle: the stream it reads stays whole)."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(6, 12), nn.LayerNorm(12)
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(12, 24), nn.GELU(), nn.Dropout(0.1), nn.Linear(24, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))
        return self.head(x.mean(1))


class Means(nn.Module):
    """Heads that average with reductions rather than pooling modules: x.mean((2, 3)) of a convolution's
    output, and a sum over tokens of Linear layers on (B, H·W, 3) patches."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.head_a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)
        self.embed, self.mix, self.head_b = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        pooled = F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3))
        tokens = self.mix(F.gelu(self.embed(x.flatten(2).transpose(1, 2)))).sum(dim=1)
        return self.head_a(pooled) + self.head_b(tokens)


def _torchvision(name, **kwargs):
    return lambda: getattr(pytest.importorskip("torchvision").models, name)(num_classes=10, **kwargs)


class Joined(nn.Module):
    """Concatenations: of two biased branches behind batch norms, read by a zero-padded 3×3 convolution
    (the constants of pruned filters need a carrier in each segment), nested, and normalised after the
    join (DenseNet)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.mix, self.norm, self.head = nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(20), nn.Conv2d(20, 4, 3)

    def forward(self, x):
        joined = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(F.relu(self.norm(torch.cat([joined, self.mix(joined)], dim=1))))


def _vit():
    """torchvision's VisionTransformer, tiny: its MLP blocks are Linear layers on (B, tokens, features)."""
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    return vision_transformer.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=5)


SHRINK_CASES = {  # (model, input shape, structure, dtype)
    "plain filter": (Plain, (2, 3, 4, 4), "filter", torch.float64),
    "plain channel": (Plain, (2, 3, 4, 4), "channel", torch.float64),
    "small resnet filter": (lambda: models.SmallResNet(10, 8, 3), (2, 3, 8, 8), "filter", torch.float64),
    "small resnet channel": (lambda: models.SmallResNet(10, 8, 3), (2, 3, 8, 8), "channel", torch.float64),
    "resnet18 filter": (_torchvision("resnet18"), (2, 3, 32, 32), "filter", torch.float32),
    # float32: CPU depthwise convolutions in float64 take a slow path (minutes).
    "mobilenet_v2 filter": (_torchvision("mobilenet_v2", width_mult=0.5), (2, 3, 32, 32), "filter", torch.float32),
    "mobilenet_v2 channel": (_torchvision("mobilenet_v2", width_mult=0.5), (2, 3, 32, 32), "channel", torch.float32),
    "tokens filter": (Tokens, (2, 5, 6), "filter", torch.float64),
    "tokens channel": (Tokens, (2, 5, 6), "channel", torch.float64),
    "means filter": (Means, (2, 3, 4, 4), "filter", torch.float64),
    "vit filter": (_vit, (2, 3, 16, 16), "filter", torch.float64),
    "joined filter": (Joined, (2, 3, 5, 5), "filter", torch.float64),
    "joined channel": (Joined, (2, 3, 5, 5), "channel", torch.float64),
    "squeezenet1_1 filter": (_torchvision("squeezenet1_1"), (2, 3, 64, 64), "filter", torch.float32),
    "googlenet filter": (_torchvision("googlenet", aux_logits=False, init_weights=False), (2, 3, 64, 64), "filter",
                         torch.float32),
    "densenet121 filter": (_torchvision("densenet121"), (2, 3, 32, 32), "filter", torch.float32),
    # Squeeze-and-excitation blocks, and stochastic depth (EfficientNet) as the identity in eval mode.
    "mobilenet_v3_small filter": (_torchvision("mobilenet_v3_small"), (2, 3, 32, 32), "filter", torch.float32),
    "efficientnet_b0 filter": (_torchvision("efficientnet_b0"), (2, 3, 32, 32), "filter", torch.float32),
    # Grouped convolutions (ResNeXt-like blocks, group width 16).
    "regnet_x_400mf filter": (_torchvision("regnet_x_400mf"), (2, 3, 32, 32), "filter", torch.float32),
}


@pytest.mark.parametrize("case", list(SHRINK_CASES))
def test_shrunk_model_equals_the_masked_model_and_reports_what_stays(seed, case):
    build, shape, structure, dtype = SHRINK_CASES[case]
    model = randomize_masked(bipkernels.convert(build().to(dtype), 0.0, structure)).eval()
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


def test_shrink_repeats_until_no_filter_reads_only_removed_channels(seed):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 1, bias=False),
                          nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).double().eval()
    with torch.no_grad():  # channel 3 is 0; the second layer's filter 0 reads nothing else
        model[0].weight[3] = 0
        model[2].weight[0] = 0
        model[2].weight[0, 3] = 1.0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x)
    # Removing channel 3 leaves filter 0 at zero: a second round removes it and the last layer's column.
    assert report.shapes == {"0": ((4, 3, 3, 3), (3, 3, 3, 3)), "2": ((3, 4, 1, 1), (2, 3, 1, 1)),
                             "4": ((2, 3, 3, 3), (2, 2, 3, 3))}
    assert report.kept == {}
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)


def test_the_report_names_only_what_the_smaller_model_keeps(seed):
    """A carrier that the first round keeps goes in the second: the report is the last round's."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(3, 2, 1))
    model = model.double().eval()
    with torch.no_grad():  # channels 0, 1: constants 1 and 2 behind the zero padding of the 3×3 layer ...
        model[0].weight[:2] = 0
        model[0].bias[:2] = torch.tensor([1.0, 2.0])
        model[2].weight[1:, :2] = 0  # ... whose only filter that reads them, 0, is unread
        model[3].weight[:, 0] = 0
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x)
    # Round 1 keeps channel 1 to carry channel 0's constant into filter 0; round 2 removes both.
    assert report.shapes == {"0": ((4, 3, 1, 1), (2, 3, 1, 1)), "2": ((3, 4, 3, 3), (2, 2, 3, 3)),
                             "3": ((2, 3, 1, 1), (2, 2, 1, 1))}
    assert report.kept == {}
    _assert_same_outputs(small, model, x)


def test_zero_kernel_taps_are_not_zero_features(seed):
    """A convolution's kernel position that no filter uses is no removable feature (features are what a
    flatten makes of a channel): nothing to report."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).double().eval()
    with torch.no_grad():
        model[0].weight[:, 0, 1, 1] = 0
    _, report = bipkernels.export_shrunk(model, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert report.shapes == {} and report.kept == {}


class Returns(nn.Module):
    """Its first convolution's output is returned and also concatenated with its second's; the third
    reads the concatenation, and its channels are shuffled (ShuffleNet) into the last."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.conv2 = nn.Conv2d(3, 6, 1)
        self.conv3 = nn.Conv2d(12, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.conv1(x)
        mixed = self.conv3(torch.cat([a, self.conv2(x)], 1))
        return a, self.head(mixed.unflatten(1, (2, 4)).transpose(1, 2).flatten(1, 2))


def test_shrink_keeps_and_names_what_it_cannot_remove(seed):
    model = bipkernels.convert(Returns(), 0.5, "filter", scope="layer")
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="zero filters or channels stay"):
        small, report = bipkernels.export_shrunk(model, x)
    # conv2's half of the concatenation goes (its bias folds into conv3's), conv1's half stays.
    assert report.shapes == {"conv2": ((6, 3, 1, 1), (3, 3, 1, 1)), "conv3": ((8, 12, 1, 1), (8, 9, 1, 1))}
    assert "reaches the model output" in report.kept["conv1"]
    assert "unflatten (an op shrinking does not handle) reads it" in report.kept["conv3"]
    assert report.kept["head"] == "2 zero filters (it reaches the model output)"
    with torch.no_grad():
        for got, expected in zip(small(x), model(x)):
            torch.testing.assert_close(got, expected)
    assert "conv1: kept" in str(report)


class TwoNames(nn.Module):
    """A layer under two names (self.mid = self.body[1]); the forward calls it by one or the other."""

    def __init__(self, by_alias: bool):
        super().__init__()
        self.body = nn.ModuleList([nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)])
        self.mid, self.by_alias = self.body[1], by_alias

    def forward(self, x):
        x = torch.relu(self.body[0](x))
        x = torch.relu(self.mid(x) if self.by_alias else self.body[1](x))
        return self.body[2](x)


@pytest.mark.parametrize("by_alias", [False, True])
def test_a_layer_under_two_names_shrinks_under_both(seed, by_alias):
    """The trace names the layer once: the smaller layer goes in under each name (the other name kept
    the whole layer: a stale copy, or a shape error when the forward called it)."""
    model = randomize_masked(bipkernels.convert(TwoNames(by_alias), 0.0, "filter")).eval()
    bipkernels.project(model, 0.5, scope="layer")
    x = torch.randn(2, 3, 4, 4)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert small.mid is small.body[1] and small.mid.weight.shape == (4, 4, 1, 1)
    assert len(small.state_dict()) == len(bipkernels.export_dense(model).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_a_layer_with_hooks_stays_whole(seed):
    """A forward hook runs on the layer's output, which the trace does not show: shrinking it would break
    a hook that fits its channels (a per-channel scale)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    scale = torch.rand(8, 1, 1) + 0.5
    model[0].register_forward_hook(lambda module, args, output: output * scale)
    report = _report_of_nothing_shrinking(model, ["0"], torch.randn(2, 3, 4, 4))
    assert "0 (it has hooks)" in report.kept["0"]


class InPlaceThroughAlias(nn.Module):
    """An in-place ReLU behind an nn.Identity (a norm left out) rewrites the Identity's input itself,
    which conv3 also reads."""

    def __init__(self, alias: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.alias, self.act = alias, nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.conv1(x)
        return self.conv2(self.act(self.alias(a))) + self.conv3(a)


@pytest.mark.parametrize("alias", [nn.Identity(), nn.Dropout()])  # dropout: in eval mode
def test_an_in_place_op_behind_an_alias_keeps_what_it_overwrites(seed, alias):
    """conv3 reads conv1's output after the ReLU rewrote it (negative values 0): a pruned filter of conv1
    with bias -1 reads as 0 there, not -1, so it must not fold (a 0.7 difference, the guard's error)."""
    model = InPlaceThroughAlias(alias)
    with torch.no_grad():
        model.conv1.bias.fill_(-1.0)
    report = _report_of_nothing_shrinking(model, ["conv1"], torch.randn(2, 3, 4, 4))
    assert "it overwrites in place a tensor that other ops read" in report.kept["conv1"]


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


def _report_of_nothing_shrinking(model: nn.Module, layers: list[str], x: torch.Tensor) -> bipkernels.ShrinkReport:
    """export_shrunk's report on plain ``model`` (eval mode) with filter 0 of each of ``layers`` zeroed,
    after checking that nothing shrank and that the outputs are the same."""
    model.eval()
    with torch.no_grad():
        for name in layers:
            model.get_submodule(name).weight[0] = 0
        small, report = bipkernels.export_shrunk(model, x, warn=False)
        outputs = [small(x), model(x)]
    assert report.shapes == {}
    for got, expected in zip(*[o if isinstance(o, tuple) else (o,) for o in outputs], strict=True):
        torch.testing.assert_close(got, expected)
    return report


def test_shrink_leaves_entangled_layers_whole(seed):
    report = _report_of_nothing_shrinking(Entangled(), ["stem", "twice", "a", "head"], torch.randn(2, 3, 4, 4))
    assert "twice (called more than once)" in report.kept["twice"]
    assert "shares a parameter with another layer" in report.kept["a"]
    assert "dropout (an op shrinking does not handle) reads it" in report.kept["stem"]


class SharedStatistics(nn.Module):
    """One batch norm without affine parameters (its running statistics are its only state) normalising
    two branches whose zero filters differ."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)
        self.head_a, self.head_b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head_a(F.relu(self.norm(self.a(x)))) + self.head_b(F.relu(self.norm(self.b(x))))


def test_a_norm_called_twice_stays_whole_though_it_has_no_parameters(seed):
    """Its running statistics cannot be cut for each branch's channels (it raised: outputs differed)."""
    model = SharedStatistics().double().eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
        model.b.weight[1] = 0
    report = _report_of_nothing_shrinking(model, ["a"], torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert "norm (called more than once) reads it" in report.kept["a"]
    assert "norm (called more than once) reads it" in report.kept["b"]


_DROPS = {"dropout": lambda x: F.dropout(x, 0.5),
          "stochastic_depth": lambda x: stochastic_depth(x, 0.5, "row")}


class Noisy(nn.Module):
    """F.dropout(x, p) keeps dropping in eval mode (training=True by default), and so does torchvision's
    stochastic_depth called without its training argument: the forward draws numbers."""

    def __init__(self, drop: str = "dropout"):
        super().__init__()
        self.conv, self.head, self.drop = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), _DROPS[drop]

    def forward(self, x):
        return self.head(self.drop(F.relu(self.conv(x))))


def test_shrink_leaves_the_random_stream_of_a_forward_that_draws(seed):
    """Every run of the model inside export_shrunk draws from a forked stream (its first one did not)."""
    model, x = Noisy().eval(), torch.randn(2, 3, 4, 4)
    state = torch.get_rng_state()
    bipkernels.export_shrunk(model, x, warn=False)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("drop", list(_DROPS))
def test_a_dropout_that_drops_in_eval_mode_keeps_its_constants(seed, drop):
    """F.dropout(x, p) drops in eval mode too (training=True by default), and so does stochastic_depth: a
    pruned filter's constant behind it is no constant, and stays."""
    if stochastic_depth is None and drop == "stochastic_depth":
        pytest.skip("torchvision is not installed")
    model, x = Noisy(drop).double().eval(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        model.conv.weight[1] = 0
        model.conv.bias[1] = 1.0
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert report.shapes == {} and f"1 zero filter ({drop} (an op shrinking does not handle)" in report.kept["conv"]


_BORDERS = {"average of own values": lambda: [nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(4, 2, 1)],
            **{mode: lambda mode=mode: [nn.Conv2d(4, 2, 3, padding=1, padding_mode=mode)]
               for mode in ("reflect", "replicate", "circular")}}


@pytest.mark.parametrize("border", list(_BORDERS))
def test_a_constant_stays_constant_where_the_border_repeats_the_input(seed, border):
    """An AvgPool2d with padding and count_include_pad=False (it divides by the values it averages), or a
    convolution that pads with its input's own values, leaves a constant constant at the border: a pruned
    filter's constant folds into the next layer's bias, and no carrier stays."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), *_BORDERS[border]()).double().eval()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 1.0
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x)
    assert small[0].out_channels == small[-1].in_channels == 3 and not report.kept
    _assert_same_outputs(small, model, x)


def test_concatenated_channels_go_where_every_reader_lets_them(seed):
    model = randomize_masked(Joined().double()).eval()
    with torch.no_grad():
        for branch in (model.a, model.b):
            branch[0].bias.zero_()  # pruned filters output the batch norm's shift: positive after the ReLU
            branch[1].bias.uniform_(1.0, 2.0)
            branch[1].running_mean.zero_()
        model.a[0].weight[[0, 1, 4]] = 0  # constants meeting mix's zero padding: one stays to carry the others
        model.b[0].weight[3] = 0  # a lone constant: it stays as its own carrier
        model.mix.weight[[2, 5]] = 0  # read after the outer join only by head (no padding): folded into its bias
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert (small.a[0].out_channels, small.b[0].out_channels, small.mix.in_channels, small.mix.out_channels) == \
        (4, 6, 10, 6)
    assert (small.norm.num_features, small.head.in_channels) == (16, 16)
    assert "1 zero filter (it carries the constants of the removed channels into zero padding)" in report.kept["a.0"]
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 3, 7, 7, dtype=torch.float64) * 3):
            torch.testing.assert_close(small(inputs), model(inputs), rtol=1e-12, atol=1e-12)


class Grouped(nn.Module):
    """A ResNeXt bottleneck: 1×1 reduction, a zero-padded 3×3 convolution in 4 groups (2 input channels and
    3 filters each), 1×1 expansion."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12),
                                     nn.ReLU())
        self.expand = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.expand(self.grouped(self.reduce(x)))


class TwoSigns(nn.Module):
    """One activation read behind zero padding twice: through a ReLU, and negated through a ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.positive, self.negative = nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        hidden = self.conv(x)
        return self.positive(F.relu(hidden)) + self.negative(F.relu(hidden * -1.0))


def test_no_carrier_where_every_constant_is_zero_at_some_reader(seed):
    """Constants -1 and 2 are 0 and 2 behind one reader's padding, 1 and 0 behind the other's: no channel
    can carry the other's constant at both (its value would divide by 0), so both stay."""
    model = TwoSigns().double().eval()
    with torch.no_grad():
        model.conv.weight[:2] = 0
        model.conv.bias[:2] = torch.tensor([-1.0, 2.0])
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert report.shapes == {}
    assert report.kept == {"conv": "1 zero filter (its constant value meets the zero padding of negative), "
                                   "1 zero filter (its constant value meets the zero padding of positive)"}
    _assert_same_outputs(small, model, x)


def test_grouped_convolution_sheds_as_many_channels_in_each_group(seed):
    model = randomize_masked(Grouped().double()).eval()
    with torch.no_grad():
        model.reduce[0].weight[:2] = model.reduce[0].bias[:2] = model.reduce[1].running_mean[:2] = 0
        model.reduce[1].bias[:2] = torch.tensor([-1.0, 1.0])  # channel 0: 0 after the ReLU; channel 1: 1
        weight = model.grouped[0].weight  # (12, 2, 3, 3): group g has filters 3g..3g+2, channels 2g, 2g+1
        weight[:, 0] = 0  # every group's first channel (0, 2, 4, 6) unread
        weight[[0, 3]] = 0  # two constant filters, which the 1×1 expansion folds into its bias
        model.expand.weight[:, [6, 9, 10]] = 0  # unread filters: the last group would keep only 11
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning) as warned:
        small, report = bipkernels.export_shrunk(model, x)
    # Input channels: 0 is zero and 2, 4, 6 unread; 1 is a nonzero constant that would meet the zero
    # padding, which a grouped convolution cannot move to a carrier, so it stays: one channel per group.
    assert small.reduce[0].out_channels == small.grouped[0].in_channels == 4 and small.grouped[0].groups == 4
    # Filters: 1, 2 | 4, 5 | 7, 8 | 9, 11 stay (9 kept to even out the last group).
    assert small.grouped[0].out_channels == small.grouped[1].num_features == small.expand.in_channels == 8
    # The lowest-numbered removable filter of the short group stays (9, not 10), with each group's channel 1.
    assert torch.equal(small.grouped[0].weight, model.grouped[0].weight[[1, 2, 4, 5, 7, 8, 9, 11]][:, 1:])
    assert "grouped.0, a grouped convolution" in report.kept["reduce.0"]
    assert "1 zero input channel (grouped.0 keeps as many channels in each of its groups)" in report.kept["expand"]
    assert set(report.kept) == {"reduce.0", "expand"} and len(warned) == 1
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 6, 7, 4, dtype=torch.float64)):
            torch.testing.assert_close(small(inputs), model(inputs), rtol=1e-12, atol=1e-12)


def _assert_same_outputs(small: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """The shrunk model gives the masked model's outputs (float64, eval mode) on ``x`` and on a fresh input."""
    with torch.no_grad():
        for inputs in (x, torch.randn(3, x.shape[1], 7, 4, dtype=torch.float64)):
            torch.testing.assert_close(small(inputs), model(inputs), rtol=1e-12, atol=1e-12)


def test_a_grouped_convolution_loses_a_group_whose_filters_and_input_channels_all_go(seed):
    model = randomize_masked(Grouped().double()).eval()
    with torch.no_grad():
        model.grouped[0].weight[3:6] = 0  # group 1: filters 3-5 (constants after the batch norm), channels 2, 3
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x)
    assert small.grouped[0].groups == 3 and small.grouped[0].weight.shape == (9, 2, 3, 3)
    assert small.reduce[0].out_channels == small.reduce[1].num_features == small.grouped[0].in_channels == 6
    assert small.grouped[1].num_features == small.expand.in_channels == 9
    assert _weights(small) == _weights(model) - 2 * (6 + 1 + 2) - 3 * 2 * 9 - 3 * 2 - 3 * 5
    assert not report.kept
    _assert_same_outputs(small, model, x)


class GroupedWithShortcut(Grouped):
    """Grouped, and a 1×1 shortcut that also reads the grouped convolution's input channels."""

    def __init__(self):
        super().__init__()
        self.shortcut = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        hidden = self.reduce(x)
        return self.expand(self.grouped(hidden)) + self.shortcut(hidden)


def test_a_group_whose_input_channels_another_layer_reads_stays(seed):
    model = randomize_masked(GroupedWithShortcut().double()).eval()
    with torch.no_grad():
        model.grouped[0].weight[3:6] = 0  # group 1's filters; the shortcut still reads its channels 2, 3
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="its group 1 cannot go whole, some of its input channels stay"):
        small, report = bipkernels.export_shrunk(model, x)
    assert small.grouped[0].groups == 4 and small.grouped[0].weight.shape == (12, 2, 3, 3)
    assert report.kept == {"grouped.0": "3 zero filters (grouped.0 keeps as many channels in each of its groups; "
                                        "its group 1 cannot go whole, some of its input channels stay), "
                                        "2 zero input channels (shortcut reads it and it varies with the input)"}
    _assert_same_outputs(small, model, x)


def test_groups_that_cannot_go_whole_from_either_side_stay(seed):
    """Group 1 could lose its input channels but not its filters, group 3 its filters but not its input
    channels (the shortcut reads them): a group stays where either side keeps something, so both stay."""
    model = randomize_masked(GroupedWithShortcut().double()).eval()
    with torch.no_grad():
        model.reduce[0].weight[2:4] = model.reduce[0].bias[2:4] = model.reduce[1].running_mean[2:4] = 0
        model.reduce[1].bias[2:4] = -1.0  # channels 2, 3 (group 1's input channels): 0 after the ReLU
        model.grouped[0].weight[9:] = 0  # group 3's filters
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert small.grouped[0].groups == 4 and small.grouped[0].weight.shape == (12, 2, 3, 3) and report.shapes == {}
    assert "its group 1 cannot go whole, some of its filters stay" in report.kept["reduce.0"]
    assert "its group 3 cannot go whole, some of its input channels stay" in report.kept["grouped.0"]
    _assert_same_outputs(small, model, x)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_a_depthwise_convolution_loses_the_groups_of_its_pruned_channels(seed, multiplier):
    """groups == input channels: a group is one input channel and its ``multiplier`` filters (with 1, a
    channel of its space that goes with the 1×1 convolution's filter 2 that writes it)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4 * multiplier, 3, padding=1, groups=4), nn.BatchNorm2d(4 * multiplier),
                          nn.ReLU(), nn.Conv2d(4 * multiplier, 5, 1))
    model = randomize_masked(model.double()).eval()
    with torch.no_grad():
        model[0].weight[2] = model[0].bias[2] = model[1].running_mean[2] = model[1].bias[2] = 0  # a zero channel
        model[3].weight[2 * multiplier:3 * multiplier] = 0  # and the filters of group 2, which reads it
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x)
    assert small[3].groups == small[3].in_channels == 3 and small[3].out_channels == 3 * multiplier
    assert small[0].out_channels == 3 and small[6].in_channels == 3 * multiplier and not report.kept
    _assert_same_outputs(small, model, x)


def test_a_fully_pruned_grouped_convolution_keeps_one_group_of_one_channel(seed):
    """As a layer with every filter pruned keeps one (the other groups go whole, their input channels too)."""
    model = randomize_masked(Grouped().double()).eval()
    with torch.no_grad():
        model.grouped[0].weight.zero_()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="every channel could go, and a layer keeps one"):
        small, report = bipkernels.export_shrunk(model, x)
    assert small.grouped[0].groups == 1 and small.grouped[0].weight.shape == (1, 1, 3, 3)
    assert small.reduce[0].out_channels == small.expand.in_channels == 1
    assert "1 zero filter (every channel could go, and a layer keeps one)" in report.kept["grouped.0"]
    _assert_same_outputs(small, model, x)


class Skip(nn.Module):
    """A U-Net skip: an upsampled deep feature joined with a shallow one (numpy-style axis=), scaled."""

    def __init__(self):
        super().__init__()
        self.shallow, self.deep, self.fuse = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3, 2, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        skip = F.relu(self.shallow(x))
        up = F.interpolate(self.deep(skip), scale_factor=2.0)
        return self.fuse(torch.concatenate([up, skip], axis=1) * 0.5)


class Squeezed(nn.Module):
    """An EfficientNet block: squeeze-and-excitation (a (B, 12, 1, 1) scale multiplies the depthwise output
    channel for channel), then stochastic depth (the identity in eval mode) on the residual branch."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12),
                                       nn.ReLU())
        self.fc1, self.fc2, self.project = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1), nn.Conv2d(12, 6, 1)
        self.shortcut, self.head = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)
        self.drop = __import__("torchvision.ops").ops.StochasticDepth(0.5, "row")  # fx sees one call in it

    def forward(self, x):
        hidden = self.depthwise(self.expand(x))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(hidden, 1)))))
        return self.head(self.drop(self.project(scale * hidden)) + self.shortcut(x))


def test_squeeze_excitation_sheds_channels_its_product_leaves_constant(seed):
    pytest.importorskip("torchvision.ops")
    model = randomize_masked(Squeezed().double()).eval()
    with torch.no_grad():
        model.depthwise[0].weight[:3] = 0  # channels 0-2 leave the depthwise convolution constant:
        model.depthwise[1].running_mean[:3] = 0
        model.depthwise[1].bias[:3] = torch.tensor([-1.0, 1.0, 1.0])  # 0 after the ReLU, then 1 and 1
        model.fc2.weight[2] = 0  # channel 2's scale is constant too, channel 1's varies
        model.fc1.weight[:, 3] = 0  # channel 3 varies but nothing reads it
        model.project.weight[:, 3] = 0
        model.project.weight[5] = model.shortcut.weight[5] = 0  # the stream's channel 5: a constant
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    # Channel 0 is 0 times a scale, channel 2 a constant times a constant: both fold away; channel 1, a
    # constant times a varying scale, reaches the projection and stays.
    with pytest.warns(UserWarning, match=r"depthwise\.0: 1 zero filter \(project reads it and it varies"):
        small, report = bipkernels.export_shrunk(model, x)
    assert small.expand[0].out_channels == small.depthwise[0].groups == small.depthwise[1].num_features == 9
    assert small.fc1.in_channels == small.fc2.out_channels == small.project.in_channels == 9
    assert small.project.out_channels == small.shortcut.out_channels == small.head.in_channels == 5
    assert set(report.kept) == {"depthwise.0"}
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 4, 7, 7, dtype=torch.float64)):
            torch.testing.assert_close(small(inputs), model(inputs), rtol=1e-12, atol=1e-12)


def test_skip_concatenation_sheds_the_skip_channels(seed):
    model = Skip().double().eval()
    with torch.no_grad():
        model.shallow.bias.uniform_(1.0, 2.0)  # pruned filters: positive constants after the ReLU
        model.shallow.weight[[1, 4]] = 0  # constants meeting deep's zero padding: one carries the other
        model.deep.weight[0] = 0  # upsampled by an op shrinking does not handle: it stays
    small, report = bipkernels.export_shrunk(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), warn=False)
    assert (small.shallow.out_channels, small.deep.in_channels, small.fuse.in_channels) == (5, 5, 9)
    assert "interpolate (an op shrinking does not handle) reads it" in report.kept["deep"]
    with torch.no_grad():
        for size in (8, 12):
            x = torch.randn(2, 3, size, size, dtype=torch.float64)
            torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)


def test_token_mlp_sheds_its_hidden_features(seed):
    model = Tokens().double().eval()
    with torch.no_grad():
        model.fc1.weight[[0, 3, 7]] = 0  # pruned hidden features: constants GELU(bias), folded into fc2's bias
        model.fc2.weight[:, [3, 7, 9]] = 0  # hidden features fc2 does not read
        model.fc2.weight[2] = 0  # a filter writing the residual stream, which reaches the LayerNorm
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"fc2: 1 zero filter \(.*norm \(an op shrinking does not handle\) reads"):
        small, report = bipkernels.export_shrunk(model, x)
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features) == (20, 20, 12)
    assert report.shapes == {"fc1": ((24, 12), (20, 12)), "fc2": ((12, 24), (12, 20))}
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)


class Layouts(nn.Module):
    """Channels in dim 1 meeting channels in the last dim: a Linear layer over a convolution's width, a
    convolution over a Linear layer's 4-D output, the product of the two layouts, and a mean over a
    convolution's channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.width = nn.Conv2d(3, 4, 1), nn.Linear(4, 4)
        self.tokens, self.after = nn.Linear(3, 4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.conv(x)  # (B, 4, 4, 4), channels in dim 1
        c = self.tokens(x.permute(0, 2, 3, 1))  # (B, 4, 4, 4), channels in the last dim
        return self.width(a), self.after(F.relu(c)), a * c, a.mean(1)


def test_shrink_keeps_channels_where_layouts_meet(seed):
    report = _report_of_nothing_shrinking(Layouts(), ["conv", "width", "tokens", "after"], torch.randn(2, 3, 4, 4))
    assert "width (it reads the last dim of a tensor whose channels lie in dim 1) reads it" in report.kept["conv"]
    assert "mean (an op shrinking does not handle) reads it" in report.kept["conv"]
    assert "after (its input's channels lie in the last dim) reads it" in report.kept["tokens"]
    assert "mul (an op shrinking does not handle) reads it" in report.kept["tokens"]
    assert "shrinking leaves it whole" in report.kept["width"] and "shrinking leaves it whole" in report.kept["after"]


class Pitfalls(nn.Module):
    """Where a zero filter must stay: its constant summed over tokens (T times the constant, T set by the
    input; by x.sum and by torch.sum), a 2-D pool over a 3-D tensor (read as one unbatched sample, pooling
    dim 1), a PReLU and a softmax stored under the names of channel-wise ops, a weight also read directly,
    an average over border windows by a fixed divisor, and an in-place ReLU on a tensor another layer read
    before it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.conv, self.pool, self.fc3 = nn.Conv2d(4, 6, 1), nn.MaxPool2d((3, 1), 1, (1, 0)), nn.Linear(6, 3)
        self.conv2, self.relu, self.fc4 = nn.Conv2d(4, 6, 1), nn.PReLU(6), nn.Conv2d(6, 3, 1)
        self.fc5, self.sigmoid, self.fc6 = nn.Linear(4, 6), nn.Softmax(-1), nn.Linear(6, 3)
        self.fc7, self.fc8 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.conv3, self.pool3, self.head3 = nn.Conv2d(4, 6, 1), nn.AvgPool2d(3, 1, 1, divisor_override=4), \
            nn.Conv2d(6, 3, 1)
        self.conv4, self.head4, self.head5 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1), nn.Conv2d(6, 3, 1)
        self.fc9, self.fc10 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):  # x: (B, T, 4)
        image = x.transpose(1, 2)[..., None]  # (B, 4, T, 1)
        return (self.fc2(F.gelu(self.fc1(x)).sum(1)),
                self.fc3(self.pool(F.relu(self.conv(image)).mean(-1)).mean(-1)),
                self.fc4(self.relu(self.conv2(image))),
                self.fc6(self.sigmoid(self.fc5(x))),
                self.fc8(F.relu(self.fc7(x))) + F.linear(x, self.fc7.weight)[..., :3],
                self.head3(self.pool3(F.relu(self.conv3(image)))),
                self._in_place(image),
                self.fc10(torch.sum(F.gelu(self.fc9(x)), dim=1)))  # the function, as fc2's sum is the method

    def _in_place(self, image):
        features = self.conv4(image)
        before = self.head4(features)
        F.relu(features, inplace=True)
        return before + self.head5(features)


def test_shrink_keeps_what_only_looks_removable(seed):
    model = Pitfalls().double().eval()
    with torch.no_grad():
        nn.init.uniform_(model.relu.weight, -1, 1)
        model.conv3.bias.uniform_(1.0, 2.0)  # a zero constant would average to zero (and could go)
        for layer in (model.fc1, model.conv, model.conv2, model.fc5, model.fc7, model.conv3, model.conv4, model.fc9):
            layer.weight[[0, 2]] = 0
    small, report = bipkernels.export_shrunk(model, torch.randn(2, 5, 4, dtype=torch.float64), warn=False)
    assert report.shapes == {}
    assert "its weights are also read directly" in report.kept["fc7"]
    assert _zero_rows_or_columns(small) <= set(report.kept)
    with torch.no_grad():
        for tokens in (5, 9):  # the example's length and another
            x = torch.randn(2, tokens, 4, dtype=torch.float64)
            for got, expected in zip(small(x), model(x), strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class Opaque(nn.Module):
    """Layers shrinking cannot see into: an nn.TransformerEncoder (torch.fx calls torch.nn's modules
    whole) and a Linear layer whose weight is used directly (its name begins with the encoder's, yet it
    is not inside it)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                             enable_nested_tensor=False)
        self.encoder_side = nn.Linear(8, 8)

    def forward(self, x):
        return self.encoder(x) + F.linear(x, self.encoder_side.weight)


def test_shrink_names_the_layers_it_cannot_see(seed):
    with pytest.warns(UserWarning, match="left dense"):  # attention's own projections
        model = bipkernels.convert(Opaque(), 0.0, "filter", exclude="encoder_side").eval()
    bipkernels.project(model, 0.5, scope="layer")
    with torch.no_grad():
        model.encoder_side.weight[0] = 0  # plain: its weight is used directly, as the forward does
        model.encoder_side.weight[:, 2] = 0
    x = torch.randn(2, 3, 8)
    with pytest.warns(UserWarning, match=r"encoder\.layers\.0\.linear1: 8 zero filters \(inside encoder, which"):
        small, report = bipkernels.export_shrunk(model, x)
    assert report.shapes == {}
    assert report.kept["encoder.layers.0.linear2"].startswith("4 zero filters (inside encoder")
    assert report.kept["encoder_side"] == "1 zero filter, 1 zero input channel (not called as a module in the " \
                                          "traced forward: shrinking leaves it whole)"
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0] = 0
    assert "the model itself" in bipkernels.export_shrunk(layer, torch.randn(2, 3), warn=False)[1].kept[""]
    unbatched = bipkernels.export_shrunk(nn.Sequential(layer), torch.randn(3), warn=False)[1]
    assert "its output has fewer than 2 dims" in unbatched.kept["0"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_shrink_refuses_an_untraceable_model():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="bipkernels.export_shrunk: torch.fx cannot trace Branching"):
        bipkernels.export_shrunk(Branching(), torch.randn(1, 3, 2, 2))


class Aliased(nn.Module):
    """An SE scale applied in place to a tensor that a second name still reads: torch.fx records
    ``hidden *= scale`` as a new tensor, so its trace reads the unscaled values through ``skip``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.fc1, self.fc2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.conv2, self.conv3 = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        hidden = F.relu(self.conv1(x))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(hidden, 1)))))
        skip = hidden
        hidden *= scale
        return self.conv2(hidden) + self.conv3(skip)


def test_shrink_refuses_a_trace_that_differs_from_the_forward(seed):
    model = Aliased().double().eval()
    with torch.no_grad():  # a constant channel 0 that only the aliased read sees scaled
        model.conv1.weight[0], model.conv1.bias[0], model.conv2.weight[:, 0] = 0, 1, 0
    with pytest.raises(ValueError, match=r"bipkernels.export_shrunk: torch.fx's trace of Aliased computes .*x \*= y"):
        bipkernels.export_shrunk(model, torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_shrink_checks_its_result_against_the_model(seed, monkeypatch):
    """A broken rule (here: zero padding ignored, so constants fold into biases where they stop at the
    border) is caught by comparing the outputs, not returned."""
    model = randomize_masked(models.SmallResNet(10, 8, 3).double()).eval()
    with torch.no_grad():  # three constant channels of 1 into layer1.conv2's zero padding
        model.layer1.conv1.weight[:3] = model.layer1.bn1.running_mean[:3] = 0
        model.layer1.bn1.bias[:3] = 1
    monkeypatch.setattr("bipkernels.export.shrink.pads_with_zeros", lambda module: False)
    with pytest.raises(RuntimeError, match="bipkernels.export_shrunk: the smaller SmallResNet gives other outputs"):
        bipkernels.export_shrunk(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), warn=False)


def _shrink_with_a_broken_norm(spoil) -> None:
    """export_shrunk of Conv2d(1, 2) → BatchNorm2d → Conv2d(2, 1) (float64; filter 1 is the constant 0.5,
    which folds into the last layer's bias; outputs in [-0.5, 1.5]) with ``spoil(norm)`` applied in place
    to the shrunk batch norm: the guard that compares the outputs sees what it did."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
        model[0].bias.copy_(torch.tensor([0.0, 0.5]))
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    shrunk_norm = bipkernels.export.shrink._shrunk_norm

    def spoiled(norm, index):
        new = shrunk_norm(norm, index)
        with torch.no_grad():
            spoil(new)
        return new

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bipkernels.export.shrink._shrunk_norm", spoiled)
        bipkernels.export_shrunk(model, torch.linspace(-1, 1, 16, dtype=torch.float64).view(1, 1, 4, 4), warn=False)


def test_shrink_checks_its_result_to_rounding():
    """The guard's bound is 2·√eps relative (3e-8 in float64): a shrunk batch norm whose shift is off by
    1e-6 (outputs off by 4e-7 relative to 1 + their largest, 1.5) is caught; off by 1e-10 (4e-11), which
    is rounding for the bound, it passes."""
    with pytest.raises(RuntimeError, match=r"the smaller Sequential gives other outputs .* difference 4e-07\)"):
        _shrink_with_a_broken_norm(lambda norm: norm.bias.add_(1e-6))
    _shrink_with_a_broken_norm(lambda norm: norm.bias.add_(1e-10))


def test_shrink_checks_where_its_result_is_nan():
    """NaN outputs where the model's are finite are an infinite difference (a NaN difference compares
    below every bound)."""
    with pytest.raises(RuntimeError, match=r"the smaller Sequential gives other outputs .* difference inf\)"):
        _shrink_with_a_broken_norm(lambda norm: norm.running_var.fill_(-1.0))


def test_shrink_of_a_product_of_flattened_features(seed):
    """A flattened map (a channel per 9 features) times a Linear layer's output (a channel per feature):
    their channels differ in size, so the product keeps every feature (it used to crash)."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.head = nn.Linear(18, 18), nn.Linear(18, 4)

        def forward(self, x):
            features = x.flatten(1)
            return self.head(features * self.gate(features))

    model = Gated().double()
    with torch.no_grad():
        model.gate.weight[:3] = 0
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"gate: 3 zero filters \(mul \(an op shrinking does not handle\) reads it\)"):
        small, report = bipkernels.export_shrunk(model, x)
    assert report.shapes == {}
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


def test_a_shrunk_batch_norm_keeps_its_settings(seed):
    """eps, momentum, affine and track_running_stats stay: train-mode fine-tuning updates the running
    statistics as the model's own batch norm does."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = randomize_masked(model.double()).eval()
    with torch.no_grad():
        model[0].weight[1] = 0
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    small, _ = bipkernels.export_shrunk(model, x)
    assert small[1].num_features == 3
    assert (small[1].eps, small[1].momentum, small[1].affine, small[1].track_running_stats) == (1e-3, 0.3, True, True)
    _assert_same_outputs(small, model, x)


def test_batch_norm_on_flattened_features_carries_no_constant(seed):
    """BatchNorm1d over a flattened map gives each of a channel's features its own affine map: a pruned
    filter's constant is no longer one value per channel, so it cannot fold into the next bias (this
    used to fold the first feature's value for all of them: a wrong model, or the guard's error)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[2].running_mean.normal_()
        model[2].weight.normal_()
        model[2].bias.normal_()
    model.eval()
    small, _ = bipkernels.export_shrunk(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), warn=False)
    x = torch.randn(200, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)


def test_batch_norm_on_flattened_features_loses_the_features_of_a_removed_channel(seed):
    """The Linear layer reads none of channel 1's features (a 2×2 map flattened: features 4 to 7), so the
    channel goes from the convolution, and those four features from the BatchNorm1d between them."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        model[4].weight[:, 4:8] = 0
        for statistic in (model[2].running_mean, model[2].weight, model[2].bias):
            statistic.normal_()
        model[2].running_var.uniform_(0.5, 2.0)
    model.eval()
    small, report = bipkernels.export_shrunk(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), warn=False)
    assert report.shapes == {"0": ((4, 3, 3, 3), (3, 3, 3, 3)), "2": ((16,), (12,)), "4": ((5, 16), (5, 12))}
    kept = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15])
    torch.testing.assert_close(small[2].running_mean, model[2].running_mean[kept], rtol=0, atol=0)
    x = torch.randn(200, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x), rtol=1e-12, atol=1e-12)


class NotChannelWise(nn.Module):
    """Ops that look channel-wise but are not: an in-place method on a tensor a later layer reads (its
    scaled values, not the recorded ones), a mean over the batch (dim 1 of its (C, H, W) output is
    the height: flattened, each row is a channel), a concatenation along the height (channels line up,
    but it is no join of channels), a spatial gate ((B, 1, H, W), broadcast over the channels) and
    another layer's output plus a concatenation (a joined space stays apart)."""

    def __init__(self):
        super().__init__()
        self.scaled, self.before, self.after = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)
        self.batch, self.rows = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(16, 2)
        self.top, self.bottom, self.stacked = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.features, self.gate, self.gated = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 1, 1), nn.Conv2d(4, 2, 1)
        self.left, self.right, self.other = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.summed = nn.Conv2d(4, 2, 1)

    def forward(self, x):  # x: (B, 3, 4, 4)
        hidden = self.scaled(x)
        before = self.before(hidden)
        hidden.mul_(2)
        features = self.features(x)
        return (before + self.after(hidden),
                self.rows(torch.flatten(self.batch(x).mean(0), 1)),
                self.stacked(torch.cat([self.top(x), self.bottom(x)], 2)),
                self.gated(features * torch.sigmoid(self.gate(features))),
                self.summed(self.other(x) + torch.cat([self.left(x), self.right(x)], 1)))


def test_shrink_keeps_what_ops_that_are_not_channel_wise_read(seed):
    model = NotChannelWise().double()
    with torch.no_grad():
        model.scaled.bias.uniform_(1.0, 2.0)  # a nonzero constant, which the in-place product doubles
    report = _report_of_nothing_shrinking(model, ["scaled", "batch", "top", "features", "left", "other"],
                                          torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert "it overwrites in place a tensor that other ops read" in report.kept["scaled"]
    assert "mean (an op shrinking does not handle) reads it" in report.kept["batch"]
    assert "cat (an op shrinking does not handle) reads it" in report.kept["top"]
    assert "mul (an op shrinking does not handle) reads it" in report.kept["features"]
    assert "add (it joins a concatenation with another space) reads it" in report.kept["left"]


class SequenceNorm(nn.Module):
    """A convolution's output averaged over its width, (B, C, H), through BatchNorm1d (channels in dim 1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.norm(self.conv(x).mean(-1))).mean(-1))


def test_batch_norm_on_a_sequence_sheds_channels(seed):
    """BatchNorm1d on (B, C, L) is channel-wise as on (B, C): a pruned filter's constant goes through it
    into the head's bias, and the channel goes from the norm too."""
    model = SequenceNorm().double().eval()
    with torch.no_grad():
        model.conv.weight[1] = 0
        for statistic in (model.norm.running_mean, model.norm.weight, model.norm.bias):
            statistic.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    small, report = bipkernels.export_shrunk(model, x, warn=False)
    assert report.shapes == {"conv": ((4, 3, 1, 1), (3, 3, 1, 1)), "norm": ((4,), (3,)), "head": ((2, 4), (2, 3))}
    _assert_same_outputs(small, model, x)


def test_shrink_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"export_shrunk: 0.weight is on the meta device"):
        bipkernels.export_shrunk(model, torch.randn(1, 3, 5, 5))


class EncodedTokens(nn.Module):
    """Patches through an nn.TransformerEncoder (torch.fx calls it whole), averaged over the tokens."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, 4)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 32, batch_first=True), 1,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def test_a_reduction_behind_a_module_called_whole_says_why_it_keeps_channels(seed):
    """The head's zero input channels stay: the mean over dim 1 of the encoder's output could be over tokens
    or over channels, as no op before it shows where the channels lie. The report said "an op shrinking does
    not handle", though means over tokens shrink elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention's own projections stay dense
        model = bipkernels.convert(EncodedTokens(), 0.5, "channel", scope="layer").eval()
    _, report = bipkernels.export_shrunk(model, torch.randn(2, 3, 16, 16), warn=False)
    assert "mean (a reduction of a tensor whose channel dim no op before it shows" in report.kept["head"], report.kept


def test_example_inputs_of_another_type_are_named_in_short():
    """A dict of inputs is refused naming its type, with a short repr: the message held every value of
    every tensor."""
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of the forward's arguments, "
                                        r"got dict \{'x': tensor") as raised:
        bipkernels.export_shrunk(nn.Linear(3, 3), {"x": torch.randn(1000, 3)})
    assert len(str(raised.value)) < 200
