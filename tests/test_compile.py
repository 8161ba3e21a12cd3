"""torch.compile (fullgraph, inductor on the CPU), a fused BiP step through a compiled model, autocast
bfloat16 on the CPU, and channels_last inputs and weights, each against eager PyTorch."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bipkernels
from bipkernels import autograd, ops

from conftest import force_backend

# What a compiled call that reaches a raise gives under fullgraph: torch refuses to trace it, and its
# message carries the original error's.
REFUSED = (ValueError, torch._dynamo.exc.Unsupported)


def _model(dtype=torch.float64) -> nn.Module:
    """Masked convolutions (one grouped) with batch norm, a masked Linear; 80% global sparsity, random
    scores (so masks are not |θ|)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    bipkernels.convert(model.to(dtype), 0.0)
    with torch.no_grad():
        for _, layer in bipkernels.masked_layers(model):
            layer.scores.uniform_()
            layer.inv_gamma = 0.25  # the implicit term on, so the fused backward does all its work
    bipkernels.project(model, 0.8)
    return model


# Inductor compiles the CPU graphs with the system's C++ compiler.
needs_compiler = pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles on its own (a graph compiled by another test could hide a break)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _closure(model, x, y):
    """A BiP closure: forward, backward, the loss."""
    def closure():
        loss = _loss(model, x, y)
        loss.backward()
        return loss
    return closure


@needs_compiler
def test_compiled_model_fullgraph_forward_backward_equals_eager(seed):
    eager = _model()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, fullgraph=True)  # a graph break raises
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (2,))
    for _ in range(2):  # the second call reuses the compiled graph
        _loss(eager, x, y).backward()
        _loss(compiled, x, y).backward()
    # Inductor reorders float64 sums: a gradient entry that cancels to near 0 may differ by ~1e-12 absolute
    # (one unexplained failure in many runs at atol 1e-12 may have been this); a wrong mask or a missing
    # term is off by O(1e-2) or more.
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-10)
    expected = _grads(eager)
    for name, grad in _grads(compiled_source).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-10, msg=name)
    pruned = ~compiled_source[0].mask()
    assert not compiled_source[0].weight.grad[pruned].any()  # the fused backward's masked lower level


def _compiles(backend: str) -> None:
    if backend == "torch" and not autograd.COMPILES_TORCH_BACKEND:
        pytest.skip(f"torch {torch.__version__} compiles the torch backend's backward wrongly (refused)")


