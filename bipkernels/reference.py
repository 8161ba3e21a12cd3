"""Pure-PyTorch version of every bipkernels op: the CPU/GPU fallback and the oracle of the tests.

The contracts (shared with csrc/include/bipkernels/math.h):

- Score type: block scores are float32 for float16, bfloat16 and float32 scores, float64 for float64.
  A block score reduces |s| in float64 (p = 1: Σ|s|, p = 2: Σs², the squared norm, which ranks blocks
  like the norm without a square root) and is rounded once to the score type.
- Threshold: a float64 tensor (value, cut) per tensor. Block i (flat block index) is kept iff its score
  is not NaN and (score > value, or score == value and i < cut). Keep-all is (-inf, +inf), keep-none
  (+inf, 0). N:M ignores the threshold.
- topk_threshold keeps exactly min(k, number of non-NaN block scores) blocks over all tensors together:
  the largest scores, ties broken by the lowest global flat index (tensor order, then flat index). Its
  cut per tensor is canonical: (+inf, 0) for every tensor when nothing is kept; else the tensor's numel
  where every one of its scores equal to the value is kept (also where it has none), 0 where none of them
  is, else 1 + the flat index of its last kept one.
- hypergrad: grad_θ = m ⊙ g (a select) and grad_s = sign(s) ⊙ (θ ⊙ g − inv_gamma · I), with
  I = m ⊙ g ⊙ g (paper) or (θ ⊙ g)² (released), sign(s) = -1 for s < 0 and +1 otherwise, computed in
  float32 for half types; inv_gamma = 0 gives sign(s) ⊙ θ ⊙ g even where g ⊙ g overflows.
- Result layout of masked_weight and hypergrad: the weight's own (channels_last stays channels_last) for
  an unstructured mask over dense tensors of one layout (keeps_weight_layout), contiguous otherwise;
  the kernels then run over memory order, with no copies (math.h: MemoryOrder). The flat index of the
  tie rule is always the logical (row-major) one.

No function here synchronises with the host.
"""

from __future__ import annotations

import torch

from .structures import Structure

IMPLICIT_FORMS = ("paper", "released")


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type of block scores (and of the arithmetic) for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def largest_inv_gamma(dtype: torch.dtype) -> float:
    """The largest inv_gamma that hypergrad takes for weights of ``dtype``: the largest finite value of their
    arithmetic (score_dtype), since an infinite one times a pruned entry's zero implicit term would give NaN
    there, not θ ⊙ g (every backend's check: ops.check_implicit_term, the triton ops, checks.h)."""
    return torch.finfo(score_dtype(dtype)).max


def _matrix(tensor: torch.Tensor, structure: Structure) -> torch.Tensor:
    rows, cols, _, _ = structure.matrix_shape(tensor.shape)
    return tensor.reshape(rows, cols)


