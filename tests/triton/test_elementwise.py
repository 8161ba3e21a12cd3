"""block_scores, block_mask, masked_weight and hypergrad of the triton backend against the float64
reference, through the interpreter: every structure and dtype, odd sizes, ties, NaN/inf scores and
weights, k = 0 and k = all, empty and non-contiguous tensors, errors that name the op."""

from __future__ import annotations

import pytest
import torch

from bipkernels import ops, reference
from bipkernels import triton as bipkernels_triton
from bipkernels.reference import IMPLICIT_FORMS
from bipkernels.structures import parse_structure

from conftest import (DTYPES, LAYOUTS, assert_close, check_channels_last_conv_equals_torchs, fits, needs_interpreter,
                      tied_scores, with_specials)

pytestmark = needs_interpreter
STRUCTURES = ["unstructured", "filter", "channel", "2:4", "1:3", "tile3x5", "tile1x1"]
SHAPES = [(7, 12), (5, 6, 3, 1), (17,)]
EXACT = dict(rtol=0, atol=0, equal_nan=True)
KEEP_NONE = torch.tensor([float("inf"), 0.0], dtype=torch.float64)
KEEP_ALL = torch.tensor([float("-inf"), float("inf")], dtype=torch.float64)


def _inputs(shape, dtype, structure):
    """Scores with ties, NaN, ±inf and -0.0 whose block sums are exact in any order (so the reference
    keeps the same blocks), weights with NaN/inf, a gradient, and the thresholds to try: keep none,
    the top half (ties cut inside a tensor), keep all; None for N:M."""
    scores = with_specials(tied_scores(shape, dtype))
    weight = with_specials(torch.randn(shape, dtype=torch.float64).to(dtype))
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    if not structure.uses_threshold:
        return scores, weight, grad, [None]
    blocks = reference.block_scores(scores, structure)
    return scores, weight, grad, [KEEP_NONE, reference.topk_threshold([blocks], blocks.numel() // 2)[0], KEEP_ALL]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", STRUCTURES)
def test_ops_match_the_reference(triton_backend, seed, name, shape, dtype):
    if not fits(name, shape):
        pytest.skip("structure does not fit the shape")
    structure = parse_structure(name, p=int(torch.randint(1, 3, ())))
    scores, weight, grad, thresholds = _inputs(shape, dtype, structure)
    torch.testing.assert_close(ops.block_scores(scores, structure), reference.block_scores(scores, structure), **EXACT)
    for threshold in thresholds:
        assert torch.equal(ops.block_mask(scores, threshold, structure),
                           reference.block_mask(scores, threshold, structure))
    threshold = thresholds[len(thresholds) // 2]
    torch.testing.assert_close(ops.masked_weight(weight, scores, threshold, structure),
                               reference.masked_weight(weight, scores, threshold, structure), **EXACT)
    inv_gamma = 0.37
    for implicit in IMPLICIT_FORMS:
        got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=inv_gamma, implicit=implicit)
        want = reference.hypergrad(grad.double(), weight.double(), scores, threshold, structure, inv_gamma, implicit)
        direct = (weight.double() * grad.double()).abs()
        implicit_term = direct * direct if implicit == "released" else grad.double() ** 2
        assert got[0].dtype == got[1].dtype == dtype
        assert_close(got[0], want[0])
        assert_close(got[1], want[1], scale=direct + inv_gamma * implicit_term)


@pytest.mark.parametrize("name", ["unstructured", "filter", "2:4"])
def test_bfloat16_subnormals_are_read_exactly(triton_backend, seed, name):
    """bfloat16 subnormal scores and weights (below 1.2e-38): the interpreter's own conversion misread
    them (1.0e-39 became 4.4e-39, 9.2e-41 became 0), so the triton backend kept the wrong blocks."""
    structure = parse_structure(name)
    tiny = torch.tensor([0.0, 9.2e-41, 1e-39, 2e-39, 3e-39, 1.1e-38, 1e-30, 1.0])
    scores = tiny[torch.randint(0, len(tiny), (6, 8))].to(torch.bfloat16)
    weight = (tiny[torch.randint(0, len(tiny), (6, 8))] * torch.randn(6, 8).sign()).to(torch.bfloat16)
    assert torch.equal(ops.block_scores(scores, structure), reference.block_scores(scores, structure))
    threshold = None
    if structure.uses_threshold:
        blocks = reference.block_scores(scores, structure)
        threshold = reference.topk_threshold([blocks], blocks.numel() // 2)[0]
        assert torch.equal(ops.topk_threshold(blocks, blocks.numel() // 2), threshold)
    assert torch.equal(ops.block_mask(scores, threshold, structure), reference.block_mask(scores, threshold, structure))
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight, scores, threshold, structure))


@pytest.mark.parametrize("inv_gamma", [0.0, 0.3])
def test_bfloat16_hypergrad_is_rounded_as_the_reference_rounds_it(triton_backend, seed, inv_gamma):
    """bfloat16 g, θ and s of every bit pattern (subnormals, ±inf, NaN): grad_θ is a select of g and
    grad_s one float32 product (and difference) rounded to nearest even, so both equal the reference bit
    for bit. The interpreter's float32 -> bfloat16 conversion truncated (a third of grad_s was a unit in
    the last place low) and misrounded subnormals (grad_θ was no longer g), and it read a negative
    subnormal score as 0, so grad_s kept the sign the mask's |s| asks to flip."""
    patterns = lambda: torch.randint(-2**15, 2**15, (4096,), dtype=torch.int32).to(torch.int16).view(  # noqa: E731
        torch.bfloat16)
    grad, weight, scores = patterns(), patterns(), patterns()
    scores[:2] = torch.tensor([-7.3e-40, 7.3e-40], dtype=torch.bfloat16)  # s < 0 flips grad_s, not s > 0
    threshold = reference.topk_threshold([reference.block_scores(scores, parse_structure("unstructured"))], 2048)[0]
    got = ops.hypergrad(grad, weight, scores, threshold, "unstructured", inv_gamma=inv_gamma)
    want = reference.hypergrad(grad, weight, scores, threshold, parse_structure("unstructured"), inv_gamma)
    for name, got_one, want_one in zip(("grad_θ", "grad_s"), got, want):
        same = (got_one.view(torch.int16) == want_one.view(torch.int16)) | (got_one.isnan() & want_one.isnan())
        assert bool(same.all()), f"{name}: {int((~same).sum())} differ, first {got_one[~same][:3].tolist()} " \
            f"instead of {want_one[~same][:3].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_scores_of_continuous_scores(triton_backend, seed, dtype):
    """Sums of arbitrary values: the float64 sum may differ in its last bits between summation orders,
    the block score (rounded once to float32) only by that rounding."""
    scores = torch.randn(13, 10, 3, 3, dtype=torch.float64).to(dtype)
    for name in ("filter", "channel", "tile4x7"):
        for p in (1, 2):
            structure = parse_structure(name, p=p)
            got, want = ops.block_scores(scores, structure), reference.block_scores(scores.double(), structure)
            assert got.dtype == torch.float32
            assert_close(got, want, terms=0)


def test_non_contiguous_inputs(triton_backend, seed):
    structure = parse_structure("tile3x2")
    scores, weight, grad = (torch.randn(12, 7, dtype=torch.float32).t() for _ in range(3))
    blocks = reference.block_scores(scores, structure)
    threshold = reference.topk_threshold([blocks], blocks.numel() // 3)[0]
    assert torch.equal(ops.block_scores(scores, structure), reference.block_scores(scores.contiguous(), structure))
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight.contiguous(), scores.contiguous(), threshold, structure))
    got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5)
    want = reference.hypergrad(grad.contiguous(), weight.contiguous(), scores.contiguous(), threshold, structure, 0.5)
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # float32 in float32, no fused multiply-add


@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_a_channels_last_conv_equals_torchs_bit_for_bit(triton_backend, seed, structure):
    """Structured masks' results are contiguous; the masked layer still convolves in the weight's layout."""
    check_channels_last_conv_equals_torchs(structure)


def _permuted_5d(t: torch.Tensor) -> torch.Tensor:
    """A dense 5-D layout in which no two neighbouring dims lie together: five dims to index, more than the
    kernels take (mask_rule.memory_order), so it runs on contiguous copies and takes the layout after."""
    return t.permute(1, 3, 0, 4, 2).contiguous().permute(2, 0, 4, 1, 3)


def _layout_inputs(layout: str, mixed: bool):
    """Scores (tied, cut inside the ties by the threshold), weight and grad in ``layout``, float64; with
    ``mixed`` the scores contiguous."""
    shape, to_layout = ((3, 4, 5, 2, 3), _permuted_5d) if layout == "permuted_5d" else ((6, 12, 3, 5), LAYOUTS[layout])
    weight, grad = (to_layout(torch.randn(shape, dtype=torch.float64)) for _ in range(2))
    scores = tied_scores(shape)
    return (scores if mixed else to_layout(scores)), weight, grad


@pytest.mark.parametrize("layout", [*LAYOUTS, "permuted_5d"])
@pytest.mark.parametrize("name", ["unstructured", "filter", "2:4"])
@pytest.mark.parametrize("mixed", [False, True])
def test_dense_layouts_keep_the_strides_the_reference_gives(triton_backend, seed, layout, name, mixed):
    """masked_weight and hypergrad of a channels_last (or other dense) weight gave contiguous results,
    where torch's elementwise ops, the C++ kernels and the reference keep the weight's layout for an
    unstructured mask over tensors of one layout (reference.keeps_weight_layout). Now the strides are the
    reference's, and the values equal its values bit for bit (tied scores: the tie rule ranks by logical
    index wherever the elements lie)."""
    structure = parse_structure(name)
    scores, weight, grad = _layout_inputs(layout, mixed)
    blocks = reference.block_scores(scores, structure)
    threshold = reference.topk_threshold([blocks], blocks.numel() // 2)[0] if structure.uses_threshold else None
    got = [ops.masked_weight(weight, scores, threshold, structure),
           *ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5, implicit="released")]
    want = [reference.masked_weight(weight, scores, threshold, structure),
            *reference.hypergrad(grad, weight, scores, threshold, structure, 0.5, "released")]
    assert reference.keeps_weight_layout(structure, weight, scores, grad) == (name == "unstructured" and not mixed)
    for result, expected in zip(got, want, strict=True):
        assert result.stride() == expected.stride()
        torch.testing.assert_close(result, expected, **EXACT)
    if name == "unstructured" and not mixed:  # the gradient alone in another layout: contiguous, as the reference
        for result, expected in zip(ops.hypergrad(grad.contiguous(), weight, scores, threshold, structure, 0.5),
                                    reference.hypergrad(grad.contiguous(), weight, scores, threshold, structure, 0.5)):
            assert result.is_contiguous() and result.stride() == expected.stride()
            torch.testing.assert_close(result, expected, **EXACT)


class _NoLaunch:
    """What wrap_triton does with a launch under torch.compile's fake tensors: nothing (the interpreter
    cannot run a kernel on them)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("layout", [*LAYOUTS, "permuted_5d"])
def test_fake_results_promise_the_strides_of_the_real_ones(monkeypatch, seed, layout):
    """A triton_op's fake kernel (what torch.compile and torch.export plan with) is its own body run on
    fake tensors: with the launches left out, as wrap_triton leaves them, its results have the strides
    of the eager results, those of the reference, in every layout, empty weights of odd strides included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bipkernels.triton import hypergrad, masked_weight

    bipkernels_triton.load()
    kernels = torch.ops.bipkernels_triton
    threshold = torch.tensor([0.5, 7.0], dtype=torch.float64)
    scores, weight, grad = _layout_inputs(layout, False)
    empty = torch.empty(0, 3, 4, dtype=torch.float64).as_strided((0, 3, 4), (1, 7, 100))
    for tensors in ((scores, weight, grad), (empty, empty, empty), (scores.contiguous(), weight, grad)):
        eager = [kernels.masked_weight(tensors[1], tensors[0], threshold, 0, 1, 1, 1),
                 *kernels.hypergrad(tensors[2], tensors[1], tensors[0], threshold, 0, 1, 1, 1, 0.5, 0)]
        structure = parse_structure("unstructured")
        want = [reference.masked_weight(tensors[1], tensors[0], threshold, structure),
                *reference.hypergrad(tensors[2], tensors[1], tensors[0], threshold, structure, 0.5)]
        assert [t.stride() for t in eager] == [t.stride() for t in want]
        with monkeypatch.context() as patch, FakeTensorMode() as mode:
            for module in (masked_weight, hypergrad):
                patch.setattr(module, "traceable", lambda kernel: _NoLaunch())
            fakes = [mode.from_tensor(t) for t in (*tensors, threshold)]
            planned = [kernels.masked_weight(fakes[1], fakes[0], fakes[3], 0, 1, 1, 1),
                       *kernels.hypergrad(fakes[2], fakes[1], fakes[0], fakes[3], 0, 1, 1, 1, 0.5, 0)]
        assert [t.stride() for t in planned] == [t.stride() for t in eager]


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,), (3, 0, 2, 2)])
@pytest.mark.parametrize("name", ["unstructured", "filter", "channel", "tile2x2"])
def test_empty_tensors(triton_backend, shape, name):
    structure = parse_structure(name)
    scores = torch.empty(shape)
    threshold = KEEP_ALL
    blocks = ops.block_scores(scores, structure)
    torch.testing.assert_close(blocks, reference.block_scores(scores, structure), **EXACT)  # filter of (4, 0): zeros
    # Shape and dtype as the reference gives them (results of no elements are still tensors of a kind).
    results = [ops.block_mask(scores, threshold, structure), ops.masked_weight(scores, scores, threshold, structure),
               *ops.hypergrad(scores, scores, scores, threshold, structure, inv_gamma=0.1)]
    expected = [reference.block_mask(scores, threshold, structure),
                reference.masked_weight(scores, scores, threshold, structure),
                *reference.hypergrad(scores, scores, scores, threshold, structure, 0.1)]
    for result, want in zip(results, expected):
        assert (result.shape, result.dtype) == (want.shape, want.dtype)


