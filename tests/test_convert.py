"""convert on models as users build them: shared layers, tied and frozen weights, hooks, torch.nn.utils.prune
state, mixed dtypes. Each case failed before convert kept the layers' own objects (the review of 2026-12-03)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bipkernels
from bipkernels.nn import keep_all_threshold
from bipkernels.structures import parse_structure


def _masked_linear(layer, x):
    return F.linear(x, torch.where(layer.mask(), layer.weight, 0.0), layer.bias)


class TwoNames(nn.Module):
    """One Linear under two names of one parent (an encoder reused as decoder)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_layer_under_two_names_is_one_masked_layer(seed):
    model = TwoNames()
    bipkernels.convert(model, 0.5)
    assert isinstance(model.dec, bipkernels.MaskedLinear) and model.dec is model.enc
    assert list(bipkernels.masks(model)) == ["enc"] and int(model.enc.mask().sum()) == 18
    x = torch.randn(3, 6)
    assert torch.equal(model(x), _masked_linear(model.enc, torch.relu(_masked_linear(model.enc, x))))
    excluded = bipkernels.convert(TwoNames(), 0.5, exclude="dec")  # excluded by either name: no warning
    assert type(excluded.enc) is nn.Linear and excluded.enc is excluded.dec


def test_a_layer_shared_by_two_parents_is_counted_once(seed):
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared), nn.Linear(8, 3))
    bipkernels.convert(model, 0.75)
    assert model[0][0] is model[1][0] and isinstance(model[0][0], bipkernels.MaskedLinear)
    assert list(bipkernels.masks(model)) == ["0.0", "2"]
    total = 8 * 8 + 8 * 3  # the shared weight once
    assert sum(int(mask.sum()) for mask in bipkernels.masks(model).values()) == bipkernels.keep_count(total, 0.75)
    solver = bipkernels.BiP(model, 0.75, lr=0.1, score_lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    solver.step(closure)
    assert model[0][0] is model[1][0]


def test_tied_frozen_and_hooked_layers_keep_their_parameters_and_hooks(seed):
    embedding, head, frozen = nn.Embedding(10, 4), nn.Linear(4, 10), nn.Linear(4, 4)
    head.weight = embedding.weight  # weight tying, as language models do
    frozen.requires_grad_(False)
    model = nn.ModuleDict(dict(embedding=embedding, frozen=frozen, head=head))
    parameters = {name: parameter for name, parameter in model.named_parameters()}
    calls = []
    handle = model["head"].register_forward_hook(lambda module, args, output: calls.append(type(module)))
    with pytest.warns(UserWarning, match="embedding"):
        bipkernels.convert(model, 0.5, scope="layer")
    assert model["head"].weight is embedding.weight  # still tied: one Parameter
    assert model["frozen"].weight is parameters["frozen.weight"] and not model["frozen"].weight.requires_grad
    assert model["head"].bias is parameters["head.bias"]
    model["head"](torch.randn(2, 4))
    assert calls == [bipkernels.MaskedLinear]
    handle.remove()  # the handle reaches the masked layer's hooks
    model["head"](torch.randn(2, 4))
    assert len(calls) == 1


def test_channels_last_weights_stay_channels_last():
    model = nn.Sequential(nn.Conv2d(4, 8, 3)).to(memory_format=torch.channels_last)
    bipkernels.convert(model, 0.5)
    for tensor in (model[0].weight, model[0].scores):
        assert tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


@pytest.mark.parametrize("reparametrize", ["prune", "weight_norm"])
def test_a_layer_whose_weight_is_computed_is_named_and_nothing_changes(reparametrize):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    if reparametrize == "prune":
        torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
    else:
        with pytest.warns(FutureWarning):  # torch's own deprecation of the old weight_norm
            torch.nn.utils.weight_norm(model[2])
    before = [type(module) for module in model]
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) computes its weight from .*prune.remove"):
        bipkernels.convert(model, 0.5)
    assert [type(module) for module in model] == before