def test_compiling_the_torch_backend_on_an_older_torch_is_refused(monkeypatch, seed):
    """torch 2.11 compiles the reference backward inside the masked layers' Functions with zero gradients:
    there a compiled masked model on the torch backend raises, naming the version, instead."""
    force_backend(monkeypatch, "torch")
    monkeypatch.setattr(autograd, "COMPILES_TORCH_BACKEND", False)
    compiled = torch.compile(_model(), fullgraph=True, backend="aot_eager")
    with pytest.raises(REFUSED, match=r"masked_weight: torch.compile of the masked layers on the torch backend .* "
                                      r"needs torch >= 2.14"):
        compiled(torch.randn(2, 3, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiled_model_survives_a_new_inv_gamma(monkeypatch, seed, backend):
    # After inv_gamma changes, dynamo passes it as a symbolic float: neither the op's checks nor the
    # reference's formula (the torch backend's backward) may branch on it.
    _compiles(backend)
    force_backend(monkeypatch, backend)
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (2,))
    _loss(compiled, x, y).backward()
    for _, layer in bipkernels.masked_layers(model):  # what BiP.__init__ does to a model compiled before
        layer.inv_gamma = 1e-4
    _loss(compiled, x, y).backward()


def test_a_bad_setting_in_a_compiled_model_raises_the_eager_error(seed):
    """Where the graph may break, a bad inv_gamma (a symbolic float after a change) raises the eager
    ValueError: the check's message failed inside dynamo (InternalTorchDynamoError on its format)."""
    model = _model()
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (2,))
    _loss(compiled, x, y).backward()
    for _, layer in bipkernels.masked_layers(model):
        layer.inv_gamma = -1.0
    with pytest.raises(ValueError, match=r"masked_weight: inv_gamma must be a number >= 0, got -1.0"):
        _loss(compiled, x, y)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiled_model_with_dynamic_shapes_equals_eager(monkeypatch, seed, backend):
    """Under dynamic=True dynamo traces inv_gamma as a graph input, which it cannot compare inside a backward:
    the forward checks it, the backward does not (it failed with two or more masked layers)."""
    _compiles(backend)
    force_backend(monkeypatch, backend)
    eager = _model()
    for _, layer in bipkernels.masked_layers(eager):
        layer.inv_gamma = 0.25
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (2, 3):
        x, y = torch.randn(batch, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (batch,))
        _loss(eager, x, y).backward()
        _loss(compiled, x, y).backward()
    expected = _grads(eager)
    for name, grad in _grads(compiled_source).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    for model in (eager, compiled_source):  # checked in the forward: torch refuses to trace the raise
        for _, layer in bipkernels.masked_layers(model):
            layer.inv_gamma = -1.0
    with pytest.raises(ValueError, match="autograd.masked_weight: inv_gamma must be a number >= 0, got -1.0"):
        _loss(eager, x, y)
    with pytest.raises(REFUSED, match="inv_gamma"):  # the message, or torch's refusal naming the check
        _loss(compiled, x, y)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_calls_refuse_bad_settings(seed, fullgraph):
    """A bad sparsity reaching a compiled projection, as its first value (a constant) or a later one (a
    symbolic float), fails and leaves the masks alone: a ValueError where the graph may break (the call
    falls back to eager), torch's refusal to trace the raise under fullgraph."""
    model = _model()
    project = torch.compile(bipkernels.project, fullgraph=fullgraph, backend="eager")
    # Under fullgraph torch names the check it cannot trace (a symbolic float's math.isfinite) or the raise.
    error, where = (REFUSED, "check_sparsity") if fullgraph else (ValueError, "bipkernels.project: sparsity must be a")
    with pytest.raises(error, match=where):
        project(model, 1.5)
    project(model, 0.6)
    project(model, 0.9)  # a symbolic float from here on
    kept = bipkernels.masks(model)
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(error, match=where):
            project(model, bad)
        for name, mask in bipkernels.masks(model).items():
            assert torch.equal(mask, kept[name]), (bad, name)


@needs_compiler
def test_fused_bip_step_through_a_compiled_model_and_compiled_projection_equal_eager(seed):
    eager = _model()
    other = copy.deepcopy(eager)
    compiled = torch.compile(other, fullgraph=True)
    solvers = [bipkernels.BiP(model, 0.8, total_steps=10) for model in (eager, other)]
    project = torch.compile(bipkernels.project, fullgraph=True)
    for _ in range(2):
        x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (4,))
        for solver, model in zip(solvers, (eager, compiled)):
            solver.step(_closure(model, x, y))
    masks = bipkernels.masks(eager)
    for name, mask in bipkernels.masks(other).items():
        assert torch.equal(mask, masks[name]), name
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
    # The projection itself compiles whole (the op's fake kernel) and sets the same thresholds.
    with torch.no_grad():
        for _, layer in bipkernels.masked_layers(other):
            layer.scores.uniform_()
    reference = copy.deepcopy(other)
    for sparsity in (0.6, 0.9, 0.35):  # a second value reaches the compiled graph as a symbolic float
        project(other, sparsity)
        bipkernels.project(reference, sparsity)
        for (name, layer), (_, expected) in zip(bipkernels.masked_layers(other), bipkernels.masked_layers(reference)):
            assert torch.equal(layer.threshold, expected.threshold), (name, sparsity)