def test_compiled_ops_name_the_op_in_errors():
    bipkernels_triton.load()
    kernels = torch.ops.bipkernels_triton
    with pytest.raises(ValueError, match="bipkernels.block_scores: .*not a multiple of M = 4"):
        kernels.block_scores(torch.ones(3, 6), *parse_structure("2:4").op_args())
    with pytest.raises(ValueError, match="bipkernels.masked_weight: threshold must be float64"):
        kernels.masked_weight(torch.ones(3), torch.ones(3), torch.zeros(2), *parse_structure("unstructured").op_args())
    with pytest.raises(ValueError, match="bipkernels.hypergrad: scores has shape"):
        kernels.hypergrad(torch.ones(3), torch.ones(3), torch.ones(4), KEEP_ALL, 0, 0, 0, 1, 0.0, 0)
    with pytest.raises(ValueError, match="bipkernels.hypergrad: implicit must be 0"):
        kernels.hypergrad(torch.ones(3), torch.ones(3), torch.ones(3), KEEP_ALL, 0, 0, 0, 1, 0.0, 2)
    for inv_gamma, arithmetic in [(-1.0, "float32"), (float("nan"), "float32"), (1e39, "float32")]:
        with pytest.raises(ValueError, match=rf"bipkernels.hypergrad: inv_gamma must be a number in \[0, .*\] "
                                             rf"\(the torch.{arithmetic} arithmetic of torch.float32 weights\)"):
            kernels.hypergrad(*(torch.ones(3),) * 3, KEEP_ALL, 0, 0, 0, 1, inv_gamma, 0)
    with pytest.raises(ValueError, match="bipkernels.masked_linear_grad_weight: inv_gamma must be a number in"):
        kernels.masked_linear_grad_weight(torch.ones(2, 3), torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4),
                                          KEEP_ALL, 0, 0, 0, 1, float("inf"), 0)
    ones = torch.ones(3, dtype=torch.float64)  # 1e39 is finite in float64
    assert kernels.hypergrad(ones, ones, ones, KEEP_ALL, 0, 0, 0, 1, 1e39, 0)[1].isfinite().all()
    with pytest.raises(TypeError, match="bipkernels.block_mask: scores must be one of"):
        kernels.block_mask(torch.ones(3, dtype=torch.int32), KEEP_ALL, 0, 0, 0, 1)


