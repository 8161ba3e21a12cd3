"""Property tests (hypothesis) of every op on every backend this machine runs (torch always, cpu with the
extension, triton under TRITON_INTERPRET=1: `TRITON_INTERPRET=1 pytest tests/test_properties.py -k triton`,
which .ci/test runs), against an oracle written here independently of bipkernels.reference: blocks from index
arithmetic, the top k by a sort on (NaN last, score descending, global index ascending).

Properties: exactly min(k, non-NaN blocks) blocks kept; every kept block score >= every pruned one; ties
to the lowest global index; NaN never kept, +inf first; masked_weight is a select (pruned NaN/inf weights
give 0); hypergrad matches its formula within the dtype's tolerance. Then NaN/inf through the masked
layers, and determinism: the same seed gives the same masks across runs and backends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import bipkernels
from bipkernels import models, ops, reference
from bipkernels import triton as bipkernels_triton
from bipkernels.structures import Structure

from conftest import HAS_CPU_KERNELS, force_backend

BACKENDS = ["torch"] + ["cpu"] * HAS_CPU_KERNELS + ["triton"] * bipkernels_triton.interpreting()
needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the compiled extension is not built")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# hypothesis reruns one test function body; the forced backend (an environment variable) holds for all.
PROPERTY_SETTINGS = settings(max_examples=120, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ oracle


def oracle_block_index(structure: Structure, shape) -> torch.Tensor:
    """For every element of a tensor of ``shape``, the flat index of its block (N:M: the element itself)."""
    rows, cols, _, inner = structure.matrix_shape(shape)
    r = torch.arange(rows).reshape(rows, 1).expand(rows, cols)
    c = torch.arange(cols).reshape(1, cols).expand(rows, cols)
    if structure.kind in ("unstructured", "nm"):
        index = r * cols + c
    elif structure.kind == "filter":
        index = r
    elif structure.kind == "channel":
        index = c // inner
    else:
        index = (r // structure.a) * -(-cols // structure.b) + c // structure.b
    return index.reshape(shape)


def oracle_block_scores(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Flat block scores (num_blocks,) in the score type: Σ|s| or Σs² per block, |s| for unstructured / N:M."""
    magnitude = scores.double().abs().reshape(-1)
    if structure.p == 2 and structure.kind not in ("unstructured", "nm"):
        magnitude = magnitude * magnitude
    index = oracle_block_index(structure, scores.shape).reshape(-1)
    blocks = int(index.max()) + 1 if index.numel() else math.prod(structure.block_scores_shape(scores.shape))
    summed = torch.zeros(blocks, dtype=torch.float64).index_add_(0, index, magnitude)
    return summed.to(reference.score_dtype(scores.dtype))


