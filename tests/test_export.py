"""Export: plain dense layers with the exact mask, torch.nn.utils.prune masks, 2:4 semi-structured weights
(CUDA). The physically smaller export is in test_export_shrink.py."""

from __future__ import annotations

import io
import itertools
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

import bipkernels

from conftest import HAS_CPU_KERNELS, HAS_CUDA_GPU, force_backend, needs_torchvision, randomize_masked


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


@pytest.mark.parametrize("structure", ["unstructured", "filter", "channel", "2:4", "tile2x3"])
def test_export_dense_keeps_the_exact_mask_and_loads_into_the_plain_architecture(seed, structure):
    model = randomize_masked(bipkernels.convert(Net().double(), 0.0, structure))
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


def test_exports_keep_hooks_frozen_flags_layout_and_the_random_stream(seed):
    """A user's hook moved onto a masked layer by convert, frozen layers and channels_last weights come
    through both exports; building the plain layers draws no random numbers."""
    model = randomize_masked(bipkernels.convert(Net().double(), 0.0, "filter"))
    bipkernels.project(model, 0.5, scope="layer")
    model.conv1.register_forward_hook(lambda module, inputs, output: output * 3)
    model.conv2.register_full_backward_hook(lambda module, grad_input, grad_output: None)
    model.conv2.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for export in (bipkernels.export_dense, lambda model: bipkernels.export_shrunk(model, x, warn=False)[0]):
        state = torch.get_rng_state()
        exported = export(model)
        assert torch.equal(torch.get_rng_state(), state)
        model.eval()
        torch.testing.assert_close(exported.eval()(x), model(x), rtol=1e-12, atol=1e-12)
        assert len(exported.conv1._forward_hooks) == 1 and exported.conv2._is_full_backward_hook
        assert not exported.conv2.weight.requires_grad and not exported.head.bias.requires_grad
        assert exported.conv1.weight.requires_grad
        assert exported.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_exports_keep_the_users_attributes(seed):
    """A user's own attributes of a layer (a gain that a hook reads, a tag, a reference to the layer),
    which convert carried onto the masked twin, come through both exports, and so do those of a module
    that export_shrunk rebuilds (a batch norm); the masked layers' own settings stay behind."""
    net = Net().double()
    net.conv1.gain = 3.0
    net.conv1.register_forward_hook(lambda module, inputs, output: output * module.gain)
    net.bn2.tag = "stage 2"
    net.head.__dict__["itself"] = net.head  # not a submodule (setattr would register one: a cycle)
    net.head.__dict__["partner"] = net.bn2
    net.head.offset = torch.zeros(8, dtype=torch.float64)  # a tensor the export must not share
    model = randomize_masked(bipkernels.convert(net, 0.0, "filter"))
    with torch.no_grad():  # two filters of each of conv2's two groups go, so that bn2 shrinks: random masks
        model.conv2.scores[[0, 1, 4, 5]] *= 1e-3  # can take all four from one group, which then keeps them
    bipkernels.project(model, 0.5, scope="layer")
    model.eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    shrunk, report = bipkernels.export_shrunk(model, x, warn=False)
    assert report.shapes["bn2"][1] < report.shapes["bn2"][0]  # rebuilt smaller
    for exported in (bipkernels.export_dense(model), shrunk):
        torch.testing.assert_close(exported.eval()(x), model(x), rtol=1e-12, atol=1e-12)
        assert exported.conv1.gain == 3.0 and exported.bn2.tag == "stage 2" and exported.head.itself is exported.head
        assert not {"structure", "inv_gamma", "implicit"} & set(vars(exported.head))
    dense = bipkernels.export_dense(model)
    assert dense.head.partner is dense.bn2 and dense.head.offset is not model.head.offset
    torch.testing.assert_close(dense.head.offset, model.head.offset, rtol=0, atol=0)


def test_export_carries_no_hook_of_bipkernels_own(seed):
    """convert's no-op pre-hook on a TransformerEncoderLayer's Linear layers stays behind: the export
    pickles without bipkernels and keeps torch's fused inference path."""
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False)
    bipkernels.convert(model, 0.5)
    dense = bipkernels.export_dense(model)
    assert not dense.layers[0].linear1._forward_pre_hooks and not dense.layers[0].linear2._forward_pre_hooks
    assert b"bipkernels" not in pickle.dumps(dense)


