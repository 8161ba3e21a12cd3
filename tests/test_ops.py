"""Every op on every available backend against the reference, on fresh random inputs: discrete outputs
(masks, thresholds, kept counts) exactly, floating outputs within the tolerance of their dtype."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bipkernels
from bipkernels import ops, reference
from bipkernels.structures import parse_structure

from conftest import (HAS_CPU_KERNELS, LAYOUTS, SHAPES, STRUCTURES, check_topk_threshold_under_vmap, fits,
                      force_backend, score_lists, tied_scores, topk_ks, with_specials)

needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the compiled extension is not built")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def backend_threshold(scores, structure, k_fraction=0.5):
    """A threshold that cuts through the blocks of ``scores`` (None for N:M)."""
    if not structure.uses_threshold:
        return None
    block_scores = reference.block_scores(scores, structure)
    return reference.topk_threshold([block_scores], int(block_scores.numel() * k_fraction))[0]


@needs_cpu_kernels
@pytest.mark.parametrize("structure_name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1, 2])
def test_block_scores(monkeypatch, seed, structure_name, shape, p):
    if not fits(structure_name, shape):
        pytest.skip("structure does not fit the shape")
    force_backend(monkeypatch, "cpu")
    structure = parse_structure(structure_name, p)
    strided = torch.randn(shape).mT if len(shape) == 2 else torch.randn(shape)
    for scores in (tied_scores(shape), torch.randn(shape, dtype=torch.float64), strided):
        got, want = ops.block_scores(scores, structure), reference.block_scores(scores, structure)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)  # both sum in math.h's canonical order


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1], [0], [97], [13, 0, 7, 64], [4096, 3]])
def test_topk_threshold(monkeypatch, seed, dtype, sizes):
    force_backend(monkeypatch, "cpu")
    total = sum(sizes)
    for tensors in ([with_specials(tied_scores((n,), dtype, levels=4).abs()) for n in sizes],
                    [torch.rand(n, dtype=torch.float64).to(dtype) for n in sizes]):
        for k in sorted({0, 1, total // 7, total // 2, total, total + 3}):
            got = ops.topk_threshold(tensors, k)
            want = reference.topk_threshold(tensors, k)
            assert torch.equal(got, want), (k, got, want)
            kept = sum(int(reference.kept_blocks(t.to(reference.score_dtype(dtype)), row).sum())
                       for t, row in zip(tensors, got))
            assert kept == min(k, sum(int((~t.isnan()).sum()) for t in tensors))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_threshold_under_vmap_equals_the_reference_per_entry(monkeypatch, seed, backend, dtype):
    """The cpu op had no batching rule (its scores are a list, which vmap's fallback cannot split):
    torch.vmap raised "Batching rule not implemented", where the torch backend's reference vmaps."""
    force_backend(monkeypatch, backend)
    # The reference's sort and gather do not take vmap's empty batch (torch's limit); the rule does.
    check_topk_threshold_under_vmap(dtype, empty_batch=backend != "torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_threshold_absolute_equals_the_unstructured_block_scores_first(monkeypatch, seed, backend, dtype):
    # Signed scores with ties, NaN, ±inf and -0.0: ranking |s| in place must equal ranking block_scores(s).
    force_backend(monkeypatch, backend)
    for tensors in score_lists([300, 0, 45, 129], dtype):
        signed = [t * (torch.randint(0, 2, t.shape) * 2 - 1).to(dtype) for t in tensors]
        block_scores = [reference.block_scores(t, parse_structure("unstructured")) for t in signed]
        for k in topk_ks(474):
            want = reference.topk_threshold(block_scores, k)
            assert torch.equal(ops.topk_threshold(signed, k, absolute=True), want), k
            assert torch.equal(ops.topk_threshold(signed[0], k, absolute=True), reference.topk_threshold(
                block_scores[:1], k)[0]), k


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_threshold_signed_zeros_are_one_score(monkeypatch, seed, backend, dtype):
    """+0.0 and -0.0 are one score: where the k-th score is 0, its ties (of either sign) go to the lowest
    global index. The select's keys fold -0.0 onto +0.0 (select.h key_of_bits); unfolded, -0.0 ranked
    below +0.0 and the count of kept ties went wrong."""
    force_backend(monkeypatch, backend)
    sizes = [37, 0, 50]
    tensors = [(torch.rand(n, dtype=torch.float64) < 0.5).double() * torch.rand(n, dtype=torch.float64) for n in sizes]
    tensors = [torch.where(torch.rand(n) < 0.5, -t, t).to(dtype) for n, t in zip(sizes, tensors)]  # ±0.0
    zeros = sum(int((t == 0).sum()) for t in tensors)
    for k in range(sum(sizes) - zeros, sum(sizes) + 1):  # the k-th score is 0 (or all are kept)
        want = reference.topk_threshold(tensors, k)
        assert torch.equal(ops.topk_threshold(tensors, k), want), k


@needs_cpu_kernels
def test_topk_threshold_wide_ranges_and_signs(monkeypatch, seed):
    # Keys across the whole float range, negatives and subnormals: every radix digit is exercised.
    force_backend(monkeypatch, "cpu")
    bits = torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    for dtype_values in (values, values.double() * 1e200):
        for k in (1, 17, 2500, 4999):
            assert torch.equal(ops.topk_threshold([dtype_values[:3000], dtype_values[3000:]], k),
                               reference.topk_threshold([dtype_values[:3000], dtype_values[3000:]], k))


@needs_cpu_kernels
@pytest.mark.parametrize("structure_name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_masked_weight_hypergrad(monkeypatch, seed, structure_name, shape, dtype):
    if not fits(structure_name, shape):
        pytest.skip("structure does not fit the shape")
    force_backend(monkeypatch, "cpu")
    structure = parse_structure(structure_name, p=int(torch.randint(1, 3, ()).item()))
    scores = with_specials(tied_scores(shape, dtype, levels=8))
    weight = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    threshold = backend_threshold(scores, structure, k_fraction=float(torch.rand(())))
    mask = ops.block_mask(scores, threshold, structure)
    assert torch.equal(mask, reference.block_mask(scores, threshold, structure))
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight, scores, threshold, structure))
    for implicit in ("paper", "released"):
        inv_gamma = float(torch.rand(()))
        got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=inv_gamma, implicit=implicit)
        want = reference.hypergrad(grad, weight, scores, threshold, structure, inv_gamma, implicit)
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == weight.shape
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@needs_cpu_kernels
@pytest.mark.parametrize("structure_name", STRUCTURES)
def test_masks_across_parallel_chunks(monkeypatch, seed, structure_name):
    """Past the CPU kernels' grain (32768 elements) at::parallel_for splits [0, n) into ceil(n / tasks)-element
    chunks, here ones that start inside a 3x3 kernel window and inside an N:M group: each chunk must pick
    up its first element's block, run and group position."""
    force_backend(monkeypatch, "cpu")
    shape, tasks = (1214, 12, 3, 3), 5
    numel = math.prod(shape)
    chunk = -(-numel // tasks)
    assert numel > (tasks - 1) * 32768 and chunk % 9 and chunk % (3 * 9) and chunk % (4 * 9)
    threads = torch.get_num_threads()
    torch.set_num_threads(tasks)
    try:
        structure = parse_structure(structure_name)
        scores = tied_scores(shape, torch.float32, levels=64)
        weight, grad = torch.randn(shape), torch.randn(shape)
        threshold = backend_threshold(scores, structure, k_fraction=float(torch.rand(())))
        assert torch.equal(ops.block_mask(scores, threshold, structure),
                           reference.block_mask(scores, threshold, structure))
        assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                           reference.masked_weight(weight, scores, threshold, structure))
        got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5)
        want = reference.hypergrad(grad, weight, scores, threshold, structure, 0.5, "paper")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


