"""Masked layers, the fused backward, convert / project / sparsity / masks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bipkernels
from bipkernels import autograd, reference
from bipkernels.nn import keep_all_threshold
from bipkernels.structures import parse_structure

from conftest import check_channels_last_conv_equals_torchs, force_backend, half_threshold, tied_scores

CONV_ARGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1, dilation=1, bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=3, kernel_size=1, padding="same", padding_mode="circular"),
]


@pytest.mark.parametrize("kwargs", CONV_ARGS)
def test_conv_keep_all_equals_dense_and_loads_plain_state(seed, kwargs):
    dense = nn.Conv2d(**kwargs, dtype=torch.float64)
    masked = bipkernels.MaskedConv2d(**kwargs, dtype=torch.float64)
    masked.load_state_dict(dense.state_dict())
    x = torch.randn(2, kwargs["in_channels"], 9, 7, dtype=torch.float64)
    assert torch.equal(masked(x), dense(x))
    assert torch.equal(masked.scores, dense.weight.abs())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("structure", ["unstructured", "filter", "tile2x2"])
def test_a_channels_last_conv_equals_torchs_bit_for_bit(monkeypatch, seed, backend, structure):
    force_backend(monkeypatch, backend)
    check_channels_last_conv_equals_torchs(structure)


def test_vmap_over_stacked_channels_last_conv_weights_equals_each_layer(seed):
    """An ensemble of channels_last MaskedConv2d run as one torch.func.vmap over their stacked parameters (
    stack_module_state) equals each layer run alone: a batched weight cannot say whether it is channels_last
    (functorch raises NYI for that query), so the layout of θ ⊙ m is left to the op's result there."""
    layers = [bipkernels.convert(nn.Conv2d(3, 4, 3, dtype=torch.float64), 0.5).to(memory_format=torch.channels_last)
              for _ in range(3)]
    params, buffers = torch.func.stack_module_state(layers)
    assert params["weight"][0].is_contiguous(memory_format=torch.channels_last)
    assert not params["weight"][0].is_contiguous()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch's "no batching rule" performance warning
        ensemble = torch.vmap(lambda p, b: torch.func.functional_call(layers[0], {**p, **b}, (x,)))(params, buffers)
    for index, layer in enumerate(layers):
        torch.testing.assert_close(ensemble[index], layer(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_keep_all_equals_dense_and_loads_plain_state(seed, bias):
    dense = nn.Linear(7, 5, bias=bias)
    masked = bipkernels.MaskedLinear(7, 5, bias=bias)
    masked.load_state_dict(dense.state_dict())
    x = torch.randn(3, 4, 7)
    assert torch.equal(masked(x), dense(x))
    # And the masked layer's own state round-trips, threshold and structure included.
    masked = bipkernels.MaskedLinear(7, 5, bias=bias, structure="filter")
    again = bipkernels.MaskedLinear(7, 5, bias=bias)
    masked.threshold.copy_(torch.tensor([0.3, 2.0], dtype=torch.float64))
    again.load_state_dict(masked.state_dict())
    assert again.structure == masked.structure
    assert torch.equal(again.threshold, masked.threshold) and torch.equal(again.mask(), masked.mask())


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 4), lambda: nn.Conv2d(1, 2, 3)])
def test_an_input_that_is_no_tensor_is_torchs_type_error_as_for_the_plain_layer(seed, make):
    """A masked layer raises the plain layer's TypeError for a list (MaskedLinear raised AttributeError:
    'list' object has no attribute 'dtype', from the check for the fused matmul)."""
    plain = make()
    masked = bipkernels.convert(copy.deepcopy(plain), 0.5)
    for layer in (plain, masked):
        with pytest.raises(TypeError, match="must be Tensor, not list|invalid combination of arguments") as raised:
            layer([[0.5, 1.0, 2.0]] * 3)
        assert "list" in str(raised.value)