def oracle_kept(block_scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool (num_blocks,) per tensor: the top min(k, non-NaN) blocks of all, NaN last, ties lowest index."""
    flat = [value for scores in block_scores for value in scores.double().tolist()]
    order = sorted(range(len(flat)), key=lambda i: (math.isnan(flat[i]), -flat[i] if not math.isnan(flat[i]) else 0, i))
    kept = torch.zeros(len(flat), dtype=torch.bool)
    kept[order[:min(k, sum(not math.isnan(v) for v in flat))]] = True
    return list(kept.split([scores.numel() for scores in block_scores]))


def oracle_nm_mask(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """N of every M by |s| within each group, NaN never, ties to the lower position in the group."""
    rows, _, channels, inner = structure.matrix_shape(scores.shape)
    n, m = structure.a, structure.b
    grouped = scores.double().abs().reshape(rows, channels // m, m, inner).permute(0, 1, 3, 2).reshape(-1, m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    for g, group in enumerate(grouped.tolist()):
        ranked = sorted((j for j in range(m) if not math.isnan(group[j])), key=lambda j: (-group[j], j))
        mask[g, ranked[:n]] = True
    return mask.reshape(rows, channels // m, inner, m).permute(0, 1, 3, 2).reshape(scores.shape)


def oracle_masks(scores_list: list[torch.Tensor], structure: Structure, k: int | None) -> list[torch.Tensor]:
    if not structure.uses_threshold:
        return [oracle_nm_mask(scores, structure) for scores in scores_list]
    kept = oracle_kept([oracle_block_scores(scores, structure) for scores in scores_list], k)
    return [blocks[oracle_block_index(structure, scores.shape)] for scores, blocks in zip(scores_list, kept)]


def oracle_hypergrad(grad, weight, scores, mask, inv_gamma, implicit):
    """(grad_θ, grad_s, the terms' magnitude) in float64 from the formula; grad_θ is a select of g, grad_s
    changes sign where s < 0 (the mask ranks |s|)."""
    g, theta = grad.double(), weight.double()
    direct = theta * g
    implicit_term = direct * direct if implicit == "released" else torch.where(mask, g * g, 0.0)
    sign = torch.where(scores < 0, -1.0, 1.0).double()
    return (torch.where(mask, g, 0.0), sign * (direct - inv_gamma * implicit_term),
            direct.abs() + inv_gamma * implicit_term.abs())


# ---------------------------------------------------------------------------------------------- problems


def _layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` with the same shape and contents in a contiguous, transposed or offset storage."""
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "offset":
        storage = torch.empty(values.numel() + 7, dtype=values.dtype)
        return storage[7:].view(values.shape).copy_(values)
    return values


@st.composite
def problems(draw):
    """(structure, shapes, dtype, levels, specials, layout, seed, k or None): 1 to 3 tensors pruned together."""
    kind = draw(st.sampled_from(["unstructured", "filter", "channel", "nm", "tile"]))
    p = draw(st.sampled_from([1, 2]))
    if kind == "nm":
        m = draw(st.integers(1, 4))
        structure = Structure("nm", draw(st.integers(0, m)), m, p)
    elif kind == "tile":
        structure = Structure("tile", draw(st.integers(1, 4)), draw(st.integers(1, 4)), p)
    else:
        structure = Structure(kind, p=p)
    shapes = []
    for _ in range(draw(st.integers(1, 3))):
        dims = draw(st.lists(st.integers(1 if kind != "unstructured" else 0, 7), min_size=1, max_size=4))
        if kind == "nm":
            dims = dims + [1] if len(dims) < 2 else dims
            dims[1] = structure.b * draw(st.integers(1, 3))
        shapes.append(tuple(dims))
    total = sum(math.prod(structure.block_scores_shape(shape)) for shape in shapes)
    k = None if kind == "nm" else draw(st.integers(0, total + 2))
    return (structure, shapes, draw(st.sampled_from(DTYPES)), draw(st.sampled_from([1, 2, 4, 16])),
            draw(st.integers(0, 4)), draw(st.sampled_from(["contiguous", "transposed", "offset"])),
            draw(st.integers(0, 2**31 - 1)), k)


def _scores(shape, dtype, levels, specials, layout, generator) -> torch.Tensor:
    """Signed multiples of 1/levels (exact block sums in any order, many ties) with ``specials`` entries
    set to NaN, +inf, -inf or -0.0 at random places."""
    values = torch.randint(-levels, levels + 1, shape, generator=generator).double() / levels
    flat = values.reshape(-1)
    if flat.numel():
        places = torch.randint(0, flat.numel(), (specials,), generator=generator)
        kinds = torch.randint(0, 4, (specials,), generator=generator)
        flat[places] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=torch.float64)[kinds]
    return _layout(values.to(dtype), layout)


# ----------------------------------------------------------------------------------------- op properties


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY_SETTINGS
@given(problem=problems())
def test_masks_keep_exactly_k_of_the_best_blocks_ties_to_the_lowest_index(monkeypatch, backend, problem):
    structure, shapes, dtype, levels, specials, layout, seed, k = problem
    force_backend(monkeypatch, backend)
    generator = torch.Generator().manual_seed(seed)
    scores_list = [_scores(shape, dtype, levels, specials, layout, generator) for shape in shapes]

    masks = ops.topk_masks(scores_list, k, structure)
    want = oracle_masks(scores_list, structure, k)
    for scores, mask, expected in zip(scores_list, masks, want):
        assert mask.dtype == torch.bool and mask.shape == scores.shape
        assert torch.equal(mask, expected)
    if not structure.uses_threshold:
        return

    block_scores = [ops.block_scores(scores, structure) for scores in scores_list]
    for scores, blocks in zip(scores_list, block_scores):
        assert tuple(blocks.shape) == structure.block_scores_shape(scores.shape)
        torch.testing.assert_close(blocks.reshape(-1), oracle_block_scores(scores, structure), rtol=0, atol=0,
                                   equal_nan=True)
    thresholds = ops.topk_threshold(block_scores, k)
    kept = torch.cat([reference.kept_blocks(blocks, row) for blocks, row in zip(block_scores, thresholds)])
    flat = torch.cat([blocks.reshape(-1).double() for blocks in block_scores])
    nan = flat.isnan()
    assert int(kept.sum()) == min(k, int((~nan).sum())), "kept count"
    assert not (kept & nan).any(), "a NaN block was kept"
    if kept.any() and (~kept & ~nan).any():
        assert flat[kept].min() >= flat[~kept & ~nan].max(), "a pruned block beats a kept one"
        boundary = flat[kept].min()
        tied_kept, tied_pruned = (kept & (flat == boundary)).nonzero(), (~kept & (flat == boundary)).nonzero()
        if len(tied_kept) and len(tied_pruned):
            assert tied_kept.max() < tied_pruned.min(), "ties go to the lowest global index"
    infinite = flat == math.inf
    assert int((kept & infinite).sum()) == min(k, int(infinite.sum())), "+inf blocks are kept first"


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY_SETTINGS
@given(problem=problems(), implicit=st.sampled_from(["paper", "released"]), inv_gamma=st.sampled_from([0.0, 0.3, 2.0]))
def test_masked_weight_and_hypergrad_match_their_formulas(monkeypatch, backend, problem, implicit, inv_gamma):
    structure, shapes, dtype, levels, specials, layout, seed, k = problem
    force_backend(monkeypatch, backend)
    generator = torch.Generator().manual_seed(seed)
    scores = _scores(shapes[0], dtype, levels, specials, layout, generator)
    weight = _layout(torch.randn(shapes[0], generator=generator, dtype=torch.float64).to(dtype), layout)
    grad = _layout(torch.randn(shapes[0], generator=generator, dtype=torch.float64).to(dtype), layout)
    threshold = ops.topk_threshold(ops.block_scores(scores, structure), k) if structure.uses_threshold else None
    mask = oracle_masks([scores], structure, k)[0]

    # A select: kept weights exactly, pruned ones exactly 0 even where they are NaN or ±inf.
    poisoned = weight.clone()
    pruned = (~mask).nonzero(as_tuple=True)
    poisoned[pruned] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)[
        torch.randint(0, 3, (len(pruned[0]),), generator=generator)]
    # The weight's layout for an unstructured mask over tensors of one dense layout, else contiguous
    # (every backend: README, support matrix, ³).
    keeps_layout = (structure.kind == "unstructured"
                    and scores.stride() == weight.stride() == grad.stride()
                    and torch.empty_like(weight).stride() == weight.stride())
    strides = weight.stride() if keeps_layout else torch.empty(weight.shape).stride()
    for w in (weight, poisoned):
        out = ops.masked_weight(w, scores, threshold, structure)
        assert out.dtype == dtype and out.shape == w.shape and out.stride() == (w.stride() if keeps_layout else strides)
        assert torch.equal(out, torch.where(mask, w, torch.zeros((), dtype=dtype)))

    grad_weight, grad_scores = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=inv_gamma,
                                             implicit=implicit)
    want_weight, want_scores, magnitude = oracle_hypergrad(grad, weight, scores, mask, inv_gamma, implicit)
    assert grad_weight.dtype == grad_scores.dtype == dtype
    assert grad_weight.stride() == grad_scores.stride() == strides
    assert torch.equal(grad_weight.double(), want_weight), "grad_θ is a select of g"
    # Half types compute in float32 and round once; allow a few roundings of the terms' size.
    error = (grad_scores.double() - want_scores).abs()
    assert bool((error <= 4 * torch.finfo(dtype).eps * magnitude + torch.finfo(dtype).tiny).all()), error.max()
    poisoned_grad_weight, _ = ops.hypergrad(grad, poisoned, scores, threshold, structure, inv_gamma=inv_gamma,
                                            implicit=implicit)
    assert torch.equal(poisoned_grad_weight.double(), want_weight), "a pruned NaN/inf weight reached grad_θ"


