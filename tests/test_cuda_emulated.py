"""The CUDA kernels of csrc/cuda, unchanged, on the CPU emulation (csrc/cuda/emulator.h) against the reference.

No GPU needed: every csrc/cuda/*.cu is compiled as C++ with BIPKERNELS_EMULATE_CUDA into the test library
bipkernels_emulated_cuda (its ops take CPU tensors), where each launch runs its blocks in turn and a block's
threads as fibers that switch at __syncthreads. The kernels with barriers run under each of the three
schedules of the threads between barriers (forward, reverse, shuffled), so a kernel that needs a barrier it
lacks gives a wrong result under one of them (removing any one of the barriers that the kernels need fails
these tests); the barrier-free ones under the shuffled one. The build takes about a minute the first time
(build/emulated_cuda)."""

from __future__ import annotations

import pytest
import torch

from bipkernels import reference
from bipkernels.reference import IMPLICIT_FORMS
from bipkernels.structures import parse_structure

from conftest import (GPU_TOPK_SIZES, HAS_CPU_KERNELS, SHAPES, STRUCTURES, fits, half_threshold, op_inputs,
                      score_lists, topk_ks)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2}


@pytest.fixture(params=list(SCHEDULES))
def schedule(request, emulated_cuda, seed):
    emulated_cuda.set_schedule(SCHEDULES[request.param], seed)
    return request.param


@pytest.fixture
def shuffled(emulated_cuda, seed):
    emulated_cuda.set_schedule(SCHEDULES["shuffled"], seed)


def test_emulator_shows_a_missing_barrier_barriers_that_differ_and_a_thread_s_error(emulated_cuda, seed):
    x = torch.randn(300)
    for name, value in SCHEDULES.items():
        emulated_cuda.set_schedule(value, seed)
        assert torch.equal(emulated_cuda._reverse_through_shared(x, 1), x.flip(0)), name
    # Without the barrier, a thread reads slots before their writers ran: shared memory filled with 0xff
    # (NaN) at the block's start, not the previous launch's reversal of the same x.
    for name in ("forward", "reverse"):
        emulated_cuda.set_schedule(SCHEDULES[name], seed)
        got = emulated_cuda._reverse_through_shared(x, 0)
        assert got.isnan().any() and not torch.equal(got, x.flip(0)), name
    with pytest.raises(RuntimeError, match="barrier not every thread reaches"):
        emulated_cuda._reverse_through_shared(x, 2)
    with pytest.raises(RuntimeError, match="threads of a block at different barriers"):
        emulated_cuda._reverse_through_shared(x, 4)
    with pytest.raises(RuntimeError, match="thread 150 fails"):
        emulated_cuda._reverse_through_shared(x, 3)
    assert torch.equal(emulated_cuda._reverse_through_shared(x, 1), x.flip(0))  # the failed launch left nothing


def _inputs(shape, dtype, structure):
    """op_inputs with the threshold the raw ops take for N:M, which reads none."""
    scores, weight, grad, threshold = op_inputs(shape, dtype, structure)
    return scores, weight, grad, torch.empty(2, dtype=torch.float64) if threshold is None else threshold


