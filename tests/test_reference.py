"""The reference (the oracle of every other test) against brute-force definitions written element by
element in plain Python."""

from __future__ import annotations

import math

import pytest
import torch

from bipkernels import reference
from bipkernels.structures import parse_structure

from conftest import SHAPES, STRUCTURES, fits, tied_scores, with_specials


def brute_block_of(structure, shape, flat: int) -> int:
    """Block (group for N:M) of the element at ``flat``, from the definitions in structures.py."""
    channels = shape[1] if len(shape) > 1 else 1
    inner = math.prod(shape[2:])
    cols = channels * inner
    row, col = divmod(flat, cols)
    channel, spatial = divmod(col, inner)
    if structure.kind == "filter":
        return row
    if structure.kind == "channel":
        return channel
    if structure.kind == "tile":
        return (row // structure.a) * -(-cols // structure.b) + col // structure.b
    if structure.kind == "nm":
        return (row * (channels // structure.b) + channel // structure.b) * inner + spatial
    return flat


def brute_block_scores(scores: torch.Tensor, structure) -> list[float]:
    flat = scores.reshape(-1).tolist()
    groups: dict[int, list[float]] = {}
    for index, value in enumerate(flat):
        groups.setdefault(brute_block_of(structure, tuple(scores.shape), index), []).append(abs(value))
    result = []
    for block in sorted(groups):
        members = groups[block]
        total = math.fsum(m * m for m in members) if structure.p == 2 else math.fsum(members)
        result.append(total)
    return result


def brute_kept(block_scores_list, k: int) -> list[set[int]]:
    """Kept flat block indices per tensor: the k largest non-NaN, ties to the lowest global index."""
    entries = []
    for tensor_index, tensor in enumerate(block_scores_list):
        for index, value in enumerate(tensor.reshape(-1).tolist()):
            if not math.isnan(value):
                entries.append((-value, tensor_index, index))
    entries.sort()
    kept = [set() for _ in block_scores_list]
    for _, tensor_index, index in entries[:k]:
        kept[tensor_index].add(index)
    return kept


@pytest.mark.parametrize("structure_name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1, 2])
def test_block_scores_match_definition(seed, structure_name, shape, p):
    if not fits(structure_name, shape):
        pytest.skip("structure does not fit the shape")
    structure = parse_structure(structure_name, p)
    scores = torch.randn(shape, dtype=torch.float64)
    got = reference.block_scores(scores, structure)
    assert tuple(got.shape) == structure.block_scores_shape(shape)
    if structure.kind in ("unstructured", "nm"):
        assert torch.equal(got, scores.abs())
    else:
        brute = torch.tensor(brute_block_scores(scores, structure), dtype=torch.float64)
        torch.testing.assert_close(got.reshape(-1), brute, rtol=1e-13, atol=0)


@pytest.mark.parametrize("sizes", [[1], [0], [10], [7, 0, 13], [5, 5, 5], [31, 2]])
@pytest.mark.parametrize("specials", [False, True])
def test_topk_threshold_keeps_exactly_the_brute_force_set(seed, sizes, specials):
    tensors = [tied_scores((n,), levels=4).abs() for n in sizes]
    if specials:
        tensors = [with_specials(t) for t in tensors]
    total = sum(sizes)
    for k in sorted({0, 1, total // 3, total // 2, total - 1, total, total + 5} - {-1}):
        thresholds = reference.topk_threshold(tensors, k)
        assert thresholds.shape == (len(tensors), 2) and thresholds.dtype == torch.float64
        expected = brute_kept(tensors, k)
        for tensor, threshold, want in zip(tensors, thresholds, expected):
            kept = reference.kept_blocks(tensor, threshold)
            assert set(kept.nonzero().reshape(-1).tolist()) == want, (k, tensor, threshold)


def test_topk_threshold_cut_is_canonical():
    # value 1.0 is the k-th; ties at global positions 1, 3 (tensor 0) and 4, 6 (tensor 1); k = 3 keeps
    # 2.0 and the ties at 1 and 3: tensor 0 keeps all its ties (cut = numel), tensor 1 none (cut = 0),
    # tensor 2 has no ties at all (cut = numel).
    tensors = [torch.tensor([2.0, 1.0, 0.5, 1.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.25])]
    thresholds = reference.topk_threshold(tensors, 3)
    assert thresholds.tolist() == [[1.0, 4.0], [1.0, 0.0], [1.0, 1.0]]
    # k = 4: one tie of tensor 1 kept, the one at flat index 0 -> cut 1.
    assert reference.topk_threshold(tensors, 4)[1].tolist() == [1.0, 1.0]
    # k = 0 keeps nothing: (+inf, 0) everywhere.
    assert reference.topk_threshold(tensors, 0).tolist() == [[math.inf, 0.0]] * 3


@pytest.mark.parametrize("shape", [(4, 8), (3, 12, 2, 2), (2, 6, 1, 3)])
@pytest.mark.parametrize("nm", ["2:4", "1:3", "3:4", "0:2", "2:2"])
def test_nm_mask_matches_definition(seed, shape, nm):
    structure = parse_structure(nm)
    if not fits(nm, shape):
        pytest.skip("structure does not fit the shape")
    scores = with_specials(tied_scores(shape, levels=4))
    mask = reference.block_mask(scores, None, structure).reshape(-1).tolist()
    groups: dict[int, list[tuple[float, int, int]]] = {}
    for flat, value in enumerate(scores.reshape(-1).tolist()):
        group = brute_block_of(structure, shape, flat)
        groups.setdefault(group, []).append((-abs(value), len(groups.get(group, [])), flat))
    for members in groups.values():
        ranked = sorted(m for m in members if not math.isnan(m[0]))
        kept = {flat for _, _, flat in ranked[:structure.a]}
        assert {flat for _, _, flat in members if mask[flat]} == kept


@pytest.mark.parametrize("implicit", ["paper", "released"])
def test_hypergrad_matches_formula(seed, implicit):
    structure = parse_structure("unstructured")
    weight, grad = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    scores = torch.randn(6, 5, dtype=torch.float64)  # signed: grad_s carries sign(s), the mask ranks |s|
    scores[0, :3] = torch.tensor([0.0, -0.0, float("nan")], dtype=torch.float64)  # sign +1
    threshold = reference.topk_threshold([scores.abs()], 11)[0]
    mask = reference.block_mask(scores, threshold, structure)
    grad_weight, grad_scores = reference.hypergrad(grad, weight, scores, threshold, structure, 0.25, implicit)
    for g, theta, s, m, gw, gs in zip(grad.reshape(-1).tolist(), weight.reshape(-1).tolist(),
                                      scores.reshape(-1).tolist(), mask.reshape(-1).tolist(),
                                      grad_weight.reshape(-1).tolist(), grad_scores.reshape(-1).tolist()):
        implicit_term = (theta * g) ** 2 if implicit == "released" else (g * g if m else 0.0)
        assert gw == (g if m else 0.0)
        sign = -1.0 if s < 0 else 1.0
        assert gs == pytest.approx(sign * (theta * g - 0.25 * implicit_term), rel=1e-15, abs=1e-300)


@pytest.mark.parametrize("structure_name", ["filter", "channel", "tile2x3"])
def test_block_mask_owns_its_memory(seed, structure_name):
    """A structured mask is a tensor of its own, as the kernels give: it was an expanded view of the
    kept blocks, so writing one element wrote its whole block, and in-place ops refused it."""
    structure = parse_structure(structure_name).fitted((6, 4, 3, 3))
    scores = torch.rand(6, 4, 3, 3)
    block_scores = reference.block_scores(scores, structure)
    mask = reference.block_mask(scores, reference.topk_threshold([block_scores], 3)[0], structure)
    assert mask.is_contiguous()
    before = mask.clone()
    mask[0, 0, 0, 0] = ~mask[0, 0, 0, 0]
    assert int((mask != before).sum()) == 1
    mask &= torch.ones_like(mask)
