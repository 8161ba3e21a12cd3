"""Memory layouts and sizes: storage offsets and strided views (always), and the compiled kernels on tensors
past 2^31 elements and at storage offsets past 2^31 (marked ``large``: 4 to 12 GiB of memory, run with
BIPKERNELS_LARGE_TESTS=1; each skips itself when the machine has too little memory available): the C++ CPU
kernels, and csrc/cuda's on the CPU emulation (their 64-bit indexing; a GPU run is tests/test_cuda.py's)."""

from __future__ import annotations

import pytest
import torch

from bipkernels import ops, reference
from bipkernels.structures import parse_structure

from conftest import HAS_CPU_KERNELS, STRUCTURES, force_backend, tied_scores, use_emulated_cuda

BACKENDS = ["torch", "cpu"] if HAS_CPU_KERNELS else ["torch"]
needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the compiled extension is not built")
BIG = 2**31
GiB = 2**30


def _strided_view(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` (rows, cols) seen through a transposed, every-other-column view of a larger buffer that
    starts ``offset`` elements into its storage."""
    rows, cols = values.shape
    storage = torch.full((offset + cols * 2 * rows,), float("nan"), dtype=values.dtype)
    view = storage[offset:].view(cols, 2 * rows)[:, ::2].t()
    view.copy_(values)
    assert view.storage_offset() == offset and not view.is_contiguous() and view.stride() == (2, 2 * rows)
    return view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure_name", STRUCTURES)
def test_storage_offset_and_strides_give_the_contiguous_result(monkeypatch, seed, backend, structure_name):
    force_backend(monkeypatch, backend)
    structure = parse_structure(structure_name)
    shape = (6, 12)
    scores, weight, grad = tied_scores(shape), torch.randn(shape, dtype=torch.float64), torch.randn(shape,
                                                                                                 dtype=torch.float64)
    offset = int(torch.randint(1, 100, ()))
    views = [_strided_view(t, offset) for t in (scores, weight, grad)]
    k = int(torch.randint(0, 13, ()))
    assert torch.equal(ops.topk_threshold(views[0], k), ops.topk_threshold(scores, k))  # raw values, strided
    threshold = None
    if structure.uses_threshold:
        threshold = ops.topk_threshold(ops.block_scores(scores, structure), k)
        assert torch.equal(ops.topk_threshold(ops.block_scores(views[0], structure), k), threshold)
    assert torch.equal(ops.block_scores(views[0], structure), ops.block_scores(scores, structure))
    assert torch.equal(ops.block_mask(views[0], threshold, structure), ops.block_mask(scores, threshold, structure))
    assert torch.equal(ops.block_mask(views[0], threshold, structure),
                       reference.block_mask(scores, threshold, structure))
    assert torch.equal(ops.masked_weight(views[1], views[0], threshold, structure),
                       ops.masked_weight(weight, scores, threshold, structure))
    for got, want in zip(ops.hypergrad(views[2], views[1], views[0], threshold, structure, inv_gamma=0.25),
                         ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.25)):
        assert torch.equal(got, want)


@pytest.fixture(params=["cpu", "emulated_cuda"])
def compiled(request, monkeypatch):
    """Which compiled kernels bipkernels.ops runs on CPU tensors: the C++ CPU ones or the emulated CUDA ones."""
    if request.param == "cpu":
        force_backend(monkeypatch, "cpu")
    else:
        use_emulated_cuda(monkeypatch, request.getfixturevalue("emulated_cuda"))
    return request.param


def _need_memory(gib: float) -> None:
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) * 1024
    if available < gib * GiB:
        pytest.skip(f"needs {gib} GiB of available memory, the machine has {available / GiB:.1f}")


def _extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) in one pass and no temporary the size of ``tensor``."""
    low, high = torch.aminmax(tensor)
    return float(low), float(high)


def _past_2_31() -> torch.Tensor:
    """A (2, 2^30 + 3) float16 tensor (2^31 + 6 elements, 4 GiB): row 0 all 1, row 1 all 0.5 but its last
    element (2^31 + 5), 4."""
    tensor = torch.empty(2, BIG // 2 + 3, dtype=torch.float16)
    tensor[0].fill_(1.0)
    tensor[1].fill_(0.5)
    tensor[1, -1] = 4.0
    return tensor


@pytest.mark.large
@needs_cpu_kernels
def test_block_scores_mask_and_masked_weight_past_2_31_elements(compiled):
    """The tensor of _past_2_31 as scores and weight (8.7 GiB at the peak): its blocks, mask and masked
    weight at the far end, where 32-bit indices would wrap."""
    _need_memory(10)
    tensor = _past_2_31()
    cols = tensor.shape[1]
    filter_scores = ops.block_scores(tensor, "filter")
    assert torch.equal(filter_scores, torch.tensor([cols, 0.5 * (cols - 1) + 4.0], dtype=torch.float64).float())
    tile = parse_structure(f"tile1x{2**29}")
    assert torch.equal(ops.block_scores(tensor, tile),
                       torch.tensor([[2**29, 2**29, 3.0], [2**28, 2**28, 5.0]], dtype=torch.float32))

    threshold = ops.topk_threshold(filter_scores, 1)  # row 0
    mask = ops.block_mask(tensor, threshold, "filter")
    assert bool(mask[0].all()) and not bool(mask[1].any())
    del mask
    out = ops.masked_weight(tensor, tensor, threshold, "filter")
    assert _extremes(out[0]) == (1.0, 1.0) and _extremes(out[1]) == (0.0, 0.0)


@pytest.mark.large
@needs_cpu_kernels
def test_hypergrad_past_2_31_elements(compiled):
    """The tensor of _past_2_31 as gradient, weight and scores, filter 0 kept (12.7 GiB at the peak)."""
    _need_memory(14)
    tensor = _past_2_31()
    threshold = ops.topk_threshold(ops.block_scores(tensor, "filter"), 1)  # row 0
    grad_weight, grad_scores = ops.hypergrad(tensor, tensor, tensor, threshold, "filter", inv_gamma=0.5)
    assert _extremes(grad_weight[0]) == (1.0, 1.0) and _extremes(grad_weight[1]) == (0.0, 0.0)
    assert _extremes(grad_scores[0]) == (0.5, 0.5)  # 1·1 − 0.5·1²
    assert _extremes(grad_scores[1, :-1]) == (0.25, 0.25) and grad_scores[1, -1] == 16.0


@pytest.mark.large
@needs_cpu_kernels
def test_topk_threshold_past_2_31_elements(compiled):
    """The top k of 2^31 + 7 scores (float16, 4 GiB), alone and split in two tensors, and their mask (2 GiB):
    the k-th value is tied and its cut lies past 2^31. (Counted with count_nonzero: a bool sum() would
    make an int64 copy, 16 GiB.)"""
    _need_memory(8)
    n = BIG + 7
    scores = torch.zeros(n, dtype=torch.float16)
    top = [BIG - 5, BIG + 1, BIG + 4, BIG + 6]
    scores[top[0]] = 2.0
    scores[top[1:]] = 1.0  # three ties at 1.0
    threshold = ops.topk_threshold(scores, 3)  # 2.0 and the first two ties
    assert threshold.tolist() == [1.0, float(BIG + 5)]
    assert ops.topk_threshold(scores, 1).tolist() == [2.0, float(n)]
    mask = ops.block_mask(scores, threshold)
    assert int(mask.count_nonzero()) == 3 and mask[top].tolist() == [True, True, True, False]
    del mask
    first, second = scores[:BIG // 2], scores[BIG // 2:]  # each under 2^31, together past it
    rows = ops.topk_threshold([first, second], 3)
    assert rows.tolist() == [[1.0, float(first.numel())], [1.0, float(BIG + 5 - first.numel())]]


@pytest.mark.large
@needs_cpu_kernels
def test_ops_at_a_storage_offset_past_2_31(compiled, seed):
    """Small tensors that start 2^31 elements into their storage (4 GiB reserved, a few pages touched)."""
    _need_memory(1)
    storage = torch.empty(BIG + 3 * 96, dtype=torch.float32)
    views = [storage[BIG + i * 96:BIG + (i + 1) * 96].view(8, 12) for i in range(3)]
    for view, values in zip(views, (tied_scores((8, 12), torch.float32), torch.randn(8, 12), torch.randn(8, 12))):
        view.copy_(values)
    scores, weight, grad = views
    assert scores.storage_offset() == BIG
    for structure in ("unstructured", "filter", "2:4", "tile3x5"):
        parsed = parse_structure(structure)
        threshold = None
        if parsed.uses_threshold:
            threshold = ops.topk_threshold(ops.block_scores(scores, parsed), 7)
            assert torch.equal(ops.block_scores(scores, parsed), reference.block_scores(scores.clone(), parsed))
        assert torch.equal(ops.masked_weight(weight, scores, threshold, parsed),
                           reference.masked_weight(weight.clone(), scores.clone(), threshold, parsed))
        for got, want in zip(ops.hypergrad(grad, weight, scores, threshold, parsed, inv_gamma=0.5),
                             reference.hypergrad(grad.clone(), weight.clone(), scores.clone(), threshold, parsed, 0.5)):
            assert torch.equal(got, want)