def test_global_scope_over_float32_and_float64_layers_says_so_and_leaves_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bipkernels.convert: a global projection .* layer '0' ranks in "
                                         r"torch.float32 and layer '1' ranks in torch.float64"):
        bipkernels.convert(model, 0.5)
    assert [type(module) for module in model] == [nn.Linear, nn.Linear]
    bipkernels.convert(model, 0.5, scope="layer")
    assert [int(mask.sum()) for mask in bipkernels.masks(model).values()] == [8, 4]
    half = bipkernels.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, dtype=torch.bfloat16)), 0.5)
    assert sum(int(mask.sum()) for mask in bipkernels.masks(half).values()) == 12  # one ranking, as float32


def test_bip_on_a_model_with_nothing_to_mask_says_so():
    with pytest.raises(ValueError, match=r"BiP: the model has no nn.Conv2d or nn.Linear .*Conv1d"), \
            pytest.warns(UserWarning, match="Conv1d"):
        bipkernels.BiP(nn.Sequential(nn.Conv1d(3, 4, 3)), 0.5)


@pytest.mark.parametrize("model, exclude", [(nn.Sequential(nn.ReLU()), ()),
                                            (nn.Sequential(nn.Linear(3, 3)), "0")])
def test_convert_with_nothing_to_mask_says_so_and_project_refuses(model, exclude):
    """A model with no layer convert handles (or all of them excluded) is left as it was, with a warning;
    projecting it is an error (before, both were silent no-ops)."""
    with pytest.warns(UserWarning, match="nothing to mask"):
        assert bipkernels.convert(model, 0.5, exclude=exclude) is model
    with pytest.raises(ValueError, match="bipkernels.project: the Sequential holds no masked layer"):
        bipkernels.project(model, 0.5)


def test_a_layer_emptied_by_the_global_projection_is_named(seed):
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3))  # filters of 9 against 72 weights
    with pytest.warns(UserWarning, match=r"keeps no block of 0: blocks rank by their sums"):
        bipkernels.convert(model, 0.5, "filter")
    assert not model[0].mask().any() and int(model[2].mask().any((1, 2, 3)).sum()) == 20  # 20 of 40 filters
    bipkernels.convert(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3)), 0.5, "filter", "layer")


def test_converting_again_names_the_masks_it_changes(seed):
    body = bipkernels.convert(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), 0.9)
    model = nn.Sequential(body, nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"the masks of the layers already masked changed \(0.0\): .* sparsity 0.0"):
        bipkernels.convert(model)
    assert bipkernels.sparsity(model) == 0.0  # as documented: every masked layer is projected
    with pytest.warns(UserWarning, match=r"changed \(0.0, 1\)"):
        bipkernels.convert(model, 0.5)  # and to the sparsity given
    bipkernels.convert(model, 0.5)  # the same projection again changes nothing: no warning


def test_bip_on_a_masked_model_keeps_its_structure_or_says_it_differs(seed):
    model = bipkernels.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, "filter")
    with pytest.raises(ValueError, match=r"BiP: structure 'unstructured', but .* layer '0' has structure filter"):
        bipkernels.BiP(model, 0.5, "unstructured")
    bipkernels.BiP(model, 0.5)  # None: the layers' own
    bipkernels.BiP(model, 0.5, "filter")
    assert all(layer.structure.kind == "filter" for _, layer in bipkernels.masked_layers(model))


