"""Property tests (hypothesis): random shapes, strides, structures, k, dtypes and tied scores; the C++
kernels' masks equal the reference's bit for bit, exactly k blocks are kept, and every kept block score
is >= every pruned one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from bipkernels import reference
from bipkernels.structures import Structure

from conftest import HAS_CPU_KERNELS

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the compiled extension is not built")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def cases(draw):
    dims = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    kind = draw(st.sampled_from(["unstructured", "filter", "channel", "nm", "tile"]))
    if kind == "nm":
        m = draw(st.integers(1, 4))
        if len(dims) < 2:
            dims.append(1)
        dims[1] = m * draw(st.integers(1, 3))
        structure = Structure("nm", draw(st.integers(0, m)), m)
    elif kind == "tile":
        structure = Structure("tile", draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.sampled_from([1, 2])))
    else:
        structure = Structure(kind, p=draw(st.sampled_from([1, 2])))
    dtype = draw(st.sampled_from(DTYPES))
    levels = draw(st.sampled_from([2, 4, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    transpose = draw(st.booleans()) and len(dims) >= 2
    return dims, structure, dtype, levels, seed, transpose, draw(st.floats(0.0, 1.0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cpu_masks_equal_the_reference_and_keep_exactly_k(case):
    dims, structure, dtype, levels, seed, transpose, keep = case
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-levels, levels + 1, dims, generator=generator) / levels  # exact block sums
    scores = values.to(dtype)
    if transpose:  # a non-contiguous view of the same shape
        scores = scores.transpose(0, 1).contiguous().transpose(0, 1)
    kind, a, b, p = structure.op_args()
    if not structure.uses_threshold:
        got = torch.ops.bipkernels.block_mask(scores, torch.zeros(2, dtype=torch.float64), kind, a, b, p)
        assert torch.equal(got, reference.block_mask(scores, None, structure))
        return
    block_scores = torch.ops.bipkernels.block_scores(scores, kind, a, b, p)
    assert torch.equal(block_scores, reference.block_scores(scores, structure))
    k = math.floor(keep * block_scores.numel())
    threshold = torch.ops.bipkernels.topk_threshold([block_scores], k)
    assert torch.equal(threshold, reference.topk_threshold([block_scores], k))
    mask = torch.ops.bipkernels.block_mask(scores, threshold[0], kind, a, b, p)
    assert torch.equal(mask, reference.block_mask(scores, threshold[0], structure))
    kept = reference._kept_blocks(block_scores, threshold[0])
    assert int(kept.sum()) == k
    flat = block_scores.reshape(-1)
    if 0 < k < flat.numel():
        assert flat[kept].min() >= flat[~kept].max()