@needs_cpu_kernels
@pytest.mark.parametrize("layout", ["contiguous"] + list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_unstructured_ties_in_some_batches_only(monkeypatch, seed, layout, dtype):
    """The CPU unstructured kernels decide a batch of 1024 elements (in memory order) by |s| > value alone and
    decide again by the whole rule (the tie cut, by logical index) only a batch that holds a tie at the
    threshold: random scores with ties of the threshold value in the first two batches only, cut among the
    ties, give the reference's results bit for bit."""
    force_backend(monkeypatch, "cpu")
    shape, batch = (16, 24, 3, 3), 1024  # 3456 elements: 4 batches, the last one partial
    structure = parse_structure("unstructured")
    to_layout = LAYOUTS.get(layout, lambda t: t)
    scores, weight, grad = (to_layout(torch.randn(shape, dtype=torch.float64).to(dtype)) for _ in range(3))
    in_memory_order = scores.as_strided((scores.numel(),), (1,))
    later = in_memory_order[2 * batch:]
    tie_value = later.abs().median()  # later batches hold scores on both sides of it, and none equal to it
    later[later.abs() == tie_value] *= 0.5
    places = torch.randperm(2 * batch)[:6]
    in_memory_order[places] = tie_value * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=dtype)
    ties = int((scores.abs() == tie_value).sum())
    k = int((scores.abs() > tie_value).sum()) + int(torch.randint(1, ties, ()))  # some ties kept, some not
    threshold = reference.topk_threshold([scores.abs()], k)[0]
    assert threshold[0] == tie_value and 0 < threshold[1] < scores.numel()
    assert not (later.abs() == tie_value).any()
    mask = ops.block_mask(scores, threshold, structure)
    assert torch.equal(mask, reference.block_mask(scores, threshold, structure)) and int(mask.sum()) == k
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight, scores, threshold, structure))
    for implicit in ("paper", "released"):
        got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5, implicit=implicit)
        for g, w in zip(got, reference.hypergrad(grad, weight, scores, threshold, structure, 0.5, implicit)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@needs_cpu_kernels
@pytest.mark.parametrize("structure_name, shape", [
    ("2:4", (3, 8, 17, 17)),  # groups of 4 * 289 elements: longer than a batch, decided one by one
    ("2:4", (3, 4, 16, 16)),  # groups of exactly one batch (1024 elements)
    ("3:8", (5, 16, 5, 5)),  # five groups of 200 to a batch
    ("1:2", (700, 6)),  # a Linear weight: 2-element groups, 512 to a batch
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_masks_for_every_group_extent(monkeypatch, seed, structure_name, shape, dtype):
    """The CPU N:M kernels decide a batch of whole groups at a time (up to 1024 elements), each element against
    the rivals at one distance at a time, and decide one by one the elements within a group's extent of the
    tensor's ends and groups longer than a batch: every group extent gives the reference's results bit for
    bit, ties, NaN and infinities included."""
    force_backend(monkeypatch, "cpu")
    structure = parse_structure(structure_name)
    scores = with_specials(tied_scores(shape, dtype, levels=4))
    weight, grad = torch.randn(shape, dtype=torch.float64).to(dtype), torch.randn(shape, dtype=torch.float64).to(dtype)
    assert torch.equal(ops.block_mask(scores, None, structure), reference.block_mask(scores, None, structure))
    assert torch.equal(ops.masked_weight(weight, scores, None, structure),
                       reference.masked_weight(weight, scores, None, structure))
    got = ops.hypergrad(grad, weight, scores, None, structure, inv_gamma=0.5)
    want = reference.hypergrad(grad, weight, scores, None, structure, 0.5, "paper")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@needs_cpu_kernels
def test_pruned_nan_and_inf_weights_give_zero(monkeypatch, seed):
    force_backend(monkeypatch, "cpu")
    weight = torch.full((6, 7), float("nan"))
    weight[0, 0] = float("inf")
    scores = torch.rand(6, 7)
    threshold = ops.topk_threshold(scores, 0)
    assert threshold.shape == (2,)
    assert torch.equal(ops.masked_weight(weight, scores, threshold), torch.zeros(6, 7))
    grad_weight, _ = ops.hypergrad(torch.full((6, 7), float("inf")), weight, scores, threshold)
    assert torch.equal(grad_weight, torch.zeros(6, 7))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("implicit", ["paper", "released"])
def test_hypergrad_without_the_implicit_term_is_the_direct_one_where_g_squared_overflows(monkeypatch, seed, backend,
                                                                                          implicit):
    """inv_gamma = 0 (HYDRA) gives θ ⊙ g even where g ⊙ g overflows float32 (0 · inf would be NaN); with
    inv_gamma > 0 the overflowed term dominates as -inf, never NaN."""
    force_backend(monkeypatch, backend)
    grad = (torch.rand(6, 7, dtype=torch.float64) + 1).mul(2e19).float()  # g ⊙ g past float32's 3.4e38
    weight = torch.randn(6, 7, dtype=torch.float64).mul(1e-20).float()
    scores, threshold = torch.rand(6, 7), torch.tensor([float("-inf"), float("inf")], dtype=torch.float64)
    direct = (weight.double() * grad.double()).float()
    for inv_gamma in (0.0, 1e-50):  # 1e-50 is 0 in float32, where the term is computed
        _, grad_scores = ops.hypergrad(grad, weight, scores, threshold, inv_gamma=inv_gamma, implicit=implicit)
        torch.testing.assert_close(grad_scores, direct, rtol=1e-6, atol=0)
    _, grad_scores = ops.hypergrad(grad, weight, scores, threshold, inv_gamma=1e-4, implicit="paper")
    assert bool((grad_scores == float("-inf")).all()), grad_scores


@needs_cpu_kernels
@pytest.mark.parametrize("structure_name", ["unstructured", "filter", "2:4", "tile3x5"])
def test_non_contiguous_inputs(monkeypatch, seed, structure_name):
    force_backend(monkeypatch, "cpu")
    structure = parse_structure(structure_name)
    weight = torch.randn(12, 16, dtype=torch.float64)[:, ::2]  # a strided view
    scores = tied_scores((8, 12)).t()  # transposed strides; exact block sums in any order
    grad = torch.randn(8, 12, dtype=torch.float64).t()
    assert not weight.is_contiguous() and not scores.is_contiguous() and not grad.is_contiguous()
    threshold = backend_threshold(scores, structure)
    assert torch.equal(ops.block_scores(scores, structure), reference.block_scores(scores, structure))
    assert torch.equal(ops.masked_weight(weight, scores, threshold, structure),
                       reference.masked_weight(weight, scores, threshold, structure))
    for got, want in zip(ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5),
                         reference.hypergrad(grad, weight, scores, threshold, structure, 0.5)):
        assert torch.equal(got, want)


@needs_cpu_kernels
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("structure_name", ["unstructured", "filter", "channel", "2:4", "tile3x5"])
@pytest.mark.parametrize("mixed", [False, True])
def test_dense_layouts(monkeypatch, seed, layout, structure_name, mixed):
    """masked_weight and hypergrad over channels_last (or any dense) weights: an unstructured mask runs
    over memory order and its results keep the weight's layout (no copies in or out); structured masks,
    or tensors of different layouts (``mixed``: the scores contiguous), run on contiguous copies. The
    values equal the reference either way."""
    force_backend(monkeypatch, "cpu")
    structure = parse_structure(structure_name)
    to_layout = LAYOUTS[layout]
    weight, grad = (to_layout(torch.randn(6, 12, 3, 5, dtype=torch.float64)) for _ in range(2))
    scores = tied_scores((6, 12, 3, 5))
    scores = scores if mixed else to_layout(scores)
    assert not weight.is_contiguous() and scores.is_contiguous() == mixed
    threshold = backend_threshold(scores, structure)
    in_memory_order = structure_name == "unstructured" and not mixed
    expected_strides = weight.stride() if in_memory_order else torch.empty(weight.shape).stride()
    masked = ops.masked_weight(weight, scores, threshold, structure)
    want = reference.masked_weight(weight, scores, threshold, structure)
    assert masked.stride() == want.stride() == expected_strides  # torch.equal alone would not see strides
    assert torch.equal(masked, want)
    got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5, implicit="released")
    for result, want in zip(got, reference.hypergrad(grad, weight, scores, threshold, structure, 0.5, "released")):
        assert result.stride() == want.stride() == expected_strides
        assert torch.equal(result, want)


@needs_cpu_kernels
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hypergrad_of_a_gradient_in_another_layout(monkeypatch, seed, layout):
    """hypergrad where only the gradient's layout differs from the weight's and the scores' (autograd may
    hand a contiguous gradient to a channels_last weight): the unstructured mask cannot run over memory
    order, the results are contiguous and equal the reference."""
    force_backend(monkeypatch, "cpu")
    structure = parse_structure("unstructured")
    weight, scores = LAYOUTS[layout](torch.randn(6, 12, 3, 5, dtype=torch.float64)), \
        LAYOUTS[layout](tied_scores((6, 12, 3, 5)))
    grad = torch.randn(6, 12, 3, 5, dtype=torch.float64)
    threshold = backend_threshold(scores, structure)
    got = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5, implicit="released")
    for result, want in zip(got, reference.hypergrad(grad, weight, scores, threshold, structure, 0.5, "released"),
                            strict=True):
        assert result.is_contiguous()
        assert torch.equal(result, want)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("shape", [(6, 12, 1, 5), (6, 12, 3, 1), (6, 1, 3, 5), (1, 12, 3, 5)])