def test_a_masked_state_without_scores_or_with_integer_scores_does_not_load(seed):
    """Only a state with neither scores nor threshold is a plain layer's (scores |θ|, keep-all): a masked
    layer's state that lacks its scores is missing a key (its threshold cut trained scores, not |θ|, and
    would keep another count), and integer scores are an error naming the key before any of the layer
    is copied."""
    trained = bipkernels.MaskedLinear(16, 8)
    with torch.no_grad():
        trained.scores.add_(1.0)
    bipkernels.project(trained, 0.5)
    state = trained.state_dict()
    del state["scores"]
    fresh = bipkernels.MaskedLinear(16, 8)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"scores\""):
        fresh.load_state_dict(state)
    state = trained.state_dict()
    state["scores"] = torch.ones(8, 16, dtype=torch.int64)
    weight = fresh.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"\"scores\", MaskedLinear's scores must be float32.*got torch.int64"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, weight)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_scores_set_of_a_non_float_dtype_name_the_layer(seed, dtype):
    """Integer scores set on a layer failed only in its forward, from inside block_mask or masked_weight,
    naming the op and not the layer: the assignment is the error now, naming the layer, scores and the
    dtype, and it leaves the layer's scores as they were. Float scores still set and run."""
    for layer in (bipkernels.MaskedLinear(7, 5), bipkernels.MaskedConv2d(3, 4, 3)):
        scores = layer.scores
        with pytest.raises(TypeError, match=rf"{type(layer).__name__}: scores must be float32, float64, float16 or "
                                            rf"bfloat16, got {dtype}"):
            layer.scores = nn.Parameter(torch.randint(0, 2, layer.weight.shape).to(dtype), requires_grad=False)
        assert layer.scores is scores
        for value in (3, [0.5, 1.0]):  # no tensor: nn.Module's TypeError naming scores, not an AttributeError
            with pytest.raises(TypeError, match=r"cannot assign '(int|list)' as parameter 'scores'"):
                layer.scores = value
        assert layer.scores is scores
        layer.scores = nn.Parameter(torch.rand(layer.weight.shape))
        x = torch.randn(2, 7) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5)
        torch.testing.assert_close(layer(x), layer._conv_forward(x, layer.weight, layer.bias)
                                   if isinstance(layer, nn.Conv2d) else F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("structure", ["unstructured", "filter", "tile2x3"])
@pytest.mark.parametrize("absent", ["scores", "threshold"])
def test_scores_or_threshold_alone_do_not_load_also_without_strict(seed, structure, absent):
    """strict=False kept the layer's own other half: a trained threshold over the layer's scores (or trained
    scores under the layer's threshold) made a mask of another count, with no error. Either alone is an
    error naming both keys, strict or not, before any of the layer is copied; N:M layers, whose mask
    needs no threshold, load their scores alone."""
    trained = nn.Sequential(bipkernels.MaskedLinear(16, 8, structure=structure))
    with torch.no_grad():
        trained[0].scores.copy_(torch.rand(8, 16))
    bipkernels.project(trained, 0.5)
    state = trained.state_dict()
    del state[f"0.{absent}"]
    present = "threshold" if absent == "scores" else "scores"
    fresh = nn.Sequential(bipkernels.MaskedLinear(16, 8, structure=structure))
    bipkernels.project(fresh, 0.25)
    before = copy.deepcopy(fresh.state_dict())
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=f"While loading \"0.{present}\" without \"0.{absent}\""):
            fresh.load_state_dict(state, strict=strict)
        assert all(torch.equal(fresh.state_dict()[name], value) for name, value in before.items()
                   if isinstance(value, torch.Tensor))
    n_of_m = bipkernels.MaskedLinear(16, 8, structure="2:4")
    with torch.no_grad():
        n_of_m.scores.copy_(torch.rand(8, 16))
    state = n_of_m.state_dict()
    del state["threshold"]
    loaded = bipkernels.MaskedLinear(16, 8, structure="2:4")
    loaded.load_state_dict(state, strict=False)
    assert torch.equal(loaded.mask(), n_of_m.mask())