@needs_cpu_kernels
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_cpu_kernels_equal_the_reference_bit_for_bit(problem):
    structure, shapes, dtype, levels, specials, layout, seed, k = problem
    generator = torch.Generator().manual_seed(seed)
    scores_list = [_scores(shape, dtype, levels, specials, layout, generator) for shape in shapes]
    kind, a, b, p = structure.op_args()
    if not structure.uses_threshold:
        for scores in scores_list:
            got = torch.ops.bipkernels.block_mask(scores, torch.zeros(2, dtype=torch.float64), kind, a, b, p)
            assert torch.equal(got, reference.block_mask(scores, None, structure))
        return
    block_scores = [torch.ops.bipkernels.block_scores(scores, kind, a, b, p) for scores in scores_list]
    for scores, blocks in zip(scores_list, block_scores):
        torch.testing.assert_close(blocks, reference.block_scores(scores, structure), rtol=0, atol=0, equal_nan=True)
    thresholds = torch.ops.bipkernels.topk_threshold(block_scores, k)
    assert torch.equal(thresholds, reference.topk_threshold(block_scores, k))
    for scores, row in zip(scores_list, thresholds):
        assert torch.equal(torch.ops.bipkernels.block_mask(scores, row, kind, a, b, p),
                           reference.block_mask(scores, row, structure))


