"""CUDA kernels against the reference. Skipped without a GPU; run on one by benchmarks/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

from bipkernels import ops, reference
from bipkernels.structures import parse_structure

from conftest import HAS_CUDA_GPU, SHAPES, STRUCTURES, fits, force_backend, tied_scores, with_specials

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_GPU, reason="needs a CUDA GPU")]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, structure):
    scores = with_specials(tied_scores(shape, dtype, levels=8))
    weight = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    threshold = None
    if structure.uses_threshold:
        block_scores = reference.block_scores(scores, structure)
        threshold = reference.topk_threshold([block_scores], block_scores.numel() // 2)[0]
    return scores, weight, grad, threshold


@pytest.mark.parametrize("structure_name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_match_reference(monkeypatch, seed, structure_name, shape, dtype):
    if not fits(structure_name, shape):
        pytest.skip("structure does not fit the shape")
    force_backend(monkeypatch, "cuda")
    structure = parse_structure(structure_name, p=int(torch.randint(1, 3, ()).item()))
    scores, weight, grad, threshold = _inputs(shape, dtype, structure)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    assert torch.equal(ops.block_scores(cuda(scores), structure).cpu(), reference.block_scores(scores, structure))
    assert torch.equal(ops.block_mask(cuda(scores), cuda(threshold), structure).cpu(),
                       reference.block_mask(scores, threshold, structure))
    assert torch.equal(ops.masked_weight(cuda(weight), cuda(scores), cuda(threshold), structure).cpu(),
                       reference.masked_weight(weight, scores, threshold, structure))
    for implicit in ("paper", "released"):
        got = ops.hypergrad(cuda(grad), cuda(weight), cuda(scores), cuda(threshold), structure, inv_gamma=0.3,
                            implicit=implicit)
        want = reference.hypergrad(grad, weight, scores, threshold, structure, 0.3, implicit)
        for g, w in zip(got, want):  # --fmad=false: the same roundings as the CPU
            torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, equal_nan=True)


def test_cuda_repeatable_on_a_side_stream_and_empty(monkeypatch, seed):
    force_backend(monkeypatch, "cuda")
    structure = parse_structure("filter")
    scores, weight, grad, threshold = (t.cuda() for t in _inputs((64, 32, 3, 3), torch.float32, structure))
    first = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        second = ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.1)
    stream.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    empty = torch.empty(0, 4, device="cuda")
    assert ops.masked_weight(empty, empty, threshold, "filter").shape == (0, 4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_on_a_device_other_than_the_current(monkeypatch, seed):
    force_backend(monkeypatch, "cuda")
    structure = parse_structure("unstructured")
    scores, weight, grad, threshold = _inputs((33, 17), torch.float32, structure)
    on_one = [t.to("cuda:1") for t in (grad, weight, scores, threshold)]
    got = ops.hypergrad(*on_one, structure)
    want = reference.hypergrad(grad, weight, scores, threshold, structure)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


def test_cuda_opcheck(seed):
    structure = parse_structure("tile3x5")
    scores, weight, grad, threshold = (t.cuda() for t in _inputs((6, 8, 3, 3), torch.float32, structure))
    kind, a, b, p = structure.op_args()
    torch.library.opcheck(torch.ops.bipkernels.block_scores.default, (scores, kind, a, b, p))
    torch.library.opcheck(torch.ops.bipkernels.block_mask.default, (scores, threshold, kind, a, b, p))
    torch.library.opcheck(torch.ops.bipkernels.masked_weight.default, (weight, scores, threshold, kind, a, b, p))
    torch.library.opcheck(torch.ops.bipkernels.hypergrad.default,
                          (grad, weight, scores, threshold, kind, a, b, p, 0.1, 1))