@pytest.mark.parametrize("size_one_stride", ["channels_last", "zero"])
def test_dense_layouts_with_a_dimension_of_size_one(monkeypatch, seed, backend, shape, size_one_stride):
    """A channels_last weight with a dimension of size 1 (a (1, k) kernel, one input channel) is dense
    whatever that dimension's stride (c10 ignores it; 0 where it was expanded, which the kernels' memory
    order must not divide by): an unstructured mask keeps the weight's layout on every backend and in the
    fake kernels (reference.keeps_weight_layout), as the kernels do."""
    force_backend(monkeypatch, backend)

    def arranged(tensor):
        tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor if size_one_stride == "channels_last" else \
            tensor.as_strided(shape, [0 if size == 1 else stride for size, stride in zip(shape, tensor.stride())])

    weight, grad = (arranged(torch.randn(shape, dtype=torch.float64)) for _ in range(2))
    scores = arranged(tied_scores(shape))
    threshold = backend_threshold(scores, parse_structure("unstructured"))
    assert reference.keeps_weight_layout(parse_structure("unstructured"), weight, scores, grad)
    masked = ops.masked_weight(weight, scores, threshold)
    assert masked.stride() == weight.stride()
    assert torch.equal(masked, torch.where(reference.block_mask(scores.contiguous(), threshold,
                                                                parse_structure("unstructured")), weight, 0.0))
    for result in ops.hypergrad(grad, weight, scores, threshold, inv_gamma=0.5):
        assert result.stride() == weight.stride()
    if backend == "cpu":  # the fake kernels give the real results' strides
        torch.library.opcheck(torch.ops.bipkernels.masked_weight.default, (weight, scores, threshold, 0, 1, 1, 1))
        torch.library.opcheck(torch.ops.bipkernels.hypergrad.default,
                              (grad, weight, scores, threshold, 0, 1, 1, 1, 0.5, 0))