@pytest.mark.parametrize("structure", ["unstructured", "filter", "channel", "2:4", "tile2x3"])
@pytest.mark.parametrize("implicit", ["paper", "released"])
def test_fused_backward_equals_autograd_through_the_reference(seed, structure, implicit):
    layer = bipkernels.MaskedConv2d(4, 6, 3, padding=1, dtype=torch.float64, structure=structure)
    with torch.no_grad():
        layer.scores.copy_(tied_scores(layer.scores.shape))  # signed: the mask ranks |s|
        layer.scores[layer.scores == 0] = 0.5  # |s|'s derivative, which autograd takes as 0 at 0, is +1 here
    bipkernels.project(layer, 0.6)
    layer.inv_gamma, layer.implicit = 0.37, implicit
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    target = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    F.mse_loss(layer(x), target).backward()

    # The same loss through the reference mask with a straight-through estimator for |s|, which the mask ranks
    # (the released code's autograd through popup_scores.abs()).
    weight = layer.weight.detach().clone().requires_grad_()
    scores = layer.scores.detach().clone().requires_grad_()
    parsed = parse_structure(structure)
    mask = reference.block_mask(scores.detach(), layer.threshold, parsed).to(torch.float64)
    effective = weight * (mask + scores.abs() - scores.abs().detach())
    effective.retain_grad()
    F.mse_loss(F.conv2d(x, effective, layer.bias, padding=1), target).backward()
    g = effective.grad
    implicit_term = (weight.detach() * g) ** 2 if implicit == "released" else mask * g * g
    torch.testing.assert_close(layer.weight.grad, mask * g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(layer.scores.grad, scores.grad - 0.37 * implicit_term * scores.detach().sign(),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("make, input_shape", [
    (lambda: bipkernels.MaskedConv2d(4, 6, 3, padding=1, dtype=torch.float64), (2, 4, 5, 5)),
    (lambda: bipkernels.MaskedLinear(7, 5, dtype=torch.float64), (3, 2, 7)),  # saves a view of θ ⊙ m
])
def test_forward_keeps_no_masked_weight_and_the_backward_recomputes_it(monkeypatch, seed, make, input_shape):
    """θ ⊙ m is not kept from the forward to the backward (one weight-sized tensor per layer less); the
    gradients from the recomputed one equal autograd through the reference; an in-place change of a
    source in between is refused, as autograd refuses it for a saved tensor."""
    import weakref

    layer = make()
    bipkernels.project(layer, 0.5)
    layer.inv_gamma = 0.3
    produced = []
    masked_weight = autograd.masked_weight
    monkeypatch.setattr(autograd, "masked_weight",
                        lambda *inputs: produced.append(weakref.ref(result := masked_weight(*inputs))) or result)
    x = torch.randn(*input_shape, dtype=torch.float64, requires_grad=True)
    loss = layer(x).square().sum()
    assert produced[0]() is None  # freed after the forward, although the graph is alive
    loss.backward()

    weight = layer.weight.detach().clone().requires_grad_()
    mask = layer.mask().to(torch.float64)
    x_again = x.detach().clone().requires_grad_()
    function = layer._conv_forward if isinstance(layer, nn.Conv2d) else F.linear
    effective = weight * mask
    effective.retain_grad()
    function(x_again, effective, layer.bias).square().sum().backward()
    g = effective.grad
    torch.testing.assert_close(x.grad, x_again.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(layer.weight.grad, mask * g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(layer.scores.grad, weight.detach() * g - 0.3 * mask * g * g, rtol=1e-12, atol=1e-15)

    loss = layer(x).square().sum()
    with torch.no_grad():
        layer.scores.mul_(2.0)
    with pytest.raises(RuntimeError, match="Masked.*changed in place between the forward and the backward"):
        loss.backward()


def test_callers_saved_tensor_hooks_and_sparse_inputs_keep_autograds_default(seed):
    """Under the caller's own saved-tensor hooks (here offloading) the layer leaves saving to them, so
    they see every saved tensor, the layer's input included; a sparse input has no storage to compare."""
    layer = bipkernels.MaskedLinear(6, 4, dtype=torch.float64)
    bipkernels.project(layer, 0.5)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    packed = []

    def pack(tensor):
        packed.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    assert any(tensor is x for tensor in packed)
    want = layer.weight.grad.clone()
    layer.weight.grad = None
    layer(x.detach().to_sparse()).sum().backward()
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=0)


def test_a_forward_with_saved_tensor_hooks_disabled_runs_as_a_plain_layers(seed):
    """Where the caller turned saved-tensor hooks off, the layer saves as autograd does by default (its
    own hooks would raise the caller's message) and gives the same gradients."""
    layer = bipkernels.MaskedLinear(6, 4, dtype=torch.float64)
    bipkernels.project(layer, 0.5)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer(x).sin().sum().backward()
    want = layer.weight.grad.clone()
    layer.weight.grad = None
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        loss = layer(x).sin().sum()
    loss.backward()
    torch.testing.assert_close(layer.weight.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("make, input_shape", [
    (lambda: bipkernels.MaskedLinear(6, 4, dtype=torch.float64, structure="filter"), (6,)),
    (lambda: bipkernels.MaskedConv2d(2, 4, 3, dtype=torch.float64, structure="2:2"), (2, 5, 5)),
])
def test_torch_func_grad_and_per_sample_vmap_equal_the_backward(seed, make, input_shape):
    """torch.func.grad of a functional call equals loss.backward(), and vmap(grad) over the batch equals
    one backward per example, implicit term (quadratic in the gradient) included."""
    layer = make()
    with torch.no_grad():
        layer.scores.copy_(tied_scores(layer.scores.shape).abs())
    bipkernels.project(layer, 0.5)
    layer.inv_gamma = 0.3
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    inputs = torch.randn(3, *input_shape, dtype=torch.float64)

    def loss(params, inputs):
        return torch.func.functional_call(layer, {**params, **buffers}, (inputs,)).sin().sum()

    def backward(inputs):
        layer.zero_grad()
        loss(params, inputs).backward()
        return {name: param.grad.clone() for name, param in params.items()}

    assert_close = torch.testing.assert_close
    for name, grad in torch.func.grad(loss)(params, inputs).items():
        assert_close(grad, backward(inputs)[name], rtol=1e-12, atol=1e-15)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, inputs[:, None])
    for index in range(len(inputs)):
        expected = backward(inputs[index:index + 1])
        for name, grad in per_example.items():
            assert_close(grad[index], expected[name], rtol=1e-12, atol=1e-15)


def test_gradcheck_weight_path(seed):
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(5, 4, dtype=torch.float64)
    threshold = reference.topk_threshold([scores], 9)[0]
    structure = parse_structure("unstructured")
    assert torch.autograd.gradcheck(lambda w: autograd.masked_weight(w, scores, threshold, structure), (weight,))
    # Second input: the bias-free linear layer end to end.
    layer = bipkernels.MaskedLinear(4, 3, bias=False, dtype=torch.float64)
    bipkernels.project(layer, 0.5)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("structure", ["unstructured", "filter", "channel", "tile3x3"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_convert_prunes_exactly(seed, structure, scope):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    weights = [m.weight.detach().clone() for m in model if hasattr(m, "weight")]
    bipkernels.convert(model, sparsity=0.8, structure=structure, scope=scope)
    layers = [layer for _, layer in bipkernels.masked_layers(model)]
    assert [type(layer) for layer in layers] == [bipkernels.MaskedConv2d, bipkernels.MaskedConv2d,
                                                 bipkernels.MaskedLinear]
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, weights))
    parsed = parse_structure(structure)
    block_counts = [layer.block_scores().numel() for layer in layers]
    kept_flags = [reference.kept_blocks(layer.block_scores(), layer.threshold) for layer in layers]
    kept_blocks = [int(flags.sum()) for flags in kept_flags]
    if scope == "global":
        assert sum(kept_blocks) == bipkernels.keep_count(sum(block_counts), 0.8)
        kept = torch.cat([layer.block_scores().reshape(-1)[flags] for layer, flags in zip(layers, kept_flags)])
        pruned = torch.cat([layer.block_scores().reshape(-1)[~flags] for layer, flags in zip(layers, kept_flags)])
        assert kept.min() >= pruned.max()
    else:
        assert kept_blocks == [bipkernels.keep_count(n, 0.8) for n in block_counts]
    if parsed.kind == "unstructured" and scope == "global":
        total = sum(w.numel() for w in weights)
        assert bipkernels.sparsity(model) == pytest.approx(1 - bipkernels.keep_count(total, 0.8) / total)
    masks = bipkernels.masks(model)
    assert list(masks) == ["0", "2", "4"] and all(m.dtype == torch.bool for m in masks.values())
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    out.sum().backward()
    for layer in layers:  # the lower-level gradient is masked: zero wherever the weight is pruned
        assert torch.equal(layer.weight.grad[~layer.mask()], torch.zeros_like(layer.weight.grad[~layer.mask()]))
        assert layer.scores.grad is not None


@pytest.mark.parametrize("structure", ["filter", "channel", "tile2x2"])
def test_weightless_layers_take_no_part_in_the_global_projection(seed, structure):
    """Linear(8, 0) has eight empty channels and Linear(0, 4) four empty filters: counted as blocks they
    made the global projection keep fewer real blocks than k (filter at 50% kept 75% of the weights)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(4, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bipkernels.convert(model, 0.5, structure)
    # Nor is a weightless layer reported as emptied. (A real one can be: layer 3's filters of 4 weights rank
    # below layer 0's of 8 more often than not, and then none of them may stay.)
    messages = [str(w.message) for w in caught if "bipkernels" in str(w.message)]
    emptied = [name for message in messages if "keeps no block of " in message
               for name in message.split("keeps no block of ")[1].split(":")[0].split(", ")]
    assert len(emptied) == len(messages) and set(emptied) <= {"3"}, messages
    real = [model[0], model[3]]
    blocks = sum(layer.block_scores().numel() for layer in real)
    assert sum(int(reference.kept_blocks(layer.block_scores(), layer.threshold).sum()) for layer in real) == \
        bipkernels.keep_count(blocks, 0.5)
    model(torch.randn(3, 8)).sum().backward()


def test_convert_nm_and_exclude_and_skipped_layers(seed):
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(2, 2, 3), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"left dense.*1 \(Conv1d\)"):
        bipkernels.convert(model, structure="2:4", exclude=("2",))
    assert isinstance(model[0], bipkernels.MaskedLinear) and type(model[2]) is nn.Linear
    assert int(model[0].mask().sum()) == 32


def test_convert_keeps_device_dtype_mode_and_threshold_stays_float64():
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.float64)).eval()
    bipkernels.convert(model, sparsity=0.5)
    layer = model[0]
    assert layer.weight.dtype == torch.float64 and not layer.training
    threshold = layer.threshold.clone()
    model.float()
    assert layer.weight.dtype == torch.float32 and layer.scores.dtype == torch.float32
    assert layer.threshold.dtype == torch.float64 and torch.equal(layer.threshold, threshold)
    assert int(layer.mask().sum()) == 8


def test_moves_reach_the_threshold_without_reading_the_weight():
    """share_memory shares the threshold as any buffer (it was left out, so a worker's projection was lost);
    a move takes the scores' device, not the weight's: torch.nn.utils.prune's weight is a plain attribute
    that stays behind, and a parametrized weight ran its parametrization (a power iteration) on .to()."""
    layer = bipkernels.convert(nn.Linear(8, 8), 0.5)
    layer.share_memory()
    assert layer.scores.is_shared() and layer.threshold.is_shared()
    torch.nn.utils.prune.l1_unstructured(layer, "weight", 0.3)
    layer.to("meta")
    assert layer.threshold.device.type == "meta" and layer.threshold.dtype == torch.float64
    normed = bipkernels.convert(nn.Linear(8, 8), 0.5)
    torch.nn.utils.parametrizations.spectral_norm(normed)
    vector = normed.parametrizations.weight[0]._u.clone()
    normed.to("cpu")
    assert torch.equal(normed.parametrizations.weight[0]._u, vector)
    assert bipkernels.unmasked_layers(nn.Sequential(normed)) == {}  # the parametrization's child is masked
    normed.adapter = nn.Linear(8, 8)  # but a layer of its own inside a masked one is dense, and listed
    assert bipkernels.unmasked_layers(nn.Sequential(normed)) == {"0.adapter": "Linear"}


def test_project_refuses_scores_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    bipkernels.convert(model)
    with pytest.raises(ValueError, match=r"bipkernels.project: the scores of 0, 1 are on the meta device"):
        bipkernels.project(model, 0.9)


def test_freeze_masks_keeps_the_sparsity_through_fine_tuning(seed):
    """An optimiser over model.parameters() trains the scores too, under fixed thresholds: 50 Adam steps
    took a model pruned to 90% to about 55%. Frozen, the masks stay (and weight decay leaves them)."""
    model = bipkernels.convert(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)), 0.9)
    masks = bipkernels.masks(model)
    assert bipkernels.freeze_masks(model) is model
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    for _ in range(20):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    assert all(torch.equal(mask, masks[name]) for name, mask in bipkernels.masks(model).items())
    assert all(layer.scores.grad is None for _, layer in bipkernels.masked_layers(model))


@pytest.mark.parametrize("make", [lambda linear: bipkernels.convert(linear, 0.9),
                                  lambda linear: bipkernels.MaskedLinear(16, 32)])
def test_a_masked_linear_put_into_a_transformer_layer_keeps_its_mask_on_the_fast_path(seed, make):
    """A TransformerEncoderLayer in eval mode without gradients hands linear1.weight (θ) to one fused
    kernel unless a submodule has a hook: a MaskedLinear assigned by hand (a bare layer's convert, or one
    built directly) ran unmasked there, while convert of the parent hooked its twins only."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    layer.linear1 = make(layer.linear1)
    bipkernels.project(layer, 0.9)
    layer.eval()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x), rtol=1e-5, atol=1e-5)


def _reference_top_mask(scores: torch.Tensor, k: int, structure: str) -> torch.Tensor:
    """The mask of the top ``k`` blocks of ``scores`` by the reference alone: the layer's mask comes from the
    default backend's kernels, which an expectation from bipkernels.topk_masks would share."""
    parsed = parse_structure(structure)
    threshold = reference.topk_threshold([reference.block_scores(scores, parsed)], k)[0]
    return reference.block_mask(scores, threshold, parsed)


@pytest.mark.parametrize("structure", ["unstructured", "filter", "tile2x2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_change_keeps_each_layers_kept_count(seed, structure, dtype):
    """.half() / .to(bfloat16) of a pruned model rounds its scores across the threshold (thousands of
    float32 scores share one bfloat16 value), and .double() of a structured one ranks float64 block sums
    against a threshold that is a float32 sum: each layer still keeps as many blocks as before, the top
    ones of its new scores (ties to the lowest index). So does loading a float32 state into a half model."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    bipkernels.convert(model, 0.9, structure=structure)
    kept = {name: int(reference.kept_blocks(layer.block_scores(), layer.threshold).sum())
            for name, layer in bipkernels.masked_layers(model)}
    state = copy.deepcopy(model.state_dict())
    for moved_to in (torch.float64, dtype):
        model.to(moved_to)
        for name, layer in bipkernels.masked_layers(model):
            assert layer.scores.dtype == moved_to and layer.threshold.dtype == torch.float64
            assert torch.equal(layer.mask(), _reference_top_mask(layer.scores, kept[name], structure)), (name, moved_to)
    # A float32 state loaded into the model in ``dtype`` is rounded the same way.
    loaded = bipkernels.convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype), 0.0)
    loaded.load_state_dict(state)
    for name, layer in bipkernels.masked_layers(loaded):
        assert torch.equal(layer.mask(), _reference_top_mask(layer.scores, kept[name], structure)), name


def test_torchvision_resnet18_converts_and_trains(seed):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    bipkernels.convert(model, sparsity=0.9)
    assert len(bipkernels.masked_layers(model)) == 21  # 20 convolutions and the fc layer
    assert bipkernels.sparsity(model) == pytest.approx(0.9, abs=1e-6)
    out = model(torch.randn(2, 3, 32, 32))
    out.logsumexp(1).sum().backward()
    assert model.conv1.scores.grad is not None
    assert not model.fc.weight.grad[~model.fc.mask()].any()


def test_project_rejects_bad_arguments():
    model = nn.Sequential(bipkernels.MaskedLinear(3, 3))
    with pytest.raises(ValueError, match="scope must be one of"):
        bipkernels.project(model, 0.5, scope="everywhere")
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        bipkernels.project(model, 1.5)
    with pytest.raises(ValueError, match="not a multiple of M = 4"):
        bipkernels.MaskedLinear(6, 3, structure="2:4")
    complex_model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"bipkernels.convert: layer '1' \(Linear\) has weights of dtype "
                                        r"torch.complex64; .* exclude it"):
        bipkernels.convert(complex_model, 0.5)
    assert type(complex_model[0]) is nn.Linear


@pytest.mark.parametrize("make, input_shape", [
    (lambda: bipkernels.MaskedConv2d(3, 4, 3, dtype=torch.float64), (3, 5, 5)),
    (lambda: bipkernels.MaskedLinear(6, 4, dtype=torch.float64, structure="filter"), (6,)),
])
def test_a_functional_call_backward_uses_the_tensors_it_was_given(seed, make, input_shape):
    """functional_call swaps other weights and scores in for the forward only (MAML's fast weights, EMA
    weights): the backward recomputes θ ⊙ m from those, not from the layer's own (it used the layer's)."""
    layer = make()
    params = {name: torch.randn_like(value) for name, value in layer.named_parameters()}
    threshold = bipkernels.topk_threshold([bipkernels.block_scores(params["scores"], layer.structure)], 2)[0]
    inputs = torch.randn(2, *input_shape, dtype=torch.float64, requires_grad=True)
    params = {name: value.requires_grad_() for name, value in params.items()}
    torch.func.functional_call(layer, {**params, "threshold": threshold}, (inputs,)).sin().sum().backward()
    expected_inputs = inputs.detach().clone().requires_grad_()
    expected_weight = params["weight"].detach().clone().requires_grad_()
    masked = torch.where(bipkernels.block_mask(params["scores"], threshold, layer.structure), expected_weight, 0.0)
    forward = F.conv2d if isinstance(layer, nn.Conv2d) else F.linear
    forward(expected_inputs, masked, params["bias"].detach()).sin().sum().backward()
    torch.testing.assert_close(inputs.grad, expected_inputs.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(params["weight"].grad, expected_weight.grad, rtol=1e-12, atol=1e-14)
    assert layer.weight.grad is None and layer.scores.grad is None


def test_reset_parameters_restarts_the_scores_and_threshold(seed):
    """Deferred initialisation (meta, to_empty, reset_parameters) gives a layer as a new one starts:
    scores |θ| and keep-all (the scores held whatever to_empty's memory held)."""
    for layer in (bipkernels.MaskedLinear(16, 8, device="meta"), bipkernels.MaskedConv2d(3, 4, 3, device="meta")):
        layer.to_empty(device="cpu")
        layer.reset_parameters()
        assert torch.equal(layer.scores, layer.weight.abs()) and torch.equal(layer.threshold, keep_all_threshold())
        bipkernels.project(layer, 0.5)
        weight = layer.weight.clone()
        layer.reset_parameters()
        assert not torch.equal(layer.weight, weight) and layer.mask().all()


def test_a_negative_score_moves_its_magnitude_the_way_the_loss_asks():
    """The mask ranks |s|: where the loss wants every weight smaller (∂l/∂m = θ ⊙ g = 1 > 0), one SGD step
    shrinks every |s|, the negative score's too (without sign(s) it grew: kept against the gradient)."""
    layer = bipkernels.MaskedLinear(3, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.scores.copy_(torch.tensor([[-0.5, 0.6, 0.4]], dtype=torch.float64))
    layer(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    torch.optim.SGD([layer.scores], lr=0.1).step()
    torch.testing.assert_close(layer.scores.detach().abs(), torch.tensor([[0.4, 0.5, 0.3]], dtype=torch.float64))


SECOND_ORDER_LAYERS = [
    (lambda: bipkernels.MaskedLinear(5, 4, dtype=torch.float64), (5,), F.linear),
    (lambda: bipkernels.MaskedConv2d(2, 4, 3, padding=1, dtype=torch.float64, structure="filter"), (2, 4, 4),
     lambda layer: layer._conv_forward),
]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("make, input_shape, plain", SECOND_ORDER_LAYERS)
def test_second_derivatives_equal_the_plain_layers_with_the_mask_applied(monkeypatch, seed, backend, make,
                                                                         input_shape, plain):
    """A Hessian and a mixed second derivative through a masked layer equal those of the plain layer on
    θ ⊙ m (the mask fixed), instead of zeros: autograd differentiates the backward again."""
    force_backend(monkeypatch, backend)
    layer = make()
    bipkernels.project(layer, 0.5)
    mask = layer.mask().to(torch.float64)
    function = plain if plain is F.linear else plain(layer)
    x = torch.randn(2, *input_shape, dtype=torch.float64)
    weight = layer.weight.detach().clone()

    def masked_loss(w):
        return torch.func.functional_call(layer, {"weight": w}, (x,)).pow(2).sum()

    def plain_loss(w):
        return function(x, w * mask, layer.bias.detach()).pow(2).sum()

    hessian = torch.autograd.functional.hessian
    torch.testing.assert_close(hessian(masked_loss, weight), hessian(plain_loss, weight), rtol=1e-12, atol=1e-12)
    assert hessian(plain_loss, weight).abs().sum() > 0

    def input_grad_of_weight_grad_norm(forward, w):
        inputs = x.clone().requires_grad_()
        (grad_weight,) = torch.autograd.grad(forward(inputs, w).sum(), w, create_graph=True)
        return torch.autograd.grad(grad_weight.pow(2).sum(), inputs)[0]

    masked_input_grad = input_grad_of_weight_grad_norm(
        lambda inputs, w: torch.func.functional_call(layer, {"weight": w}, (inputs,)), weight.clone().requires_grad_())
    plain_input_grad = input_grad_of_weight_grad_norm(
        lambda inputs, w: function(inputs, w * mask, layer.bias.detach()), weight.clone().requires_grad_())
    torch.testing.assert_close(masked_input_grad, plain_input_grad, rtol=1e-12, atol=1e-12)


def test_first_order_torch_func_grad_keeps_the_fused_backward(monkeypatch, seed):
    """torch.func.grad runs every backward with grad on: the layers still take the fused kernels there (the
    unfused, differentiable backward is for torch.autograd's create_graph alone, and twice as slow)."""
    layer = bipkernels.MaskedLinear(6, 4, dtype=torch.float64)
    bipkernels.project(layer, 0.5)
    params = dict(layer.named_parameters())
    inputs = torch.randn(3, 6, dtype=torch.float64)

    def unfused(*args):
        raise AssertionError("the unfused backward ran")

    monkeypatch.setattr(reference, "hypergrad_of_mask", unfused)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (inputs,)).sin().sum())(params)
    layer(inputs).sin().sum().backward()
    for name, param in params.items():
        torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="the unfused backward ran"):
        torch.autograd.grad(layer(inputs).sum(), layer.weight, create_graph=True)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("implicit", ["paper", "released"])
@pytest.mark.parametrize("structure", ["unstructured", "channel", "2:4"])
def test_the_score_gradient_differentiates_in_the_weight(monkeypatch, seed, backend, implicit, structure):
    """For l = Σ c ⊙ z² with z = m ⊙ θ: g = 2 c m θ, and the score gradient sign(s) ⊙ (θ g − γ I) has the
    weight derivative (contracted with v) sign(s) ⊙ v ⊙ m ⊙ (4cθ − 8γc²θ) (paper, I = m g²) or
    (4cθ − 16γc²θ³) (released, I = (θ g)²): closed forms, not a second run of the same code."""
    force_backend(monkeypatch, backend)
    parsed = parse_structure(structure)
    shape = (4, 8, 3, 3)
    theta = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    threshold = half_threshold(scores.detach(), parsed)
    c, v = torch.rand(shape, dtype=torch.float64) + 0.5, torch.randn(shape, dtype=torch.float64)
    inv_gamma = 0.3
    z = autograd.masked_weight(theta, scores, threshold, parsed, inv_gamma, implicit)
    (grad_scores,) = torch.autograd.grad((c * z * z).sum(), scores, create_graph=True)
    (second,) = torch.autograd.grad((grad_scores * v).sum(), theta)
    m = reference.block_mask(scores.detach(), threshold, parsed).to(torch.float64)
    t = theta.detach()
    sign = torch.where(scores.detach() < 0, -1.0, 1.0).to(torch.float64)
    implicit_part = 8 * inv_gamma * c * c * t if implicit == "paper" else 16 * inv_gamma * c * c * t ** 3
    torch.testing.assert_close(second, sign * v * m * (4 * c * t - implicit_part), rtol=1e-12, atol=1e-12)
    assert m.any() and not m.all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("p", [1, 2])
def test_block_scores_differentiate_twice(monkeypatch, seed, backend, p):
    """The block scores' Hessian: 0 for p = 1 (piecewise linear), 2 on the diagonal for p = 2, on every
    backend (the compiled ops' derivative is built on the scores under create_graph)."""
    force_backend(monkeypatch, backend)
    scores = torch.randn(3, 4, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda s: bipkernels.block_scores(s, "filter", p=p).sum(), scores)
    expected = torch.eye(12, dtype=torch.float64) * (2.0 if p == 2 else 0.0)
    torch.testing.assert_close(hessian.reshape(12, 12), expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: bipkernels.MaskedLinear(7, 5), lambda: bipkernels.MaskedConv2d(3, 4, 3)])
def test_a_new_masked_layer_ranks_its_weights_magnitudes(seed, make):
    """A masked layer built directly starts with scores |θ|, as convert's: projected, it keeps the
    weights of the largest magnitude."""
    layer = make()
    model = nn.Sequential(layer)
    bipkernels.project(model, 0.6)
    magnitudes = layer.weight.detach().abs().flatten()
    expected = torch.zeros(magnitudes.shape, dtype=torch.bool)
    expected[magnitudes.topk(bipkernels.keep_count(magnitudes.numel(), 0.6)).indices] = True
    assert torch.equal(layer.mask().flatten(), expected)