def block_scores(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Σ|s| (p = 1) or Σs² (p = 2) per block; shape ``structure.block_scores_shape(scores.shape)``, dtype
    score_dtype."""
    out_dtype = score_dtype(scores.dtype)
    if structure.kind in ("unstructured", "nm"):
        return scores.to(out_dtype).abs()
    magnitude = scores.double().abs()
    if structure.p == 2:
        magnitude = magnitude * magnitude
    rows, cols, channels, inner = structure.matrix_shape(scores.shape)
    # Each block's elements in a row of their own, in increasing flat index: the canonical order of
    # math.h, which the C++ kernels sum in. cumsum adds them in that order on the CPU (float64 sums round
    # by their order, so a boundary block of float64 scores keeps its rank across the two backends).
    if structure.kind == "filter":
        blocks = magnitude.reshape(rows, cols)
    elif structure.kind == "channel":
        blocks = magnitude.reshape(rows, channels, inner).transpose(0, 1).reshape(channels, rows * inner)
    else:  # tile: pad with zeros to whole tiles, which leaves every sum unchanged
        tile_rows, tile_cols = structure.block_scores_shape(scores.shape)
        padded = torch.nn.functional.pad(
            magnitude.reshape(rows, cols), (0, tile_cols * structure.b - cols, 0, tile_rows * structure.a - rows))
        blocks = padded.reshape(tile_rows, structure.a, tile_cols, structure.b).transpose(1, 2) \
            .reshape(tile_rows, tile_cols, structure.a * structure.b)
    summed = blocks.cumsum(-1)[..., -1] if blocks.shape[-1] else blocks.sum(-1)
    return summed.to(out_dtype)


def topk_threshold(block_scores_list: list[torch.Tensor], k: int, absolute: bool = False) -> torch.Tensor:
    """(L, 2) float64 thresholds (value, cut), one row per tensor, keeping the top k blocks of all.

    ``absolute`` ranks |x| instead of x (unstructured block scores taken straight from the scores)."""
    if not block_scores_list:
        return torch.empty(0, 2, dtype=torch.float64)
    device = block_scores_list[0].device
    flat = [(b.abs() if absolute else b).reshape(-1).double() for b in block_scores_list]
    values = torch.cat(flat)
    nan = values.isnan()
    kept = torch.clamp((~nan).sum(), max=k)
    ordered = torch.sort(values.masked_fill(nan, float("-inf")), descending=True).values
    # gather, not indexing by a tensor: that would read the index on the host (a sync, and no torch.compile).
    kth = ordered.gather(0, torch.clamp(kept - 1, min=0).reshape(1)).reshape(()) if len(ordered) else kept.double()
    value = torch.where(kept > 0, kth, torch.tensor(float("inf"), dtype=torch.float64, device=device))
    ties_kept = kept - (values > value).sum()
    rows, ties_before = [], torch.zeros((), dtype=torch.int64, device=device)
    for scores in flat:
        equal = scores == value
        ties_here = equal.sum()
        kept_here = torch.clamp(ties_kept - ties_before, min=0)
        kept_here = torch.minimum(kept_here, ties_here)
        last_kept = (equal.cumsum(0) < kept_here).sum() + 1  # 1 + flat index of the kept_here-th tie
        cut = torch.where(kept_here == ties_here, scores.numel(), torch.where(kept_here == 0, 0, last_kept))
        cut = torch.where(kept == 0, 0, cut)
        rows.append(torch.stack([value, cut.double()]))
        ties_before = ties_before + ties_here
    return torch.stack(rows)


def kept_blocks(block_score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(n,) bool: which of the blocks ``block_score`` (any shape, n blocks, read flat) ``threshold`` (a
    float64 (value, cut) pair) keeps: those above the value, and the ties with a flat index below the cut.
    The value is compared in the block scores' dtype. NaN blocks are never kept."""
    value = threshold[0].to(block_score.dtype)
    index = torch.arange(block_score.numel(), device=block_score.device, dtype=torch.float64)
    tie_kept = (block_score.reshape(-1) == value) & (index < threshold[1])
    return (block_score.reshape(-1) > value) | tie_kept


def _nm_mask(scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    rows, _, channels, inner = structure.matrix_shape(scores.shape)
    n, m = structure.a, structure.b
    grouped = scores.to(score_dtype(scores.dtype)).abs().reshape(rows, channels // m, m, inner)
    mine, other = grouped.unsqueeze(3), grouped.unsqueeze(2)  # (.., i, 1, ..) against (.., 1, j, ..)
    lower = torch.ones(m, m, dtype=torch.bool, device=scores.device).tril(-1).reshape(m, m, 1)  # j < i
    beaten_by = ((other > mine) | ((other == mine) & lower)).sum(3)
    return (~grouped.isnan() & (beaten_by < n)).reshape(scores.shape).contiguous()  # as the kernels return it


def block_mask(scores: torch.Tensor, threshold: torch.Tensor | None, structure: Structure) -> torch.Tensor:
    """Boolean mask shaped like ``scores``: the blocks kept under ``threshold``."""
    if structure.kind == "nm":
        return _nm_mask(scores, structure)
    kept = kept_blocks(block_scores(scores, structure), threshold)
    rows, cols, channels, inner = structure.matrix_shape(scores.shape)
    if structure.kind == "unstructured":
        return kept.reshape(scores.shape)
    if structure.kind == "filter":
        expanded = kept.reshape(rows, 1).expand(rows, cols)
    elif structure.kind == "channel":
        expanded = kept.reshape(1, channels, 1).expand(rows, channels, inner)
    else:
        tile_rows, tile_cols = structure.block_scores_shape(scores.shape)
        tiles = kept.reshape(tile_rows, tile_cols)
        expanded = tiles.repeat_interleave(structure.a, 0).repeat_interleave(structure.b, 1)[:rows, :cols]
    # A copy, as the kernels give: an expanded view shares one element's memory among a block's.
    return expanded.reshape(scores.shape).contiguous()


def _dense(tensor: torch.Tensor) -> bool:
    """c10's is_non_overlapping_and_dense: empty, or the dims of size >= 2, by stride, tile memory exactly."""
    if tensor.numel() == 0:  # c10 counts an empty tensor contiguous whatever its strides
        return True
    expected = 1
    for size, stride in sorted(((size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size >= 2),
                               key=lambda dim: dim[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def keeps_weight_layout(structure: Structure, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether masked_weight / hypergrad give results in ``weight``'s layout: an unstructured mask
    (each element decides alone) and ``weight`` dense (at most 8 dims) with the strides of ``others``
    (scores, grad). Structured blocks are defined in logical order, so their results are contiguous."""
    return (structure.kind == "unstructured" and weight.dim() <= 8 and _dense(weight)
            and all(other.stride() == weight.stride() for other in others))


def in_result_layout(result: torch.Tensor, keep_layout: bool, weight: torch.Tensor) -> torch.Tensor:
    """``result`` (of weight's shape) in weight's strides for ``keep_layout``, else contiguous."""
    if not keep_layout:  # an empty tensor counts as contiguous whatever its strides: give it standard ones
        return result.contiguous() if result.numel() else result.new_empty(result.shape)
    return result.new_empty_strided(weight.shape, weight.stride()).copy_(result)  # (ops._empty_result: why)


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: Structure) -> torch.Tensor:
    """θ where kept and exactly 0 where pruned (a select: a pruned NaN or inf weight gives 0)."""
    mask = block_mask(scores, threshold, structure)
    masked = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return in_result_layout(masked, keeps_weight_layout(structure, weight, scores), weight)


def hypergrad(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
              structure: Structure, inv_gamma: float = 0.0, implicit: str = "paper"):
    """(grad_θ, grad_s) of z = m ⊙ θ given g = ∂l/∂z; see the module docstring."""
    gradients = hypergrad_of_mask(grad, weight, scores, block_mask(scores, threshold, structure), inv_gamma, implicit)
    keep_layout = keeps_weight_layout(structure, weight, scores, grad)
    return tuple(in_result_layout(result, keep_layout, weight) for result in gradients)


def hypergrad_of_mask(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                      inv_gamma: float, implicit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hypergrad given the bool ``mask`` (all four of one shape), in weight's dtype and in torch operations
    that autograd differentiates again (the masked layers' double backward), with no branch on a value
    (a compiled graph's inv_gamma may be symbolic)."""
    acc = score_dtype(weight.dtype)
    g, theta = grad.to(acc), weight.to(acc)
    zero = torch.zeros((), dtype=acc, device=weight.device)
    direct = theta * g
    implicit_term = direct * direct if implicit == "released" else torch.where(mask, g * g, zero)
    # A select in the gradient's own dtype: a NaN keeps its bits (a round trip through float32 made
    # bfloat16's NaN 0xFFFF on the CPU).
    grad_weight = torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    # inv_gamma 0 in the accumulation type (as the kernels test it) is the plain straight-through gradient,
    # even where g * g overflows (0 * inf is NaN).
    inv_gamma_acc = torch.full((), inv_gamma, dtype=acc, device=weight.device)
    grad_mask = torch.where(inv_gamma_acc != 0, direct - inv_gamma_acc * implicit_term, direct)
    # The mask ranks |s|: straight-through, grad_s = sign(s) ⊙ grad_m (+1 at 0, -0.0 and NaN), so a step
    # moves |s| the way the loss asks whatever the sign of s (autograd through |s| in the released code).
    grad_scores = torch.where(scores < 0, -grad_mask, grad_mask)
    return grad_weight.to(weight.dtype), grad_scores.to(weight.dtype)