def test_export_dense_keeps_what_ties_it_can_and_names_the_rest(seed):
    """A Linear head tied to an embedding (GPT-2): pruned, the export holds θ ⊙ m in the head and θ in the
    embedding, as the masked model computes, and says that the tie came apart; unpruned, the tie stays.
    A bias shared with another layer stays shared. Every export says so under its own name, pointing at
    its caller (export_shrunk and export_semi_structured warned as 'bipkernels.export_dense', from their
    own files)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head, self.side = nn.Embedding(10, 6), nn.Linear(6, 10), nn.Linear(6, 10)
            self.head.weight, self.side.bias = self.embed.weight, self.head.bias

        def forward(self, tokens):
            hidden = self.embed(tokens)
            return self.head(hidden) + self.side(hidden)

    tokens = torch.randint(0, 10, (3, 5))
    exports = {"export_dense": bipkernels.export_dense,
               "export_shrunk": lambda model: bipkernels.export_shrunk(model, tokens, warn=False)[0],
               "export_semi_structured": lambda model: bipkernels.export_semi_structured(model, warn=False)[0]}
    for (sparsity, tied), (name, export) in itertools.product(((0.0, True), (0.5, False)), exports.items()):
        model = bipkernels.convert(Tied().double(), sparsity, exclude="side")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dense = export(model)
        assert [str(w.message).startswith(f"bipkernels.{name}: weights tied in the model come apart (embed.weight "
                                          "and head.weight)") and w.filename == __file__ for w in caught] == \
            ([] if tied else [True]), [(str(w.message), w.filename) for w in caught]
        assert (dense.head.weight is dense.embed.weight) == tied
        assert dense.side.bias is dense.head.bias
        torch.testing.assert_close(dense(tokens), model(tokens), rtol=0, atol=0)


def test_export_dense_keeps_ties_between_masked_layers(seed):
    """Two masked layers sharing weight and bias (a siamese pair): their plain twins share the copies
    (each twin held its own); a weight that one of them prunes comes apart, with the warning."""
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight, second.bias = first.weight, first.bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert names the shared weight
        model = bipkernels.convert(nn.Sequential(first, second).double(), 0.0)
    dense = bipkernels.export_dense(model)
    assert dense[0].weight is dense[1].weight and dense[0].bias is dense[1].bias
    assert len(list(dense.parameters())) == 2
    bipkernels.project(model, 0.5)
    with pytest.warns(UserWarning, match="0.weight and 1.weight"):
        dense = bipkernels.export_dense(model)
    assert dense[0].weight is not dense[1].weight and dense[0].bias is dense[1].bias
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(dense(x), model(x), rtol=0, atol=0)


def test_prune_masks_are_the_exact_masks(seed):
    model = randomize_masked(bipkernels.convert(Net(), 0.0, "filter"))
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
    # Every entry is checked before any mask is attached: the model stays unpruned.
    target = Net()
    bad = [({"conv1": masks["conv1"], "7": masks["conv1"]}, ValueError, "the model has no module '7'"),
           ({"conv1": masks["conv1"], "": masks["conv1"]}, ValueError, "the model has no weight in module ''"),
           ({"conv1": masks["conv1"].float() / 2}, ValueError, "the mask of 'conv1' must hold only 0 and 1"),
           ({"conv1": masks["conv1"].tolist()}, TypeError, "the mask of 'conv1' must be a tensor, got list"),
           ([("conv1", masks["conv1"])], TypeError, "layer_masks must be a dict"),
           # A mask without values (NotImplementedError from torch, after conv1's mask was attached):
           ({"conv1": masks["conv1"], "head": masks["head"].to("meta")}, ValueError,
            "the mask of 'head' is on the meta device"),
           ]
    for layer_masks, error, message in bad:
        with pytest.raises(error, match=rf"bipkernels.apply_prune_masks: {message}"):
            bipkernels.apply_prune_masks(target, layer_masks)
        assert not torch_prune.is_pruned(target)
    # torch's own float 0/1 masks, and a module shared under two names, are accepted.
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    bipkernels.apply_prune_masks(twice, {"2": (torch.rand(3, 3) > 0.5).float()})
    assert torch_prune.is_pruned(twice) and twice[0].weight_mask.dtype == torch.float32
    for export in (bipkernels.apply_prune_masks, bipkernels.export_dense, bipkernels.export_semi_structured):
        with pytest.raises(TypeError, match=rf"bipkernels.{export.__name__}: model must be a torch.nn.Module"):
            export("x", {}) if export is bipkernels.apply_prune_masks else export("x")
    with pytest.raises(TypeError, match=r"bipkernels.export_shrunk: model must be a torch.nn.Module"):
        bipkernels.export_shrunk("x", torch.zeros(1))
    with pytest.raises(TypeError, match=r"bipkernels.export_shrunk: warn must be a bool, got str 'no'"):
        bipkernels.export_shrunk(nn.Linear(2, 2), torch.zeros(1, 2), warn="no")  # a truthy string warned


# -------------------------------------------------------------------------------------- semi-structured


def test_semi_structured_lists_every_layer_it_leaves_dense():
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(4, 4, 1))
    bipkernels.convert(model, structure="2:4")
    with pytest.warns(UserWarning, match=r"export_semi_structured: these masked layers stay dense:\n  0: .*\n  1: a "
                                         "convolution"):
        converted, left = bipkernels.export_semi_structured(model)
    assert set(left) == {"0", "1"}  # on the CPU torch refuses the Linear layer; a convolution never fits
    assert "CUDA" in left["0"] and "convolution" in left["1"]
    assert type(converted[0].weight) is nn.Parameter and not converted[0].weight.is_sparse
    unstructured = bipkernels.convert(nn.Sequential(nn.Linear(8, 8)), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "is not 2:4" in bipkernels.export_semi_structured(unstructured, warn=False)[1]["0"]
    with pytest.raises(TypeError, match=r"export_semi_structured: warn must be a bool, got int 0"):
        bipkernels.export_semi_structured(unstructured, warn=0)
    # 1:4 is a 2:4 pattern too (torch refuses it here, on the CPU); 2:8 is not.
    for structure, why in (("1:4", "CUDA"), ("2:8", "its structure 2:8 is not 2:4")):
        model = bipkernels.convert(nn.Sequential(nn.Linear(64, 64)), structure=structure)
        assert why in bipkernels.export_semi_structured(model, warn=False)[1]["0"], structure


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


def test_exports_refuse_what_they_cannot_copy_naming_it():
    """A deployment user's mistakes: a torch.compile wrapper (its state_dict keys gain '_orig_mod.'), layers
    pruned with torch.nn.utils.prune (deepcopy refused their computed weight with torch's own error), torch's
    masks attached to the masked model itself (its export then lost the mask buffers), and example inputs
    holding NaN (folded into the biases: every output of the smaller model was NaN), none, or none to read
    (on the meta device: torch's RuntimeError from reading them)."""
    model = bipkernels.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), 0.5, "filter")
    x = torch.randn(2, 3, 8, 8)
    exports = [lambda m: bipkernels.export_dense(m), lambda m: bipkernels.export_shrunk(m, x, warn=False),
               lambda m: bipkernels.export_semi_structured(m, warn=False)]
    for name, export in zip(("export_dense", "export_shrunk", "export_semi_structured"), exports):
        with pytest.raises(TypeError, match=rf"bipkernels.{name}: model is a torch.compile wrapper .* model._orig_mod"):
            export(torch.compile(model))
        torch_pruned = bipkernels.export_dense(model, prune_masks=True)
        with pytest.raises(ValueError, match=rf"bipkernels.{name}: 0, 2 pruned with torch.nn.utils.prune .* "
                                             r"torch.nn.utils.prune.remove\(layer, 'weight'\) first"):
            export(torch_pruned)
    with pytest.raises(ValueError, match=r"apply_prune_masks: '0' is a masked layer \(MaskedConv2d\): attach the "
                                         r"masks to bipkernels.export_dense\(model\)"):
        bipkernels.apply_prune_masks(model, bipkernels.masks(model))
    assert not torch_prune.is_pruned(model)
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    for bad, message in ((poisoned, r"example_inputs\[0\] holds NaN or inf"),
                         (x[:0], r"example_inputs\[0\] is empty \(shape \(0, 3, 8, 8\)\)"),
                         (x.to("meta"), r"example_inputs\[0\] is on the meta device")):
        with pytest.raises(ValueError, match=rf"bipkernels.export_shrunk: {message}"):
            bipkernels.export_shrunk(model, bad)