# ------------------------------------------------------------------------------- NaN and inf in the layers


def _layer(kind: str, structure: str):
    if kind == "conv":
        return bipkernels.MaskedConv2d(8, 6, 3, padding=1, structure=structure), torch.randn(2, 8, 5, 5)
    return bipkernels.MaskedLinear(8, 6, structure=structure), torch.randn(3, 4, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("structure", ["unstructured", "filter", "channel", "2:4", "tile2x3"])
def test_pruned_nan_and_inf_weights_reach_no_output_and_no_gradient(monkeypatch, seed, backend, kind, structure):
    force_backend(monkeypatch, backend)
    layer, x = _layer(kind, structure)
    bipkernels.project(layer, 0.6)
    mask = layer.mask()
    assert (~mask).any()
    clean = torch.where(mask, layer.weight.detach(), 0.0)
    with torch.no_grad():  # poison every pruned weight
        poison = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, layer.weight.shape)]
        layer.weight.copy_(torch.where(mask, layer.weight, poison))
    x.requires_grad_()
    out = layer(x)
    target = torch.randn_like(out)
    F.mse_loss(out, target).backward()

    # The same layer computed densely with the pruned weights at 0: bit for bit the same, except through the
    # triton backend's fused matmul, which adds in its own order (float32 rounding apart).
    fused = backend == "triton" and kind == "linear"
    same = (lambda got, want: torch.allclose(got, want, rtol=1e-5, atol=1e-6)) if fused else torch.equal
    dense_weight = clean.clone().requires_grad_()
    dense_x = x.detach().clone().requires_grad_()
    dense_out = F.conv2d(dense_x, dense_weight, layer.bias, padding=1) if kind == "conv" else \
        F.linear(dense_x, dense_weight, layer.bias)
    F.mse_loss(dense_out, target).backward()
    assert torch.isfinite(out).all() and same(out, dense_out)
    assert torch.isfinite(x.grad).all() and same(x.grad, dense_x.grad)
    assert torch.isfinite(layer.weight.grad).all()
    assert same(layer.weight.grad, torch.where(mask, dense_weight.grad, 0.0))
    assert bool((layer.weight.grad[~mask] == 0).all()), "a pruned weight got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", ["unstructured", "filter", "tile2x2"])
