"""The host model of the CUDA topk_threshold (same tables, chunks, passes, digits and decision functions
as csrc/cuda/topk_threshold.cu, see gpu_select.h) against the float64 reference: this is what proves
the GPU algorithm on a machine without a GPU. Small chunks and groups make small inputs cross many."""

from __future__ import annotations

import pytest
import torch

from bipkernels import reference

from conftest import HAS_CPU_KERNELS, score_lists, topk_ks

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs the compiled extension")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TABLE_CAPACITY = 128  # gpu_select.h kTableCapacity


def model(tensors, k, chunk=4096, capacity=TABLE_CAPACITY, absolute=False):
    return torch.ops.bipkernels._topk_threshold_gpu_model(tensors, k, chunk, capacity, absolute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1], [0], [97], [13, 0, 7, 64], [300, 1, 0, 45, 129, 2]])
@pytest.mark.parametrize("chunk,capacity", [(4096, TABLE_CAPACITY), (16, 2), (7, 1), (1, 3)])
def test_model_equals_reference(seed, dtype, sizes, chunk, capacity):
    for tensors in score_lists(sizes, dtype):
        for k in topk_ks(sum(sizes)):
            got = model(tensors, k, chunk, capacity)
            want = reference.topk_threshold(tensors, k)
            assert torch.equal(got, want), (k, got, want)
            magnitudes = reference.topk_threshold([t.abs() for t in tensors], k)
            negated = [-t for t in tensors]  # the select of |x| on the scores themselves
            assert torch.equal(model(negated, k, chunk, capacity, absolute=True), magnitudes), k


def test_model_with_all_scores_tied_across_many_chunks_and_groups(seed):
    # The cut falls inside a chunk in the middle of one tensor of a later group: every step of the rows.
    tensors = [torch.full((n,), 0.5) for n in (33, 70, 5, 128, 61)]
    for k in range(0, 298, 7):
        assert torch.equal(model(tensors, k, chunk=8, capacity=2), reference.topk_threshold(tensors, k)), k


def test_model_many_tensors_and_wide_ranges(seed):
    # More tensors than one table holds, keys over the whole float range (every digit of every pass).
    sizes = torch.randint(0, 40, (300,)).tolist()
    values = torch.randint(-2**31, 2**31 - 1, (sum(sizes),), dtype=torch.int64).to(torch.int32).view(torch.float32)
    for source in (values, values.double() * 1e200, values.double().abs() * 1e-300):
        tensors = list(source.split(sizes))
        for k in (1, 17, sum(sizes) // 2, sum(sizes) - 3):
            assert torch.equal(model(tensors, k), reference.topk_threshold(tensors, k))


def test_model_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="_topk_threshold_gpu_model: chunk must be >= 1, got 0"):
        model([torch.rand(3)], 1, chunk=0)
    with pytest.raises(RuntimeError, match=r"capacity must be in \[1, 128\], got 129"):
        model([torch.rand(3)], 1, capacity=129)