def _saved_and_loaded(save, load, program):
    """``program`` through ``save`` into a buffer and back through ``load``: a deployment's file round trip."""
    buffer = io.BytesIO()
    save(program, buffer)
    buffer.seek(0)
    return load(buffer)


def _deployment_case():
    """(model, x, small, other, expected): Net pruned by filters with random scores and batch norms in eval
    mode, an example input x, export_shrunk's model for x, and the model's outputs on ``other``, inputs of
    another batch size."""
    model = randomize_masked(bipkernels.convert(Net(), 0.0, "filter"))
    bipkernels.project(model, 0.5, scope="layer")
    model.eval()
    x = torch.randn(3, 4, 6, 6)
    small, _ = bipkernels.export_shrunk(model, x, warn=False)
    other = torch.randn(5, 4, 6, 6)
    with torch.no_grad():
        expected = model(other)
    return model, x, small, other, expected


def test_torch_export_of_the_model_and_its_exports_round_trips_with_a_dynamic_batch(seed):
    """torch.export.export of the masked model (its custom ops and their fake kernels trace), of export_dense
    and of export_shrunk, with the batch dimension dynamic, saved and loaded: the loaded programs give the
    masked model's eval-mode outputs on another batch size. The exports' programs hold torch's ops alone; the
    masked model's holds bipkernels' ops, but on the torch backend (the reference's torch operations)."""
    model, x, small, other, expected = _deployment_case()
    for name, module in (("masked", model), ("dense", bipkernels.export_dense(model).eval()), ("shrunk", small)):
        program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        custom = {str(node.target) for node in program.graph.nodes if str(node.target).startswith("bipkernels")}
        on_kernels = bipkernels.ops.backend_for("masked_weight", x.device) != "torch"
        assert bool(custom) == (name == "masked" and on_kernels), (name, custom)
        loaded = _saved_and_loaded(torch.export.save, torch.export.load, program)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(other), expected, msg=name)