def _check_mask_ops(emulated_cuda, structure, scores, weight, grad, threshold):
    """block_mask, masked_weight and both hypergrad forms of the emulated kernels equal the reference's."""
    args = structure.op_args()
    assert torch.equal(emulated_cuda.block_mask(scores, threshold, *args),
                       reference.block_mask(scores, threshold, structure))
    assert torch.equal(emulated_cuda.masked_weight(weight, scores, threshold, *args),
                       reference.masked_weight(weight, scores, threshold, structure))
    for implicit in IMPLICIT_FORMS:
        got = emulated_cuda.hypergrad(grad, weight, scores, threshold, *args, 0.3, IMPLICIT_FORMS.index(implicit))
        want = reference.hypergrad(grad, weight, scores, threshold, structure, 0.3, implicit)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("structure_name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_cuda_ops_match_reference(emulated_cuda, shuffled, structure_name, shape, dtype):
    if not fits(structure_name, shape):
        pytest.skip("structure does not fit the shape")
    structure = parse_structure(structure_name, p=int(torch.randint(1, 3, ()).item()))
    scores, weight, grad, threshold = _inputs(shape, dtype, structure)
    # Tied scores: multiples of 1/8, whose block sums are exact in the large-block kernel's tree order too.
    torch.testing.assert_close(emulated_cuda.block_scores(scores, *structure.op_args()),
                               reference.block_scores(scores, structure), rtol=0, atol=0, equal_nan=True)
    _check_mask_ops(emulated_cuda, structure, scores, weight, grad, threshold)


@pytest.mark.parametrize("structure_name", ["filter", "channel", "tile4x4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_large_blocks_sum_as_a_tree(emulated_cuda, schedule, structure_name, dtype):
    """Blocks of 64+ elements take one CUDA block each and a shared-memory tree sum in double: equal to
    the reference's sequential sum up to the rounding of a different order."""
    structure = parse_structure(structure_name, p=int(torch.randint(1, 3, ()).item()))
    scores = torch.randn(40, 96, 3, 3, dtype=dtype)
    got = emulated_cuda.block_scores(scores, *structure.op_args())
    want = reference.block_scores(scores, structure)
    tolerance = 1e-14 if dtype == torch.float64 else 1.2e-7  # double-sum differences, then one float rounding
    torch.testing.assert_close(got, want, rtol=tolerance, atol=0)


LAYOUTS = ["contiguous", "channels_last", "misaligned", "transposed"]


def _arrange(tensor, layout):
    """``tensor``'s values in ``layout``: a copy in another dense memory order, or one whose data pointer
    is not 16-byte aligned."""
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "misaligned":
        return torch.cat([tensor.new_zeros(1), tensor.reshape(-1)])[1:].view(tensor.shape)
    if layout == "transposed":
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    return tensor


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_emulated_ops_on_strided_and_misaligned_tensors(emulated_cuda, shuffled, layout):
    """Memory-order runs (unstructured, any dense layout), the one-element path when a pointer is not
    16-byte aligned, and contiguous copies of structured inputs."""
    for structure_name in ("unstructured", "tile3x5", "2:4"):
        structure = parse_structure(structure_name)
        scores, weight, grad, threshold = _inputs((6, 8, 3, 3), torch.float32, structure)
        scores, weight, grad = (_arrange(t, layout) for t in (scores, weight, grad))
        _check_mask_ops(emulated_cuda, structure, scores, weight, grad, threshold)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("structure_name", ["unstructured", "filter", "2:4"])
def test_emulated_ops_pass_opcheck(emulated_cuda, shuffled, layout, structure_name):
    """torch.library.opcheck with bipkernels' fake kernels (registered on the emulated ops too): the shapes,
    dtypes and strides the CUDA host code returns are those torch.compile is told, for every layout."""
    if not HAS_CPU_KERNELS:
        pytest.skip("the fake kernels need the compiled extension (bipkernels._C)")
    structure = parse_structure(structure_name)
    # No NaN scores: opcheck compares outputs without equal_nan.
    scores, weight, grad = (_arrange(torch.randn(8, 12, 3, 3), layout) for _ in range(3))
    threshold = half_threshold(scores, structure)
    if threshold is None:
        threshold = torch.zeros(2, dtype=torch.float64)  # N:M reads none
    args = structure.op_args()
    torch.library.opcheck(emulated_cuda.block_scores.default, (scores, *args))
    torch.library.opcheck(emulated_cuda.block_mask.default, (scores, threshold, *args))
    torch.library.opcheck(emulated_cuda.masked_weight.default, (weight, scores, threshold, *args))
    torch.library.opcheck(emulated_cuda.hypergrad.default, (grad, weight, scores, threshold, *args, 0.1, 1))
    block = emulated_cuda.block_scores(scores, *args).reshape(-1)
    for absolute in (False, True):
        torch.library.opcheck(emulated_cuda.topk_threshold.default, ([block, -block], 7, absolute))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", GPU_TOPK_SIZES)
def test_emulated_topk_threshold_matches_reference(emulated_cuda, seed, dtype, sizes):
    for tensors in score_lists(sizes, dtype):
        for index, k in enumerate(topk_ks(sum(sizes))):
            emulated_cuda.set_schedule(index % len(SCHEDULES), seed)  # each schedule, a third of the k each
            want = reference.topk_threshold(tensors, k)
            assert torch.equal(emulated_cuda.topk_threshold(tensors, k, False), want), k
            assert torch.equal(emulated_cuda.topk_threshold([-t for t in tensors], k, True),
                               reference.topk_threshold([t.abs() for t in tensors], k)), k


def test_emulated_topk_threshold_cuts_ties_across_chunks_and_tensors(emulated_cuda, schedule):
    """The k-th value tied in many chunks of several tensors, the cut inside a later chunk of a later
    tensor: the tie counts, the block scans of rows_kernel and the canonical cut."""
    tensors = [torch.ones(9000), torch.zeros(5), torch.ones(12289), torch.full((4097,), 2.0)]
    total_ones = 9000 + 12289
    for k in (4097 + 1, 4097 + 4096, 4097 + 9000 + 1, 4097 + 9000 + 8193, 4097 + total_ones - 1):
        assert torch.equal(emulated_cuda.topk_threshold(tensors, k, False), reference.topk_threshold(tensors, k)), k


def test_emulated_topk_threshold_cuts_ties_past_the_first_1024_chunks(emulated_cuda, schedule):
    """rows_kernel finds the chunk of the cut a tile of 1024 chunk counts at a time: a cut in a later tile,
    at its first chunk, inside one, and in the last chunk of a tensor that starts after another."""
    chunks = 1100
    tensors = [torch.ones(5), torch.ones(4096 * chunks + 3)]
    for k in (5 + 4096 * 1024 + 1, 5 + 4096 * 1050 + int(torch.randint(1, 4096, ())), 5 + 4096 * chunks + 2):
        assert torch.equal(emulated_cuda.topk_threshold(tensors, k, False), reference.topk_threshold(tensors, k)), k


def test_emulated_ops_refuse_bad_input_naming_the_op(emulated_cuda):
    with pytest.raises(RuntimeError, match="topk_threshold: k must be >= 0, got -1"):
        emulated_cuda.topk_threshold([torch.ones(3)], -1, False)
    with pytest.raises(RuntimeError, match="masked_weight: scores has shape"):
        emulated_cuda.masked_weight(torch.ones(3, 4), torch.ones(4, 3), torch.zeros(2, dtype=torch.float64), 0, 1, 1, 1)
    with pytest.raises(RuntimeError, match="bipkernels.hypergrad: inv_gamma must be a number in"):
        emulated_cuda.hypergrad(*(torch.ones(3),) * 3, torch.zeros(2, dtype=torch.float64), 0, 0, 0, 1, 1e39, 0)