def test_a_layer_carrying_more_than_weight_and_bias_is_named_and_nothing_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].adapter = nn.Linear(4, 2)  # e.g. a LoRA branch the twin would drop
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) carries \['adapter'\] beside its weight and bias"):
        bipkernels.convert(model, 0.5)
    assert [type(module) for module in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert type(model[2].adapter) is nn.Linear
    bipkernels.convert(model, 0.5, exclude="2")
    assert isinstance(model[0], bipkernels.MaskedLinear) and type(model[2]) is nn.Linear


@pytest.mark.parametrize("name", ["a", "a.0", "b", "b.0"])
def test_exclude_by_any_path_through_a_shared_parent(name):
    model = nn.Module()
    model.a = model.b = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.c = nn.Linear(4, 4)
    bipkernels.convert(model, 0.5, exclude=name)
    assert type(model.a[0]) is nn.Linear and model.a is model.b and isinstance(model.c, bipkernels.MaskedLinear)


def test_prune_of_a_masked_model_keeps_its_structure(seed):
    from torch.utils.data import TensorDataset

    model = bipkernels.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, "filter")
    data = TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    for method in ("bip", "hydra"):
        _, result = bipkernels.prune(model, data, method, 0.5, epochs=1, finetune_epochs=1)
        assert result["structure"] == "filter"



def test_a_model_built_on_the_meta_device_converts_then_loads_its_weights(seed):
    """Large models are built on the meta device and loaded later: convert keeps everything there (no
    values to rank; a sparsity is refused with what to do), a plain state_dict then loads with
    assign=True (scores from |θ|, thresholds beside the weights) and the projection prunes."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"meta device.*bipkernels.project\(model, 0.5\)"):
        bipkernels.convert(model, 0.5)
    assert type(model[0]) is nn.Linear
    bipkernels.convert(model, 0.0)
    with pytest.raises(ValueError, match=r"bipkernels.sparsity: the scores of '0' are on the meta device"):
        bipkernels.sparsity(model)
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model.load_state_dict(plain.state_dict(), assign=True)
    bipkernels.project(model, 0.5)
    assert bipkernels.sparsity(model) == pytest.approx(1 - bipkernels.keep_count(45, 0.5) / 45)
    x = torch.randn(4, 6)
    dense = bipkernels.export_dense(model)
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    torch.testing.assert_close(model[0].scores, plain[0].weight.abs(), rtol=0, atol=0)


def test_masked_layers_on_the_meta_device_move_with_to_empty(seed):
    """to_empty gives storage without values: the thresholds (meta has none to copy) start keep-all,
    float64, beside the weights, as a new layer's do; an initialisation or a state_dict follows."""
    with torch.device("meta"):
        model = bipkernels.convert(nn.Sequential(nn.Linear(6, 5), nn.Conv2d(3, 4, 3)), 0.0)
    model.to_empty(device="cpu")
    for _, layer in bipkernels.masked_layers(model):
        assert layer.weight.device.type == layer.threshold.device.type == "cpu"
        assert torch.equal(layer.threshold, keep_all_threshold())
    assert bipkernels.MaskedLinear(4, 3, device="meta").to_empty(device="cpu").threshold.dtype == torch.float64