def test_nan_scores_are_never_kept_and_inf_scores_always(monkeypatch, seed, backend, structure):
    force_backend(monkeypatch, backend)
    model = torch.nn.Sequential(bipkernels.MaskedConv2d(4, 8, 3, structure=structure),
                                bipkernels.MaskedLinear(8, 6, structure=structure))
    layers = [layer for _, layer in bipkernels.masked_layers(model)]
    with torch.no_grad():
        for layer in layers:
            special = torch.rand(layer.scores.shape)
            layer.scores[special < 0.02] = math.nan
            layer.scores[special > 0.97] = -math.inf if torch.rand(()) < 0.5 else math.inf
    blocks = torch.cat([layer.block_scores().reshape(-1) for layer in layers])
    for sparsity in (0.0, 0.5, 0.9, 0.99):
        bipkernels.project(model, sparsity)
        kept = torch.cat([torch.zeros(layer.block_scores().numel(), dtype=torch.bool).index_fill_(
            0, oracle_block_index(layer.structure, layer.weight.shape)[layer.mask()], True) for layer in layers])
        k = ops.keep_count(blocks.numel(), sparsity)
        assert int(kept.sum()) == min(k, int((~blocks.isnan()).sum()))
        assert not kept[blocks.isnan()].any(), "a NaN block was kept"
        infinite = blocks == math.inf
        assert int((kept & infinite).sum()) == min(k, int(infinite.sum())), "an infinite block lost to a finite one"


# ----------------------------------------------------------------------------------------------- determinism


def _bip_masks(backend: str, monkeypatch, model_seed: int, data: TensorDataset, mode: str, structure: str):
    """The masks after two epochs of BiP from a model initialised by ``model_seed``."""
    force_backend(monkeypatch, backend)
    torch.manual_seed(model_seed)
    model = models.SmallResNet(num_classes=4)
    solver = bipkernels.BiP(model, 0.8, structure, mode=mode, score_lr=1.0, inv_gamma=0.5, total_steps=8)
    solver.fit(data, epochs=2, batch_size=32, seed=model_seed)
    return bipkernels.masks(model)


@pytest.mark.parametrize("mode, structure", [("fused", "unstructured"), ("faithful", "tile2x2")])
def test_bip_masks_are_the_same_for_the_same_seed_across_runs_and_backends(monkeypatch, seed, mode, structure):
    data = TensorDataset(torch.rand(128, 1, 8, 8), torch.randint(0, 4, (128,)))
    runs = [(backend, _bip_masks(backend, monkeypatch, seed, data, mode, structure))
            for backend in BACKENDS for _ in range(2)]
    first_backend, first = runs[0]
    torch.manual_seed(seed)
    initial = bipkernels.masks(bipkernels.convert(models.SmallResNet(num_classes=4), 0.8, structure))
    assert any(not torch.equal(first[name], initial[name]) for name in first), "BiP left the masks as they began"
    for backend, masks in runs[1:]:
        assert masks.keys() == first.keys()
        for name in first:
            assert torch.equal(masks[name], first[name]), f"{name}: {backend} differs from {first_backend}"
