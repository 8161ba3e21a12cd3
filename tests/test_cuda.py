"""CUDA kernels against the reference. Skipped without a GPU; run on one by benchmarks/gpu_check.sh.

Tests marked `large` (more than 2^31 elements, about 13 GB of GPU memory) run only with
BIPKERNELS_LARGE_TESTS=1."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from bipkernels import ops, reference
from bipkernels.structures import parse_structure

from conftest import (GPU_TOPK_SIZES, HAS_CUDA_GPU, SHAPES, STRUCTURES, fits, force_backend, op_inputs, score_lists,
                      topk_ks)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_GPU, reason="needs a CUDA GPU")]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _closure(model, inputs, targets):
    """A BiP closure: cross-entropy of ``model`` on one batch, forward and backward."""
    def closure():
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("structure_name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_match_reference(monkeypatch, seed, structure_name, shape, dtype):
    if not fits(structure_name, shape):
        pytest.skip("structure does not fit the shape")
    force_backend(monkeypatch, "cuda")
    structure = parse_structure(structure_name, p=int(torch.randint(1, 3, ()).item()))
    scores, weight, grad, threshold = op_inputs(shape, dtype, structure)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    torch.testing.assert_close(ops.block_scores(cuda(scores), structure).cpu(),  # NaN scores: NaN block scores
                               reference.block_scores(scores, structure), rtol=0, atol=0, equal_nan=True)
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
    scores, weight, grad, threshold = (t.cuda() for t in op_inputs((64, 32, 3, 3), torch.float32, structure))
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
    scores, weight, grad, threshold = op_inputs((33, 17), torch.float32, structure)
    on_one = [t.to("cuda:1") for t in (grad, weight, scores, threshold)]
    got = ops.hypergrad(*on_one, structure)
    want = reference.hypergrad(grad, weight, scores, threshold, structure)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


def test_cuda_opcheck(seed):
    structure = parse_structure("tile3x5")
    # No NaN scores (op_inputs has some): opcheck compares outputs without equal_nan.
    scores, weight, grad = (torch.randn(6, 8, 3, 3, device="cuda") for _ in range(3))
    threshold = ops.topk_threshold(ops.block_scores(scores, structure), 7)
    kind, a, b, p = structure.op_args()
    torch.library.opcheck(torch.ops.bipkernels.block_scores.default, (scores, kind, a, b, p))
    torch.library.opcheck(torch.ops.bipkernels.block_mask.default, (scores, threshold, kind, a, b, p))
    torch.library.opcheck(torch.ops.bipkernels.masked_weight.default, (weight, scores, threshold, kind, a, b, p))
    torch.library.opcheck(torch.ops.bipkernels.hypergrad.default,
                          (grad, weight, scores, threshold, kind, a, b, p, 0.1, 1))
    block = ops.block_scores(scores, structure)
    for absolute in (False, True):
        torch.library.opcheck(torch.ops.bipkernels.topk_threshold.default, ([block, -block], 7, absolute))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", GPU_TOPK_SIZES)
def test_cuda_topk_threshold_matches_reference(monkeypatch, seed, dtype, sizes):
    force_backend(monkeypatch, "cuda")
    for tensors in score_lists(sizes, dtype):
        on_gpu = [t.cuda() for t in tensors]
        for k in topk_ks(sum(sizes)):
            got = ops.topk_threshold(on_gpu, k)
            want = reference.topk_threshold(tensors, k)
            assert got.device == on_gpu[0].device
            assert torch.equal(got.cpu(), want), (k, got, want)
            assert torch.equal(ops.topk_threshold([-t for t in on_gpu], k, absolute=True).cpu(),
                               reference.topk_threshold([t.abs() for t in tensors], k)), k


def test_cuda_ops_never_wait_for_the_host_and_repeat_bit_for_bit(monkeypatch, seed):
    force_backend(monkeypatch, "cuda")
    structure = parse_structure("tile3x5")
    scores, weight, grad, _ = (None if t is None else t.cuda() for t in op_inputs((24, 16, 3, 3), torch.float32,
                                                                                 structure))

    def chain():
        block = ops.block_scores(scores, structure)
        threshold = ops.topk_threshold([block, block.flip(0)], block.numel() // 3)[0]
        return (threshold, ops.masked_weight(weight, scores, threshold, structure),
                *ops.hypergrad(grad, weight, scores, threshold, structure, inv_gamma=0.1))

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside raises
    try:
        first, second = chain(), chain()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cuda_graph_replay_of_bip_steps_equals_eager(seed):
    from bipkernels.solvers import BiP

    inputs, targets = torch.randn(8, 3, 10, 10, device="cuda"), torch.randint(0, 5, (8,), device="cuda")

    def make():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).cuda()
        return model, BiP(model, 0.8, "filter", schedule="constant", score_schedule="constant", total_steps=50)

    (eager_model, eager), (graphed_model, graphed) = make(), make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (optimiser state, cuDNN plans)
        for _ in range(3):
            eager.step(_closure(eager_model, inputs, targets))
            graphed.step(_closure(graphed_model, inputs, targets))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(_closure(graphed_model, inputs, targets))
    for _ in range(4):
        graph.replay()
        eager.step(_closure(eager_model, inputs, targets))
    torch.cuda.synchronize()
    from bipkernels import masks
    for (name, got), want in zip(masks(graphed_model).items(), masks(eager_model).values()):
        assert torch.equal(got, want), name
    for (name, got), want in zip(graphed_model.state_dict().items(), eager_model.state_dict().values()):
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["fused", "faithful"])
def test_cuda_score_step_in_backward_equals_the_step_after_it(seed, mode):
    """On the GPU the score hooks run on the device's autograd thread; the state still matches stepping
    after the backward bit for bit (a Linear model: cuBLAS gives the same sums in both runs)."""
    from bipkernels import masked_layers
    from bipkernels.solvers import BiP

    inputs, targets = torch.randn(64, 12, device="cuda"), torch.randint(0, 3, (64,), device="cuda")

    states = []
    for in_backward in (True, False):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).cuda()
        solver = BiP(model, 0.7, mode=mode, score_lr=0.2, total_steps=10, step_scores_in_backward=in_backward)
        for _ in range(5):
            closure = _closure(model, inputs, targets)
            solver.step(closure) if mode == "fused" else solver.step(closure, closure)
        assert all((layer.scores.grad is None) == in_backward for _, layer in masked_layers(model))
        states.append(model.state_dict())
    for key, value in states[1].items():
        got = states[0][key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key


@pytest.mark.large
@pytest.mark.skipif(os.environ.get("BIPKERNELS_LARGE_TESTS") != "1", reason="set BIPKERNELS_LARGE_TESTS=1")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_ops_past_2_to_the_31(monkeypatch, backend):
    # All scores 0 but 10 twos at the end and ones around index 2^31: keeping 14 keeps the twos and the
    # first 4 ones, so the tie cut lies past 2^31 and only 64-bit indexing gets it right.
    if backend == "triton":
        pytest.importorskip("triton")
    force_backend(monkeypatch, backend)
    n, big = 2**31 + 4096, 2**31
    scores = torch.zeros(n, dtype=torch.float16, device="cuda")
    scores[-10:] = 2
    ones = torch.tensor([big - 3, big - 2, big + 1, big + 2, big + 3, big + 7], device="cuda")
    scores[ones] = 1
    threshold = ops.topk_threshold(scores, 14)
    assert threshold.tolist() == [1.0, float(big + 2 + 1)]
    kept = ops.masked_weight(torch.ones_like(scores), scores, threshold)
    assert int(kept.sum(dtype=torch.float32)) == 14
    assert kept[big + 2] == 1 and kept[big + 3] == 0 and kept[-1] == 1
    del kept
    mask = ops.block_mask(scores, threshold)
    assert int(mask.sum()) == 14 and mask[big + 2] and not mask[big + 3]
    del mask
    grad_weight, grad_scores = ops.hypergrad(torch.ones_like(scores), scores, scores, threshold, inv_gamma=0.5)
    assert int(grad_weight.sum(dtype=torch.float32)) == 14 and grad_weight[big + 2] == 1 and grad_weight[big + 3] == 0
    assert grad_scores[big + 3] == 1 and grad_scores[-1] == 2 - 0.5  # θg − γ·m·g², m = 0 at big + 3
    del grad_weight, grad_scores
    # Blocks over the whole tensor: a (2^20 + 2, 2048) matrix; its filters and channels from the flat indices.
    matrix, cols = scores.view(-1, 2048), 2048
    nonzero = [(int(i), 1.0) for i in ones.tolist()] + [(n - 1 - j, 2.0) for j in range(10)]
    for name, block_of in (("filter", lambda i: i // cols), ("channel", lambda i: i % cols)):
        blocks = ops.block_scores(matrix, name)
        want = torch.zeros_like(blocks, device="cpu")
        for index, value in nonzero:
            want[block_of(index)] += value
        assert torch.equal(blocks.cpu(), want), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_equals_the_dense_export(seed, dtype):
    """Under autocast the masked model computes what its dense export computes (the same half casts of
    the same effective weight), and the fused backward gives m ⊙ g in float32."""
    import bipkernels

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).cuda()
    bipkernels.convert(model, 0.7)
    dense = bipkernels.export_dense(model)
    inputs, targets = torch.randn(4, 3, 10, 10, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
    outputs = []
    for network in (model, dense):
        with torch.autocast("cuda", dtype=dtype):
            outputs.append(network(inputs))
            loss = nn.functional.cross_entropy(outputs[-1], targets)
        loss.backward()
    assert outputs[0].dtype == dtype
    torch.testing.assert_close(outputs[0], outputs[1])
    for name, layer in bipkernels.masked_layers(model):
        g = dense.get_submodule(name).weight.grad
        assert layer.weight.grad.dtype == layer.scores.grad.dtype == torch.float32
        torch.testing.assert_close(layer.weight.grad, torch.where(layer.mask(), g, 0.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_cuda_masked_layers_match_the_float64_cpu_layer(seed, dtype, layer):
    import copy

    import bipkernels

    dense = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1)) if layer == "conv" else nn.Sequential(nn.Linear(24, 10))
    reference_model = bipkernels.convert(dense.double(), 0.6, "2:4" if layer == "linear" else "filter")
    cuda_model = copy.deepcopy(reference_model).to(device="cuda", dtype=dtype)
    inputs = torch.randn((4, 6, 5, 5) if layer == "conv" else (4, 24), dtype=torch.float64)
    want = reference_model(inputs)
    got = cuda_model(inputs.to(device="cuda", dtype=dtype))
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tolerance, atol=tolerance)
    want.square().sum().backward()
    got.double().square().sum().backward()
    for (name, expected), actual in zip(reference_model.named_parameters(), cuda_model.parameters()):
        torch.testing.assert_close(actual.grad.double().cpu(), expected.grad, rtol=tolerance, atol=tolerance * 10,
                                   msg=name)
    for got_mask, want_mask in zip(bipkernels.masks(cuda_model).values(), bipkernels.masks(reference_model).values()):
        assert torch.equal(got_mask.cpu(), want_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_cuda_vector_and_scalar_paths_on_aligned_and_offset_storage(monkeypatch, seed, dtype, offset):
    # Offsets of 1 and 3 elements leave the pointers off 16-byte alignment: the one-element path.
    force_backend(monkeypatch, "cuda")
    structure = parse_structure("unstructured")
    shape, n = (37, 11), 37 * 11
    grad, weight, scores = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(3))
    threshold = reference.topk_threshold([reference.block_scores(scores, structure)], n // 3)[0]
    on_gpu = [torch.cat([torch.zeros(offset, dtype=dtype), t.reshape(-1)]).cuda()[offset:].view(shape)
              for t in (grad, weight, scores)]
    assert on_gpu[0].storage_offset() == offset
    got_weight = ops.masked_weight(on_gpu[1], on_gpu[2], threshold.cuda(), structure)
    assert torch.equal(got_weight.cpu(), reference.masked_weight(weight, scores, threshold, structure))
    got = ops.hypergrad(*on_gpu, threshold.cuda(), structure, inv_gamma=0.2)
    want = reference.hypergrad(grad, weight, scores, threshold, structure, 0.2)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("structure_name", ["unstructured", "filter", "channel"])
def test_cuda_channels_last_weights(monkeypatch, seed, dtype, structure_name):
    """An unstructured mask over channels_last weight, scores and grad runs in memory order: results in
    channels_last, no copies; structured masks give contiguous results. Values equal the reference."""
    force_backend(monkeypatch, "cuda")
    structure = parse_structure(structure_name)
    scores, weight, grad, threshold = op_inputs((64, 32, 3, 3), dtype, structure)
    last = [t.cuda().contiguous(memory_format=torch.channels_last) for t in (grad, weight, scores)]
    on_gpu_threshold = None if threshold is None else threshold.cuda()
    expected_strides = last[1].stride() if structure_name == "unstructured" else weight.stride()
    got_weight = ops.masked_weight(last[1], last[2], on_gpu_threshold, structure)
    assert got_weight.stride() == expected_strides
    assert torch.equal(got_weight.cpu(), reference.masked_weight(weight, scores, threshold, structure))
    got = ops.hypergrad(*last, on_gpu_threshold, structure, inv_gamma=0.2)
    want = reference.hypergrad(grad, weight, scores, threshold, structure, 0.2)
    for g, w in zip(got, want):
        assert g.stride() == expected_strides
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("structure_name", ["filter", "channel", "tile8x16"])
def test_cuda_large_block_reduction_of_continuous_scores(monkeypatch, seed, dtype, structure_name):
    # Blocks of hundreds of elements take the one-CUDA-block-per-score-block tree sum: its order differs
    # from the CPU's, so arbitrary scores agree to the rounding of the block score, not bit for bit.
    force_backend(monkeypatch, "cuda")
    scores = torch.randn(96, 64, 3, 3, dtype=torch.float64).to(dtype)
    for p in (1, 2):
        structure = parse_structure(structure_name, p=p)
        got = ops.block_scores(scores.cuda(), structure).cpu()
        want = reference.block_scores(scores, structure)
        torch.testing.assert_close(got, want, rtol=1e-12 if dtype == torch.float64 else 1.2e-7, atol=0)


def test_cuda_resume_is_bit_exact_with_dropout(seed):
    """BiP.state_dict carries the GPUs' generators too: dropout on a CUDA model draws from them, so a
    resumed run that restored only the CPU's took other dropout masks."""
    import copy

    import bipkernels

    model = bipkernels.convert(nn.Sequential(nn.Linear(12, 24), nn.Dropout(0.5), nn.ReLU(), nn.Linear(24, 3)).cuda(),
                               0.5)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 12, device="cuda"), torch.randint(0, 3, (16,), device="cuda")

    def steps(solver, count):
        def closure():
            loss = nn.functional.cross_entropy(solver.model(x), y)
            loss.backward()
            return loss

        for _ in range(count):
            solver.step(closure)

    solver = bipkernels.BiP(model, 0.5, total_steps=10)
    steps(solver, 2)
    saved = copy.deepcopy(solver.state_dict())
    steps(solver, 2)
    resumed = bipkernels.BiP(twin, 0.5, total_steps=10)
    resumed.load_state_dict(saved)
    steps(resumed, 2)
    resumed_state = twin.state_dict()
    for key, value in model.state_dict().items():
        same = torch.equal if isinstance(value, torch.Tensor) else (lambda a, b: a == b)
        assert same(resumed_state[key], value), key