# (n, sparsity) where the float product lies near a half: IMP's fifth round at ResNet-18's size, where a
# margin relative to the kept count rounded 3604528.4966 up; halves that the decimal reading rounds up.
NEAR_HALVES = [(11_000_148, 1 - 0.8**5), (111_683, 0.12347), (11_000_000, 0.488), (5, 0.9), (3, 0.5),
               (50_000, 1e-05), (2, 0.25), (7, 0.0), (7, 1.0), (10**12 + 1, 0.5)]


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_keep_count_equals_eager(dynamic):
    """keep_count under compilation (floats, a search for the decimal near a half; symbolic values
    after the first call) gives the eager count, which reads the sparsity as the decimal it prints as, for
    these sparsities near a half (the search can miss a decimal of 16 or 17 digits: _decimal_by_search)."""
    counted = torch.compile(lambda x, n, sparsity: x + bipkernels.keep_count(n, sparsity), fullgraph=True,
                            dynamic=dynamic, backend="eager")
    for n, sparsity in NEAR_HALVES:
        x = torch.zeros((), dtype=torch.int64)
        assert int(counted(x, n, sparsity)) == bipkernels.keep_count(n, sparsity), (n, sparsity)


def test_decimal_search_reads_short_decimals_as_repr(seed):
    """The compiled keep_count's decimal search finds repr's digits wherever repr needs at most 15."""
    generator = torch.Generator().manual_seed(0)
    for places in range(1, 16):
        for digits in torch.randint(0, 10**places, (200,), generator=generator).tolist():
            sparsity = digits / 10**places
            mantissa, _, exponent = repr(sparsity).partition("e")
            whole, _, fraction = mantissa.partition(".")
            found_digits, scale = ops._decimal_by_search(sparsity)
            assert found_digits / 10**scale == sparsity
            if sparsity:
                assert (found_digits, scale) == (int(whole + fraction), len(fraction) - int(exponent or 0))


def test_compiled_projection_keeps_the_exact_count(seed):
    """A compiled project at a sparsity whose float product lies near a half keeps keep_count blocks (a
    margin relative to the kept count kept one more)."""
    n, sparsity = 111_683, 0.12347
    model = bipkernels.convert(nn.Sequential(nn.Linear(1, n, bias=False)), 0.0)
    with torch.no_grad():
        model[0].scores.uniform_()
    torch.compile(bipkernels.project, fullgraph=True, backend="eager")(model, sparsity)
    assert int(model[0].mask().sum()) == bipkernels.keep_count(n, sparsity) == 97_893


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu(seed, dtype):
    """Under autocast the masked layers give exactly what their dense export gives (the same half
    casts of the same effective weight), and the fused backward turns that gradient g into m ⊙ g and
    θ ⊙ g − inv_gamma · m ⊙ g² in float32."""
    model = _model(torch.float32)
    dense = bipkernels.export_dense(model)
    x, y = torch.randn(2, 3, 6, 6), torch.randint(0, 5, (2,))
    outputs = []
    for m in (model, dense):
        with torch.autocast("cpu", dtype=dtype):
            outputs.append(m(x))
            loss = F.cross_entropy(outputs[-1], y)
        loss.backward()
    assert outputs[0].dtype == dtype
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for name, layer in bipkernels.masked_layers(model):
        g, mask, theta = dense.get_submodule(name).weight.grad, layer.mask(), layer.weight.detach()
        assert layer.weight.grad.dtype == layer.scores.grad.dtype == torch.float32
        assert torch.equal(layer.weight.grad, torch.where(mask, g, 0.0)), name
        torch.testing.assert_close(layer.scores.grad, theta * g - 0.25 * torch.where(mask, g * g, 0.0), msg=name)


def test_channels_last_inputs_and_weights(seed):
    model = _model()
    reference = copy.deepcopy(model)
    model = model.to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].scores.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (2,))
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    F.cross_entropy(out, y).backward()
    _loss(reference, x, y).backward()
    expected = _grads(reference)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-12, atol=1e-12, msg=name)
    # One BiP step keeps the layout and the masks of the contiguous model.
    solvers = [bipkernels.BiP(m, 0.8, total_steps=10) for m in (model, reference)]
    solvers[0].step(_closure(model, x.to(memory_format=torch.channels_last), y))
    solvers[1].step(_closure(reference, x, y))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    expected_masks = bipkernels.masks(reference)
    for name, mask in bipkernels.masks(model).items():
        assert torch.equal(mask, expected_masks[name]), name