@needs_cpu_kernels
@pytest.mark.parametrize("dims", [8, 9])
def test_permuted_layouts_keep_the_weight_layout_up_to_the_kernels_eight_dims(monkeypatch, seed, dims):
    """A dense permuted weight of at most 8 dims (MemoryOrder::kMaxDims) runs over memory order in the C++
    kernels and keeps its layout; one of 9 runs on contiguous copies. The reference (the torch backend) and
    the fake kernels torch.compile plans with (reference.keeps_weight_layout) must give the same strides."""
    shape = (2,) * dims
    order = [*range(1, dims, 2), *range(0, dims, 2)]  # no two neighbouring dims lie together
    permuted = lambda t: t.permute(order).contiguous().permute(sorted(range(dims), key=order.__getitem__))
    weight, grad, scores = permuted(torch.randn(shape, dtype=torch.float64)), \
        permuted(torch.randn(shape, dtype=torch.float64)), permuted(tied_scores(shape))
    assert not weight.is_contiguous() and weight.stride() == scores.stride() == grad.stride()
    structure = parse_structure("unstructured")
    threshold = backend_threshold(scores, structure)
    expected = weight.stride() if dims <= 8 else torch.empty(shape).stride()
    for backend in ("cpu", "torch"):
        force_backend(monkeypatch, backend)
        results = [ops.masked_weight(weight, scores, threshold, structure),
                   *ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.5)]
        assert [result.stride() for result in results] == [expected] * 3, backend
        assert torch.equal(results[0], reference.masked_weight(weight, scores, threshold, structure))
    torch.library.opcheck(torch.ops.bipkernels.masked_weight.default, (weight, scores, threshold, 0, 1, 1, 1))
    torch.library.opcheck(torch.ops.bipkernels.hypergrad.default, (grad, weight, scores, threshold, 0, 1, 1, 1, 0.5, 0))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_empty_results_have_standard_strides(monkeypatch, backend):
    """An empty tensor counts as contiguous whatever its strides, so .contiguous() kept the (1, 0) of
    empty scores in the reference's results while the C++ kernels gave (1, 1) (a property test's find)."""
    force_backend(monkeypatch, backend)
    weight = torch.randn(0, 1, dtype=torch.float64)
    scores = torch.zeros(1, dtype=torch.float64).expand(0, 1)  # strides (1, 0)
    threshold = ops.topk_threshold(ops.block_scores(scores, "unstructured"), 0)
    results = [ops.masked_weight(weight, scores, threshold, "unstructured"),
               *ops.hypergrad(weight, weight, scores, threshold, "unstructured", 0.1)]
    assert [result.stride() for result in results] == [(1, 1)] * 3