def test_torchscript_takes_the_exports_and_names_them_for_a_masked_model(seed):
    """torch.jit.trace and torch.jit.script of export_dense and export_shrunk save, load and give the masked
    model's eval-mode outputs on another batch size. Of the masked model itself, torch.jit.trace failed its
    own check ('Graphs differed across invocations') or, unchecked, gave a graph that torch.jit.save refused
    ("Could not export Python function call '_MaskedWeight'"), and torch.jit.script stopped at "Unknown
    type annotation: 'nn.Parameter'": both are a TypeError naming the layer and the export to use, and
    the model is left as it was."""
    model, x, small, other, expected = _deployment_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript; users still run it
        for name, module in (("dense", bipkernels.export_dense(model).eval()), ("shrunk", small)):
            for compiled in (torch.jit.trace(module, (x,)), torch.jit.script(module)):
                loaded = _saved_and_loaded(torch.jit.save, torch.jit.load, compiled)
                with torch.no_grad():
                    torch.testing.assert_close(loaded(other), expected, msg=name)
        layers = dict(model.named_modules())
        for how, run in (("trace", lambda: torch.jit.trace(model, (x,))), ("script", lambda: torch.jit.script(model))):
            with pytest.raises(TypeError, match=rf"torch.jit.{how} of MaskedConv2d\(4, 8, kernel_size=\(3, 3\).* "
                                                r"structure=filter\): .* bipkernels.export_dense\(model\)"):
                run()
            assert dict(model.named_modules()) == layers
        with torch.no_grad():
            torch.testing.assert_close(model(other), expected, rtol=0, atol=0)