@pytest.mark.parametrize("name", ["unstructured", "filter", "channel", "2:4", "tile3x5"])
def test_gradients_through_the_ops_equal_the_torch_backends(monkeypatch, seed, name):
    """The triton ops' registered derivatives (bipkernels.op_autograd): masked_weight gives m ⊙ g to the
    weight, block_scores the reference's derivative, as the torch backend does."""
    structure = parse_structure(name, p=2)
    scores = tied_scores((5, 8, 3, 1), torch.float64)  # block sums exact in any order: the same masks
    threshold = reference.topk_threshold([reference.block_scores(scores, structure)], 7)[0] \
        if structure.uses_threshold else None
    grad = torch.randn(5, 8, 3, 1, dtype=torch.float64)
    weight = torch.randn(5, 8, 3, 1, dtype=torch.float64)
    gradients = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("BIPKERNELS_BACKEND", backend)
        leaf_weight, leaf_scores = weight.clone().requires_grad_(), scores.clone().requires_grad_()
        ops.masked_weight(leaf_weight, leaf_scores, threshold, structure).backward(grad)
        blocks = ops.block_scores(leaf_scores, structure)
        blocks.backward(torch.arange(blocks.numel(), dtype=torch.float64).reshape(blocks.shape))
        gradients[backend] = (leaf_weight.grad, leaf_scores.grad)
    assert torch.equal(gradients["triton"][0], gradients["torch"][0])
    torch.testing.assert_close(gradients["triton"][1], gradients["torch"][1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("implicit", IMPLICIT_FORMS)
def test_hypergrad_without_the_implicit_term_where_g_squared_overflows(triton_backend, seed, implicit):
    """inv_gamma = 0 gives θ ⊙ g where g ⊙ g overflows float32 (0 · inf would be NaN), as the reference."""
    grad = (torch.rand(6, 7, dtype=torch.float64) + 1).mul(2e19).float()  # g ⊙ g past float32's 3.4e38
    weight = torch.randn(6, 7, dtype=torch.float64).mul(1e-20).float()
    scores, structure = torch.rand(6, 7), parse_structure("unstructured")
    results = ops.hypergrad(grad, weight, scores, KEEP_ALL, structure, inv_gamma=0.0, implicit=implicit)
    expected = reference.hypergrad(grad, weight, scores, KEEP_ALL, structure, inv_gamma=0.0, implicit=implicit)
    assert not bool(results[1].isnan().any())
    for result, reference_result in zip(results, expected):
        assert_close(result, reference_result)


def test_nm_reads_no_threshold_wherever_it_lies(triton_backend, seed):
    """N:M ignores the threshold, on every backend: one on another device (meta stands in for a CPU
    threshold beside GPU scores, which the launcher would refuse as a pointer) changes nothing."""
    structure = parse_structure("2:4")
    scores, weight, grad = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    elsewhere = torch.zeros(2, dtype=torch.float64, device="meta")
    assert torch.equal(ops.block_mask(scores, elsewhere, structure), reference.block_mask(scores, None, structure))
    assert torch.equal(ops.masked_weight(weight, scores, elsewhere, structure),
                       reference.masked_weight(weight, scores, None, structure))
    for result, expected in zip(ops.hypergrad(grad, weight, scores, elsewhere, structure),
                                reference.hypergrad(grad, weight, scores, None, structure)):
        assert_close(result, expected.double())
