"""The triton topk_threshold against the float64 reference: rows (value, cut) equal exactly, for lists of
odd sizes with empty tensors among them, heavy ties (cuts inside a tensor, across several of the small
chunks the interpreter uses), NaN, ±inf, -0.0, arbitrary bit patterns (negative values, denormals, NaN
payloads, ranked as given and by |x|), k = 0, 1, ..., all and beyond, in every dtype."""

from __future__ import annotations

import pytest
import torch

from bipkernels import ops, reference

from conftest import DTYPES, check_topk_threshold_under_vmap, needs_interpreter, tied_scores, with_specials

pytestmark = needs_interpreter
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _families(sizes, dtype):
    """Score lists over ``sizes``, each with the k that probe it: heavy ties with NaN/inf/-0.0 (cuts inside
    a tensor; k = 0, 1, ..., all and beyond), continuous scores, and raw bit patterns (the key order)."""
    bits, total = _BITS[dtype], sum(sizes)
    info = torch.iinfo(bits)
    return {
        "tied": ([with_specials(tied_scores((n,), dtype, levels=4).abs()) for n in sizes],
                 sorted({0, 1, total // 2, total - 1, total, total + 5})),
        "continuous": ([torch.rand(n, dtype=torch.float64).to(dtype) for n in sizes], [total // 3]),
        "bits": ([torch.randint(info.min, info.max, (n,), dtype=torch.int64).to(bits).view(dtype) for n in sizes],
                 [1, total // 2, total]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_equal_the_reference(triton_backend, seed, dtype):
    for family, (tensors, ks) in _families([5, 0, 19, 1, 11], dtype).items():
        for k in ks:
            for absolute in (False, True) if family == "bits" else (False,):  # signed values: |x| ranks apart
                got = ops.topk_threshold(tensors, k, absolute=absolute)
                want = reference.topk_threshold(tensors, k, absolute)
                assert got.dtype == torch.float64 and got.shape == want.shape
                assert torch.equal(got, want), (family, k, absolute, got, want)


def test_ties_spread_over_tensors(triton_backend, seed):
    """Every score equal: the cut walks the tensors in order and lands inside one, chunks deep."""
    tensors = [torch.full((n,), 0.5) for n in (9, 30, 17)]
    for k in (0, 4, 9, 10, 25, 39, 40, 55, 56, 100):
        assert torch.equal(ops.topk_threshold(tensors, k), reference.topk_threshold(tensors, k)), k


def test_per_tensor_form_and_degenerate_lists(triton_backend, seed):
    scores = torch.rand(37)
    assert torch.equal(ops.topk_threshold(scores, 11), reference.topk_threshold([scores], 11)[0])
    nans = [torch.full((6,), float("nan")), torch.empty(0)]
    assert torch.equal(ops.topk_threshold(nans, 3), reference.topk_threshold(nans, 3))
    empties = [torch.empty(0), torch.empty(0, 3)]
    assert torch.equal(ops.topk_threshold(empties, 2), reference.topk_threshold(empties, 2))
    assert ops.topk_threshold([], 3).shape == (0, 2)


def test_exactly_k_kept(triton_backend, seed):
    """The rows keep exactly min(k, non-NaN) blocks, every kept score >= every pruned one (scores that are
    their own block scores: |s|)."""
    tensors = [with_specials(tied_scores((n,), torch.float32, levels=8)).abs() for n in (31, 8, 45)]
    for k in (0, 7, 40, 84):
        thresholds = ops.topk_threshold(tensors, k)
        masks = [ops.block_mask(t, row) for t, row in zip(tensors, thresholds)]
        non_nan = sum(int((~t.isnan()).sum()) for t in tensors)
        assert sum(int(m.sum()) for m in masks) == min(k, non_nan)
        kept = torch.cat([t[m] for t, m in zip(tensors, masks)])
        pruned = torch.cat([t[~m & ~t.isnan()] for t, m in zip(tensors, masks)])
        if len(kept) and len(pruned):
            assert kept.min() >= pruned.max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_are_one_score(triton_backend, seed, dtype):
    """-0.0 and +0.0 are the same score (reference: they compare equal), so the cut among zeros goes by
    the lowest index whatever the sign bit. Keys that rank -0.0 below +0.0 keep the wrong zeros; the other
    families cut among zeros too rarely to see it (zeros are their lowest scores, two patterns in 2^16)."""
    tensors = [torch.randint(-1, 2, (n,)).to(dtype) * (torch.randint(0, 2, (n,)) * 2 - 1).to(dtype)
               for n in (13, 0, 40, 7)]
    tensors[2][:2] = torch.tensor([-0.0, 0.0], dtype=dtype)  # both signs, whatever was drawn
    flat = torch.cat(tensors)
    zeros = int((flat == 0).sum())
    for absolute in (False, True):
        above = int((flat.abs() if absolute else flat).gt(0).sum())
        for k in (above + 1, above + zeros // 2, above + zeros - 1):  # cuts among the zeros
            got = ops.topk_threshold(tensors, k, absolute=absolute)
            assert torch.equal(got, reference.topk_threshold(tensors, k, absolute)), (k, absolute, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_under_vmap_equals_the_reference_per_entry(triton_backend, seed, dtype):
    """The op had no batching rule: its scores are a list, which vmap's fallback cannot split."""
    check_topk_threshold_under_vmap(dtype)