def _outputs_and_gradients(run, model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """run(x) and the gradients of its product with ``grad`` with respect to x and every parameter of
    ``model`` (the masked layers' weights and scores: the hypergradient)."""
    out = run(x)
    return [out, *torch.autograd.grad(out, [x, *model.parameters()], grad)]


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("structure", ["unstructured", "filter", "channel", "2:4", "tile4x4"])
def test_fx_symbolic_trace_calls_each_masked_layer_once_and_computes_what_the_model_does(seed, monkeypatch,
                                                                                          structure):
    """torch.fx.symbolic_trace of a masked model (it raised "symbolically traced variables cannot be used as
    inputs to control flow"): one call of bipkernels.nn.masked_layer per masked layer, the graph reading
    none of their tensors itself, and the GraphModule's outputs and gradients (input, weights, biases,
    scores) bit-equal to the model's in train and eval mode on the cpu backend, with the solver's settings
    (inv_gamma, implicit) set after the trace and a forward hook on a layer (run once, not twice)."""
    force_backend(monkeypatch, "cpu")
    model = randomize_masked(bipkernels.convert(Net().double(), 0.0, structure))
    if model.conv1.structure.uses_threshold:
        bipkernels.project(model, 0.5, scope="layer")
    gain = float(torch.randn(()))
    model.conv2.register_forward_hook(lambda layer, args, output: output * gain)
    traced = torch.fx.symbolic_trace(model)
    calls = [node for node in traced.graph.nodes if node.op == "call_function" and
             node.target is bipkernels.nn.masked_layer]
    assert [node.args[0].target for node in calls] == ["conv1", "conv2", "head"], traced.graph
    assert {node.target for node in traced.graph.nodes if node.op == "get_attr"} == {"conv1", "conv2", "head"}
    assert traced.conv1 is model.conv1 and traced.bn1 is model.bn1  # the graph holds the model's layers
    for _, layer in bipkernels.masked_layers(model):
        layer.inv_gamma, layer.implicit = float(torch.rand(())), "released"
    for training in (True, False):
        model.train(training)
        traced.train(training)
        x = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(3, 8, dtype=torch.float64)
        expected = _outputs_and_gradients(model, model, x, grad)
        got = _outputs_and_gradients(traced, model, x, grad)
        for name, want, have in zip(["output", "input", *dict(model.named_parameters())], expected, got):
            assert torch.equal(have, want), (training, name)


def test_a_traced_masked_model_traces_again_and_pickles(seed):
    """A GraphModule of a masked model traced again (symbolic_trace of it, or unpickling it, which traces its
    code) keeps one call of bipkernels.nn.masked_layer per masked layer (it traced into the layer's forward
    and raised "symbolically traced variables cannot be used as inputs to control flow") and the model's
    outputs."""
    model = randomize_masked(bipkernels.convert(Net().double(), 0.0, "filter")).eval()
    bipkernels.project(model, 0.5, scope="layer")
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        for again in (torch.fx.symbolic_trace(traced), pickle.loads(pickle.dumps(traced))):
            assert [node.args[0].target for node in again.graph.nodes if node.op == "call_function"
                    and node.target is bipkernels.nn.masked_layer] == ["conv1", "conv2", "head"], again.graph
            assert torch.equal(again(x), expected)


def test_fx_symbolic_trace_of_a_bare_masked_layer_says_to_trace_a_model_holding_it():
    """A graph cannot take its own root as the layer its node calls: a TypeError that says what to trace
    (it was fx's "symbolically traced variables cannot be used as inputs to control flow")."""
    layer = bipkernels.convert(nn.Linear(4, 3), 0.5)
    with pytest.raises(TypeError, match=r"torch.fx.symbolic_trace of a bare MaskedLinear: .*"
                                        r"\(nn.Sequential\(layer\)\)"):
        torch.fx.symbolic_trace(layer)
    x = torch.randn(2, 4)
    torch.testing.assert_close(torch.fx.symbolic_trace(nn.Sequential(layer))(x), layer(x), rtol=0, atol=0)


@needs_torchvision
def test_torchvision_feature_extractor_of_a_masked_resnet_gives_its_features_and_hypergradient(seed):
    """torchvision's create_feature_extractor (a torch.fx trace) of a converted ResNet-18 gives the features
    that hooks on the model read, and the same score gradients through them."""
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_masked(bipkernels.convert(resnet18(num_classes=10).double(), 0.0, "filter"))
    bipkernels.project(model, 0.5, scope="layer")
    extractor = create_feature_extractor(model, {"layer2.1.conv2": "inner", "layer3": "block"})
    features = {}
    model.layer2[1].conv2.register_forward_hook(lambda layer, args, output: features.__setitem__("inner", output))
    model.layer3.register_forward_hook(lambda layer, args, output: features.__setitem__("block", output))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        extractor.train(training)
        model(x)
        got = extractor(x)
        scores = [layer.scores for _, layer in bipkernels.masked_layers(model)]  # those after a feature: None
        for name in ("inner", "block"):
            assert torch.equal(got[name], features[name]), (training, name)
            grad = torch.randn_like(got[name])
            expected, have = (torch.autograd.grad(output, scores, grad, retain_graph=True, allow_unused=True)
                              for output in (features[name], got[name]))
            assert [score is None for score in have] == [score is None for score in expected]
            assert all(torch.equal(a, b) for a, b in zip(have, expected) if a is not None), (training, name)