def test_an_nm_structure_says_when_it_cannot_follow_the_sparsity(seed):
    with pytest.warns(UserWarning, match=r"structure 2:4 keeps 2 of every 4 weights \(sparsity 0.5\) whatever the "
                                         r"sparsity asked \(0.9\)"):
        bipkernels.convert(nn.Sequential(nn.Linear(8, 4)), 0.9, "2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sparsity in (0.0, 0.5):
            bipkernels.convert(nn.Sequential(nn.Linear(8, 4)), sparsity, "2:4")


def test_converting_again_says_which_layers_keep_another_structure(seed):
    """convert swaps plain layers: masked ones keep their structure, and a structure given that differs
    is named with them (it used to pass in silence); None (the default) asks nothing of them."""
    model = bipkernels.convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), 0.5, "2:4")
    model.append(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"layers already masked keep their structure, not unstructured: 0 \(2:4\), "
                                         r"1 \(2:4\); convert swaps plain layers only"):
        bipkernels.convert(model, 0.0, "unstructured")
    assert [layer.structure.kind for _, layer in bipkernels.masked_layers(model)] == ["nm", "nm", "unstructured"]
    with pytest.warns(UserWarning, match=r"structure 2:4 keeps 2 of every 4 weights \(sparsity 0.5\) whatever the "
                                         r"sparsity asked \(0.75\)"):  # no new layer: the masked ones are 2:4
        bipkernels.convert(bipkernels.convert(nn.Sequential(nn.Linear(8, 4)), 0.0, "2:4"), 0.75, "2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bipkernels.convert(model, 0.0)
        bipkernels.convert(model[:2], 0.5, "2:4")
        bipkernels.convert(model, 0.0, "unstructured", exclude=["0", "1"])  # excluded layers: not asked
    # The solvers prune a masked model in its layers' structures: no advice about their own reset.
    data = torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("omp", "imp", "random"):
            bipkernels.prune(model, data, method, 0.5, epochs=0, finetune_epochs=0, batch_size=8)
    assert not [w for w in caught if "keep their structure" in str(w.message)]


def test_a_layer_scope_projection_does_not_report_emptied_layers(seed):
    model = bipkernels.convert(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), 0.0, "filter", "layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bipkernels.convert(nn.Sequential(nn.Linear(8, 2)), 1.0)  # all pruned, as asked: no warning either
    with pytest.warns(UserWarning) as caught:
        bipkernels.convert(model, 0.95, "filter", "layer")
    assert not [w for w in caught if "keeps no block" in str(w.message)]


def test_a_layer_scope_projection_names_the_layers_it_cannot_prune(seed):
    """A depthwise convolution has one channel block: scope='layer' keeps it whole at any sparsity below 1,
    and says so rather than report a sparsity it did not reach."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    with pytest.warns(UserWarning, match=r"scope='layer' prunes nothing of 0: too few blocks .* sparsity 0.5"):
        bipkernels.convert(model, 0.5, "channel", "layer")
    assert model[0].mask().all() and not model[1].mask().all()
    with pytest.warns(UserWarning, match=r"scope='layer' prunes nothing of the layer itself: too few blocks"):
        bipkernels.convert(nn.Conv2d(8, 8, 3, groups=8), 0.5, "channel", "layer")
    with pytest.warns(UserWarning, match=r"the global projection keeps no block of the layer itself"):
        bipkernels.convert(nn.Linear(4, 4), 0.99, "filter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bipkernels.convert(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)), 0.5, "filter", "layer")


def test_a_lazy_module_is_named_and_nothing_changes():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"bipkernels.convert: \['0.weight', '0.bias'\] are not initialised yet"):
        bipkernels.convert(model, 0.5)
    assert [type(layer) for layer in model] == [nn.LazyLinear, nn.Linear]


@pytest.mark.parametrize("make", [lambda: nn.Linear(8, 4), lambda: nn.Conv2d(2, 3, 3, bias=False)])
def test_a_bare_layer_converts_to_its_masked_twin(seed, make):
    """A layer alone (a new head) cannot be swapped in place: convert returns its twin, pruned, holding the
    same parameters and the user's attributes (it warned and pruned nothing)."""
    layer = make()
    layer.tag = "head"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin = bipkernels.convert(layer, 0.75, "filter")
    assert isinstance(twin, (bipkernels.MaskedLinear, bipkernels.MaskedConv2d))
    assert twin.weight is layer.weight and twin.tag == "head"
    kept_filters = twin.mask().flatten(1).any(1)
    assert twin.structure == parse_structure("filter") and int(kept_filters.sum()) == 1


def test_a_bare_layer_has_nothing_to_exclude():
    with pytest.raises(ValueError, match=r"exclude names modules inside the model, but a bare Linear holds none"):
        bipkernels.convert(nn.Linear(4, 4), 0.5, exclude=["model"])
    with pytest.raises(ValueError, match=r"exclude names modules inside the model, but a bare Linear holds none"):
        bipkernels.convert(nn.Linear(4, 4), 0.5, exclude="")


def test_two_layers_sharing_one_weight_are_named(seed):
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.warns(UserWarning, match="0 and 1 share one weight: each gets its own scores and mask"):
        bipkernels.convert(nn.Sequential(first, second), 0.5)


class ReadsWeightDirectly(nn.Module):
    """Attention as torchvision's Swin writes it: the parent hands its Linear's weight to a function."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_a_layer_whose_weight_the_model_reads_directly_stays_dense_and_is_named(seed):
    """A mask on qkv would never apply (its forward is not called): it stays dense and a warning says
    why; before, it was masked, counted as pruned, and export_dense changed the outputs."""
    model = ReadsWeightDirectly().double()
    with pytest.warns(UserWarning, match=r"left dense, as the model reads their weights directly.*: qkv$"):
        bipkernels.convert(model, 0.5)
    assert type(model.qkv) is nn.Linear and isinstance(model.out, bipkernels.MaskedLinear)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(bipkernels.export_dense(model)(x), model(x), rtol=0, atol=0)


class ReadsAttributes(nn.Module):
    """Reads of fc's weight metadata and bias (no values of the weight: fc masks), and of proj's weight
    values through an attribute (h @ proj.weight.T: proj stays dense)."""

    def __init__(self):
        super().__init__()
        self.fc, self.proj, self.calls = nn.Linear(4, 6), nn.Linear(6, 6, bias=False), 0

    def forward(self, x):
        self.calls += 1
        self.cached = hidden = self.fc(x) - self.fc.bias  # stored on the module: a trace must not leave a proxy
        hidden = hidden + self.fc.weight.new_zeros(self.fc.weight.shape[0]) * self.fc.weight.numel()
        return hidden @ self.proj.weight.T


def test_weight_reads_through_attributes_and_metadata_are_told_apart(seed):
    model = ReadsAttributes()
    model(torch.randn(2, 4))
    cached = model.cached
    with pytest.warns(UserWarning, match=r"reads their weights directly.*: proj$"):
        bipkernels.convert(model, 0.5)
    assert isinstance(model.fc, bipkernels.MaskedLinear) and type(model.proj) is nn.Linear
    assert model.calls == 1 and model.cached is cached  # the trace's changes put back


class CastsWeights(nn.Module):
    """x.type_as(fc.weight) reads fc's dtype only (fc masks); proj.weight.to(hidden) reads proj's values
    (proj stays dense)."""

    def __init__(self):
        super().__init__()
        self.fc, self.proj = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)

    def forward(self, x):
        hidden = self.fc(x.type_as(self.fc.weight))
        return F.linear(hidden, self.proj.weight.to(hidden))


def test_a_weight_cast_reads_its_values_and_a_cast_to_its_dtype_does_not(seed):
    model = CastsWeights()
    with pytest.warns(UserWarning, match=r"reads their weights directly.*: proj$"):
        bipkernels.convert(model, 0.5)
    assert isinstance(model.fc, bipkernels.MaskedLinear) and type(model.proj) is nn.Linear


def test_converting_again_still_sees_direct_reads(seed):
    """The masked layers of a model converted once are traced as single calls (their forward does not
    trace): a layer left dense for a direct read stays dense when the model is converted again."""
    model = nn.Sequential(ReadsWeightDirectly(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="qkv"):
        bipkernels.convert(model, 0.5, exclude="1")
    with pytest.warns(UserWarning, match="qkv"):
        bipkernels.convert(model, 0.5)
    assert type(model[0].qkv) is nn.Linear and isinstance(model[1], bipkernels.MaskedLinear)


def test_what_is_bound_to_the_plain_layer_stays_behind(seed):
    """A compiled call (Module.compile) or a forward wrapped on the instance run the plain layer: carried
    over, the masked layer computed without its mask."""
    compiled, wrapped = nn.Linear(8, 4), nn.Linear(8, 4)
    compiled.compile()
    original = wrapped.forward
    wrapped.forward = lambda x: original(x)
    model = bipkernels.convert(nn.Sequential(compiled, wrapped), 0.9, scope="layer")
    x = torch.randn(3, 8)
    for layer in model:
        torch.testing.assert_close(layer(x), F.linear(x, layer.masked_weight(), layer.bias))


class SideEffects(nn.Module):
    """A forward that updates a buffer in place, appends to a list, runs a TorchScript part and reads
    a tied weight under an alias: the direct-read trace must change none of it and still see the read."""

    def __init__(self):
        super().__init__()
        self.fc, self.other = nn.Linear(4, 4), nn.Linear(4, 4)
        self.other.weight = self.fc.weight  # tied: the trace names it fc.weight
        self.alias = self.other.weight
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        self.head = nn.Linear(4, 2)
        self.register_buffer("running", torch.ones(4))
        self.history = []

    def forward(self, x):
        hidden = self.scripted(x)
        self.running.mul_(0.5)
        self.history.append(hidden)
        return self.head(F.linear(hidden, self.alias).type_as(self.head.weight))


def test_the_direct_read_trace_changes_nothing_and_sees_ties_and_aliases(seed):
    model, seen = SideEffects(), []
    model.register_forward_hook(lambda module, args, output: seen.append(output))
    with pytest.warns(UserWarning, match=r"reads their weights directly.*: fc, other$"):
        bipkernels.convert(model, 0.5)
    assert type(model.fc) is type(model.other) is nn.Linear and isinstance(model.head, bipkernels.MaskedLinear)
    assert torch.equal(model.running, torch.ones(4)) and model.history == [] and seen == []
    assert isinstance(model.scripted, torch.jit.ScriptModule)


def test_attributes_the_masked_layer_uses_itself_are_named(seed):
    layer = nn.Linear(4, 4)
    layer.mask, layer.me = torch.ones(4, 4), None
    layer.__dict__["me"] = layer  # a reference to itself, kept out of its modules
    model = nn.Sequential(layer)
    with pytest.warns(UserWarning, match=r"the attributes \['mask'\] of a Linear are not carried over"):
        bipkernels.convert(model, 0.5)
    assert model[0].me is model[0] and model[0].mask().dtype == torch.bool


def test_per_channel_scales_are_not_listed_as_layers_left_dense():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale, self.token = nn.Parameter(torch.ones(4, 1, 1)), nn.Parameter(torch.zeros(1, 1, 4))

        def forward(self, x):
            return self.conv(x) * self.scale

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bipkernels.convert(Scaled(), 0.5)
    assert bipkernels.unmasked_layers(nn.Sequential(nn.Conv1d(1, 8, 1))) == {"0": "Conv1d"}


class ReadsOwnTensorAttribute(nn.Module):
    """A forward that reads a plain tensor attribute's value, beside a lock and a parametrized sibling:
    the stand-in keeps the tensor's values, shares the lock and builds the parametrized module without
    pickling it (each of these stopped the trace, so qkv was masked)."""

    def __init__(self):
        import threading

        super().__init__()
        self.qkv, self.out = nn.Linear(4, 4), nn.Linear(4, 4)
        self.norm = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.repeats, self.lock = torch.tensor([2]), threading.Lock()

    def forward(self, x):
        for _ in range(int(self.repeats)):
            x = F.linear(x, self.qkv.weight)
        return self.out(self.norm(x))


def test_the_stand_in_keeps_what_the_forward_needs(seed):
    model = ReadsOwnTensorAttribute()
    with pytest.warns(UserWarning, match=r"reads their weights directly.*: qkv$"):
        bipkernels.convert(model, 0.5, exclude="norm")
    assert type(model.qkv) is nn.Linear and isinstance(model.out, bipkernels.MaskedLinear)