@needs_cpu_kernels
def test_empty_results_of_one_layout_keep_it_in_every_kernel(monkeypatch):
    """An empty weight is dense for c10 whatever its strides: with scores and grad of its strides, the C++
    kernels keep them (empty_like), and so must the reference and the fake kernel that torch.compile
    plans with (the reference's density test had skipped only sizes below 2: contiguous there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight = torch.empty(0, 3, 4, dtype=torch.float64).as_strided((0, 3, 4), (1, 7, 100))
    threshold = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
    for backend in ("torch", "cpu"):
        force_backend(monkeypatch, backend)
        results = [ops.masked_weight(weight, weight, threshold), *ops.hypergrad(weight, weight, weight, threshold)]
        assert [result.stride() for result in results] == [(1, 7, 100)] * 3, backend
    with FakeTensorMode() as mode:
        fake_weight, fake_threshold = mode.from_tensor(weight), mode.from_tensor(threshold)
        masked = torch.ops.bipkernels.masked_weight(fake_weight, fake_weight, fake_threshold, 0, 0, 0, 1)
        grads = torch.ops.bipkernels.hypergrad(*(fake_weight,) * 3, fake_threshold, 0, 0, 0, 1, 0.0, 0)
    assert [result.stride() for result in (masked, *grads)] == [(1, 7, 100)] * 3


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_pruned_gradient_keeps_a_nan_bit_for_bit(monkeypatch, backend):
    """grad_θ is a select of g: a bfloat16 NaN comes back with its bits (the reference's round trip
    through float32 made 0x7FC0 into 0xFFFF)."""
    force_backend(monkeypatch, backend)
    grad = torch.tensor([math.nan, 1.0, -2.5], dtype=torch.bfloat16)
    ones = torch.ones(3, dtype=torch.bfloat16)
    keep_all = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
    grad_weight, _ = ops.hypergrad(grad, ones, ones, keep_all)
    assert torch.equal(grad_weight.view(torch.int16), grad.view(torch.int16))


@pytest.mark.parametrize("structure_name", STRUCTURES)
def test_topk_masks_exact_count_and_order(seed, structure_name):
    """The masks of topk_masks are the reference's (a top-k of the reference's block scores): k blocks
    kept over both tensors, each kept block scoring at least every pruned one; N:M keeps N of every M."""
    structure = parse_structure(structure_name)
    scores_list = [tied_scores((8, 12, 3, 3), levels=4), tied_scores((10, 24), levels=4)]
    if not structure.uses_threshold:
        for scores, mask in zip(scores_list, bipkernels.topk_masks(scores_list, None, structure)):
            assert torch.equal(mask, reference.block_mask(scores, None, structure.fitted(scores.shape)))
            assert int(mask.sum()) == scores.numel() * structure.a // structure.b
        return
    fitted = [structure.fitted(s.shape) for s in scores_list]
    block_scores = [reference.block_scores(s, f) for s, f in zip(scores_list, fitted)]
    total = sum(b.numel() for b in block_scores)
    for k in (0, 1, total // 3, total):
        thresholds = reference.topk_threshold(block_scores, k)
        kept_blocks = [reference.kept_blocks(b, t) for b, t in zip(block_scores, thresholds)]
        assert sum(int(kb.sum()) for kb in kept_blocks) == k
        kept_values = torch.cat([b.reshape(-1)[kb] for b, kb in zip(block_scores, kept_blocks)])
        pruned_values = torch.cat([b.reshape(-1)[~kb] for b, kb in zip(block_scores, kept_blocks)])
        if len(kept_values) and len(pruned_values):
            assert kept_values.min() >= pruned_values.max()
        masks = bipkernels.topk_masks(scores_list, k, structure)
        for scores, mask, threshold, f in zip(scores_list, masks, thresholds, fitted):
            assert torch.equal(mask, reference.block_mask(scores, threshold, f)), k


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_tiles_past_the_matrix_are_cut_to_it(monkeypatch, seed, backend):
    """A tile taller or wider than the weight is cut at its edge: tile 1x(2^63 - 1) on a (5, 2, 3) weight
    is one block per row, as tile1x6 is. Huge sizes overflowed the C++ index arithmetic (a wrong shape, a
    crash) and made the reference pad to the full tile."""
    force_backend(monkeypatch, backend)
    huge = 2**63 - 1
    scores, weight, grad = (torch.randn(5, 2, 3) for _ in range(3))
    for name, cut in ((f"tile1x{huge}", "tile1x6"), (f"tile{huge}x1", "tile5x1"), (f"tile{huge}x{huge}", "tile5x6"),
                      ("tile7x4", "tile5x4")):
        blocks = ops.block_scores(scores, name)
        assert torch.equal(blocks, reference.block_scores(scores, parse_structure(cut))), name
        threshold = reference.topk_threshold([blocks], blocks.numel() // 2)[0]
        want = reference.hypergrad(grad, weight, scores, threshold, parse_structure(cut), 0.3)
        assert torch.equal(ops.block_mask(scores, threshold, name),
                           reference.block_mask(scores, threshold, parse_structure(cut))), name
        got = ops.hypergrad(grad, weight, scores, threshold, name, inv_gamma=0.3)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), name
    if backend == "cpu":  # the registered op itself, called without the Python wrapper
        assert torch.equal(torch.ops.bipkernels.block_scores(scores, 4, huge, huge, 1),
                           reference.block_scores(scores, parse_structure("tile5x6")))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_block_scores_do_not_depend_on_the_memory_layout(monkeypatch, seed, backend):
    """float64 sums round by their order: the same values stored transposed or channels_last must give the
    block scores of the reference on contiguous values, bit for bit (torch's sum follows the layout). Each
    layout is compared with the reference, not with the backend's own contiguous result, which a wrong
    kernel would match."""
    force_backend(monkeypatch, backend)
    scores = torch.randn(24, 40, dtype=torch.float64)
    conv = torch.randn(16, 24, 3, 3, dtype=torch.float64)
    for name in ("filter", "channel", "tile3x5"):
        structure = parse_structure(name)
        for values, stored in ((scores, scores.t().contiguous().t()),
                               (conv, conv.to(memory_format=torch.channels_last))):
            want = reference.block_scores(values, structure)
            assert torch.equal(ops.block_scores(values, structure), want), name
            assert torch.equal(ops.block_scores(stored, structure), want), name


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inv_gamma_of_half_weights_is_bounded_by_float32(monkeypatch, seed, backend, dtype):
    """Half-type weights compute the hypergradient in float32, so inv_gamma is checked against float32's
    range (check_implicit_term), not the weights' own: 1e5 (past float16's 65504) is a valid setting and
    gives the reference's gradients; 1e39 (past float32's) is refused naming inv_gamma."""
    force_backend(monkeypatch, backend)
    structure = parse_structure("unstructured")
    scores = tied_scores((6, 8), dtype)
    weight, grad = (torch.randn(6, 8, dtype=torch.float64).mul(1e-3).to(dtype) for _ in range(2))
    threshold = backend_threshold(scores, structure)
    got = ops.hypergrad(grad, weight, scores, threshold, inv_gamma=1e5)
    want = reference.hypergrad(grad, weight, scores, threshold, structure, 1e5)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="inv_gamma"):
        ops.hypergrad(grad, weight, scores, threshold, inv_gamma=1e39)


def test_keep_count_rounding():
    assert ops.keep_count(10, 0.9) == 1
    assert ops.keep_count(5, 0.5) == 3  # round half up
    assert ops.keep_count(7, 0.0) == 7 and ops.keep_count(7, 1.0) == 0
    # Halves in decimal that floats miss: 1 - 0.9 = 0.09999999999999998, and so on.
    assert [ops.keep_count(n, s) for n, s in ((5, 0.9), (15, 0.9), (25, 0.34), (50, 0.99))] == [1, 2, 17, 1]
    for n in range(0, 120):  # against exact decimal arithmetic
        for hundredths in range(0, 101):
            kept = (100 - hundredths) * n  # hundredths of a block
            assert ops.keep_count(n, hundredths / 100) == (kept + 50) // 100, (n, hundredths)
    for bad in (-0.1, 1.5, "0.5", float("nan"), True):
        with pytest.raises(ValueError, match="sparsity"):
            ops.keep_count(10, bad)


@pytest.mark.parametrize("call, error, message", [
    (lambda: ops.block_scores(torch.ones(3, dtype=torch.int32)), TypeError, "scores must be float32"),
    (lambda: ops.block_scores(torch.ones(3, 6), "2:4"), ValueError, "block_scores: .*not a multiple of M = 4"),
    (lambda: ops.block_scores(torch.ones(3, 6), "5:4"), ValueError, "N <= M"),
    (lambda: ops.block_scores(torch.ones(3, 6), "tile0x2"), ValueError, "tile sizes must be positive"),
    (lambda: ops.block_scores(torch.ones(3, 6), "blocks"), ValueError, "cannot read 'blocks'"),
    (lambda: ops.block_scores(torch.ones(3, 6), p=3), ValueError, "p must be 1 or 2"),
    (lambda: ops.topk_threshold([torch.ones(3)], -1), ValueError, "k must be an int >= 0"),
    (lambda: ops.topk_threshold([torch.ones(3), torch.ones(3, dtype=torch.float64)], 1), ValueError,
     r"block_scores\[1\]"),
    (lambda: ops.masked_weight(torch.ones(3), torch.ones(4), torch.zeros(2, dtype=torch.float64)), ValueError,
     "scores has shape"),
    (lambda: ops.masked_weight(torch.ones(3), torch.ones(3), torch.zeros(2)), TypeError,
     "threshold must be a float64"),
    (lambda: ops.masked_weight(torch.ones(3), torch.ones(3), 0.5), TypeError,
     "threshold must be a float64 .* got float"),
    (lambda: ops.block_mask(torch.ones(3), torch.zeros(3, dtype=torch.float64)), ValueError,
     r"threshold must be a float64 tensor of shape \(2,\)"),
    (lambda: ops.topk_masks([torch.ones(3)], 1, "bogus"), ValueError, "bipkernels.topk_masks: .*bogus"),
    (lambda: ops.topk_masks([torch.ones(3)], None), ValueError, "bipkernels.topk_masks: k must be an int"),
    (lambda: ops.hypergrad(torch.ones(3), torch.ones(3), torch.ones(3), torch.zeros(2, dtype=torch.float64),
                           implicit="both"), ValueError, "implicit must be one of"),
    (lambda: ops.hypergrad(torch.ones(3), torch.ones(3), torch.ones(3), torch.zeros(2, dtype=torch.float64),
                           inv_gamma=float("nan")), ValueError, "inv_gamma must be a finite number"),
    # Finite in float64 but not in the float32 arithmetic: inf · 0 would be NaN at the pruned entries.
    (lambda: ops.hypergrad(torch.ones(3), torch.ones(3), torch.ones(3), torch.zeros(2, dtype=torch.float64),
                           inv_gamma=1e39), ValueError,
     r"bipkernels.hypergrad: inv_gamma \(in the torch.float32 arithmetic of torch.float32 weights\) must be a "
     r"number in \[0, 3.40282e\+38\], got 1e\+39"),
    (lambda: ops.masked_linear_backward(torch.ones(2, 3, dtype=torch.half), torch.ones(2, 4, dtype=torch.half),
                                        torch.ones(3, 4, dtype=torch.half), torch.ones(3, 4, dtype=torch.half),
                                        torch.zeros(2, dtype=torch.float64), inv_gamma=1e39), ValueError,
     r"inv_gamma \(in the torch.float32 arithmetic of torch.float16 weights\) must be a number in"),
    (lambda: ops.hypergrad("g", torch.ones(3), torch.ones(3), None), TypeError, "bipkernels.hypergrad: grad must be"),
    (lambda: ops.hypergrad(torch.ones(3), "θ", torch.ones(3), None), TypeError,
     "bipkernels.hypergrad: weight must be a tensor, got str"),
    (lambda: ops.topk_masks([torch.ones(2, 4)], 3, "2:4"), ValueError, "k must be None"),
])
def test_bad_arguments_name_the_op_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_cpu_kernels
def test_compiled_ops_reject_bad_input_with_the_op_name():
    with pytest.raises(RuntimeError, match="bipkernels.masked_weight: scores has shape"):
        torch.ops.bipkernels.masked_weight(torch.ones(3), torch.ones(4), torch.zeros(2, dtype=torch.float64),
                                           0, 0, 0, 1)
    with pytest.raises(RuntimeError, match="bipkernels.block_scores: N:M with M = 4"):
        torch.ops.bipkernels.block_scores(torch.ones(3, 6), 3, 2, 4, 1)
    keep_all = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bipkernels.block_scores: p must be 1 or 2, got 3"):
        torch.ops.bipkernels.block_scores(torch.ones(3, 6), 1, 1, 1, 3)
    with pytest.raises(RuntimeError, match="bipkernels.masked_weight: p must be 1 or 2, got 3"):
        torch.ops.bipkernels.masked_weight(torch.ones(3, 6), torch.ones(3, 6), keep_all, 1, 1, 1, 3)
    for inv_gamma, arithmetic in [(-1.0, "float32"), (float("nan"), "float32"), (1e39, "float32")]:
        with pytest.raises(RuntimeError, match=rf"bipkernels.hypergrad: inv_gamma must be a number in \[0, "
                                               rf".*\] \(the {arithmetic} arithmetic of Float weights\), got"):
            torch.ops.bipkernels.hypergrad(*(torch.ones(3),) * 3, keep_all, 0, 0, 0, 1, inv_gamma, 0)
    ones = torch.ones(3, dtype=torch.float64)  # 1e39 is finite in float64
    assert torch.ops.bipkernels.hypergrad(ones, ones, ones, keep_all, 0, 0, 0, 1, 1e39, 0)[1].isfinite().all()


def test_forced_backend_that_cannot_serve_raises(monkeypatch):
    force_backend(monkeypatch, "cuda")
    with pytest.raises(RuntimeError, match="BIPKERNELS_BACKEND=cuda cannot run on cpu"):
        ops.block_scores(torch.ones(3))
    force_backend(monkeypatch, "nonsense")
    with pytest.raises(ValueError, match="BIPKERNELS_BACKEND must be one of"):
        ops.block_scores(torch.ones(3))


def test_automatic_backend_choice(monkeypatch):
    monkeypatch.delenv("BIPKERNELS_BACKEND", raising=False)
    assert ops.backend_for("masked_weight", torch.device("cpu")) == ("cpu" if HAS_CPU_KERNELS else "torch")
    assert ops.backend_for("masked_weight", torch.device("meta")) == "torch"


@needs_cpu_kernels
def test_an_automatic_fallback_on_the_cpu_warns_once(monkeypatch):
    """A build that lacks one op's CPU kernel (a stale one) runs the reference with one warning, as on CUDA."""
    monkeypatch.delenv("BIPKERNELS_BACKEND", raising=False)
    monkeypatch.setitem(ops._KERNELS, "block_scores", [])
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(UserWarning, match="bipkernels.block_scores: the extension was built without a cpu kernel"):
        assert ops.backend_for("block_scores", torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend_for("block_scores", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
@pytest.mark.parametrize("structure_name", ["unstructured", "filter", "channel", "2:4", "tile3x5"])
def test_the_ops_differentiate_alike_on_every_backend(monkeypatch, seed, backend, structure_name):
    """masked_weight passes m ⊙ g to the weight and nothing to the scores; block_scores has the derivative
    of Σ|s| (sign(s) · g of the block) or Σs² (2s · g); thresholds and hypergradients carry none."""
    force_backend(monkeypatch, backend)
    for p in (1, 2):
        structure = parse_structure(structure_name, p)
        weight = torch.randn(6, 8, 3, 3, dtype=torch.float64, requires_grad=True)
        scores = torch.randn(6, 8, 3, 3, dtype=torch.float64, requires_grad=True)
        threshold = backend_threshold(scores.detach(), structure)
        grad = torch.randn(6, 8, 3, 3, dtype=torch.float64)
        ops.masked_weight(weight, scores, threshold, structure).backward(grad)
        mask = reference.block_mask(scores.detach(), threshold, structure)
        assert torch.equal(weight.grad, torch.where(mask, grad, 0.0)) and scores.grad is None
        blocks = ops.block_scores(scores, structure)
        block_grad = torch.randn_like(blocks)
        blocks.backward(block_grad)
        # g of each element's block: the derivative of Σ|x| at x = 1 (p = 1) spreads the blocks' g over them.
        ones = torch.ones_like(scores, requires_grad=True)
        spread = torch.autograd.grad(reference.block_scores(ones, parse_structure(structure_name, 1)), ones,
                                     block_grad)[0]
        # |s| itself for unstructured and N:M, whatever p
        derivative = 2 * scores.detach() if p == 2 and structure.kind in ("filter", "channel", "tile") else \
            scores.detach().sign()
        torch.testing.assert_close(scores.grad, derivative * spread, rtol=1e-12, atol=0)
        assert not ops.topk_threshold([scores], 5).requires_grad
        assert not any(t.requires_grad for t in ops.hypergrad(grad.requires_grad_(), weight, scores, threshold,
                                                               structure, inv_gamma=0.1))


@needs_cpu_kernels
@pytest.mark.parametrize("structure_name", ["unstructured", "filter", "channel", "2:4", "tile3x5"])
def test_opcheck(seed, structure_name):
    structure = parse_structure(structure_name)
    kind, a, b, p = structure.op_args()
    scores, weight, grad = (torch.randn(6, 8, 3, 3, dtype=torch.float64) for _ in range(3))
    threshold = backend_threshold(scores, structure)
    if threshold is None:
        threshold = torch.zeros(2, dtype=torch.float64)
    cases = [
        (torch.ops.bipkernels.block_scores.default, (scores, kind, a, b, p)),
        (torch.ops.bipkernels.topk_threshold.default, ([scores.abs(), weight.abs()], 100)),
        (torch.ops.bipkernels.topk_threshold.default, ([scores, weight], 100, True)),
        (torch.ops.bipkernels.block_mask.default, (scores, threshold, kind, a, b, p)),
        (torch.ops.bipkernels.masked_weight.default, (weight, scores, threshold, kind, a, b, p)),
        (torch.ops.bipkernels.hypergrad.default, (grad, weight, scores, threshold, kind, a, b, p, 0.1, 0)),
    ]
    # The same ops on channels_last tensors: the fake kernels must give the real results' strides.
    last = [t.contiguous(memory_format=torch.channels_last) for t in (scores, weight, grad)]
    cases += [
        (torch.ops.bipkernels.masked_weight.default, (last[1], last[0], threshold, kind, a, b, p)),
        (torch.ops.bipkernels.masked_weight.default, (last[1], scores, threshold, kind, a, b, p)),
        (torch.ops.bipkernels.hypergrad.default, (last[2], last[1], last[0], threshold, kind, a, b, p, 0.1, 1)),
        (torch.ops.bipkernels.hypergrad.default, (grad, last[1], last[0], threshold, kind, a, b, p, 0.1, 1)),
    ]
    # Inputs that require grad: the registered derivatives (op_autograd) under autograd and AOT dispatch.
    cases += [
        (torch.ops.bipkernels.block_scores.default, (scores.clone().requires_grad_(), kind, a, b, p)),
        (torch.ops.bipkernels.masked_weight.default,
         (weight.clone().requires_grad_(), scores, threshold, kind, a, b, p)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
