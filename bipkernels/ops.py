"""The public ops: argument checks, the backend choice, and the fake kernels of the compiled ops.

Backends: ``torch`` (bipkernels.reference), ``cpu`` (C++), ``cuda`` (C++/CUDA), ``triton``. By default a
CPU tensor runs the C++ kernel when the extension is built, else the reference; a CUDA tensor runs the
CUDA kernel when there is one for the op, else the reference (with one warning per op).
``BIPKERNELS_BACKEND=torch|cpu|cuda|triton`` forces one backend: if it cannot serve a call, the call
raises instead of falling back.

Keep counts: ``keep_count(n, sparsity)`` = round-half-up((1 − sparsity) · n), clamped to [0, n].
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import reference
from .reference import IMPLICIT_FORMS
from .structures import KINDS, Structure, parse_structure

try:
    from . import _C
except ImportError as _error:  # a source checkout without a build, or a build for another torch
    _C = None
    warnings.warn(f"bipkernels: the compiled extension is not available ({_error}); "
                  "every op runs the pure-PyTorch reference", stacklevel=2)

BACKENDS = ("torch", "cpu", "cuda", "triton")
OP_NAMES = ("block_scores", "topk_threshold", "block_mask", "masked_weight", "hypergrad")
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[tuple[str, str]] = set()


def _registered_kernels() -> dict[str, list[str]]:
    return _C.registered_kernels() if _C is not None else {}


_KERNELS = _registered_kernels()


def _available(backend: str, op: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        return "the triton backend has no kernels yet"
    if _C is None:
        return "the compiled extension is not available"
    if device.type != backend:
        return f"the {backend} backend does not run {device.type} tensors"
    if backend.upper() not in _KERNELS.get(op, []):
        return f"the extension was built without a {backend} kernel for {op}"
    return None


def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` (see the module docstring)."""
    forced = os.environ.get("BIPKERNELS_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BIPKERNELS_BACKEND must be one of {BACKENDS}, got {forced!r}")
        reason = _available(forced, op, device)
        if reason:
            raise RuntimeError(f"bipkernels.{op}: BIPKERNELS_BACKEND={forced} cannot run on {device}: {reason}")
        return forced
    if device.type in ("cpu", "cuda"):
        reason = _available(device.type, op, device)
        if reason is None:
            return device.type
        if device.type == "cuda" and (op, reason) not in _warned:
            _warned.add((op, reason))
            warnings.warn(f"bipkernels.{op}: {reason}; running the PyTorch reference on {device}", stacklevel=3)
    return "torch"


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float, or ValueError unless it is a number in [0, 1]."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def keep_count(n: int, sparsity: float) -> int:
    """Blocks kept out of ``n`` at ``sparsity`` (the pruned fraction): round-half-up((1 − sparsity)·n)."""
    sparsity = check_sparsity(sparsity)
    return min(max(math.floor((1.0 - sparsity) * n + 0.5), 0), n)


# ----------------------------------------------------------------------------------------------- checks


def _check_float(op: str, name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"bipkernels.{op}: {name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOATING:
        raise TypeError(f"bipkernels.{op}: {name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")


def _check_like(op: str, name: str, tensor, like_name: str, like: torch.Tensor) -> None:
    _check_float(op, name, tensor)
    for what, mine, theirs in (("shape", tuple(tensor.shape), tuple(like.shape)), ("dtype", tensor.dtype, like.dtype),
                               ("device", tensor.device, like.device)):
        if mine != theirs:
            raise ValueError(f"bipkernels.{op}: {name} has {what} {mine} but {like_name} has {what} {theirs}")


def _check_threshold(op: str, threshold, scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The threshold as the compiled ops take it (N:M: a placeholder, it is not read)."""
    if not structure.uses_threshold:
        return torch.empty(2, dtype=torch.float64, device=scores.device) if threshold is None else threshold
    if not isinstance(threshold, torch.Tensor) or threshold.dtype != torch.float64 or tuple(threshold.shape) != (2,):
        got = f"{threshold.dtype} of shape {tuple(threshold.shape)}" if isinstance(threshold, torch.Tensor) else \
            type(threshold).__name__
        raise ValueError(f"bipkernels.{op}: threshold must be a float64 tensor of shape (2,) = (value, cut), got {got}")
    if threshold.device != scores.device:
        raise ValueError(f"bipkernels.{op}: threshold is on {threshold.device} but scores are on {scores.device}")
    return threshold


def _structure(op: str, structure, p, scores: torch.Tensor) -> Structure:
    """The parsed structure, checked against the scores' shape; errors name the op."""
    try:
        parsed = parse_structure(structure, p)
        parsed.check_shape(scores.shape, "scores")
    except (ValueError, TypeError) as error:
        raise type(error)(f"bipkernels.{op}: {error}") from None
    return parsed


# -------------------------------------------------------------------------------------------------- ops


def block_scores(scores: torch.Tensor, structure: str | Structure = "unstructured", p: int | None = None):
    """|s| reduced within each block of ``structure``: Σ|s| for ``p`` = 1, Σs² (squared norm) for 2.

    Shapes: unstructured and N:M keep the shape of ``scores``; filter gives (out,), channel (in,), tile
    (ceil(rows/h), ceil(cols/w)). dtype: float32 (float64 for float64 scores). Empty in, empty out.
    """
    _check_float("block_scores", "scores", scores)
    parsed = _structure("block_scores", structure, p, scores)
    if backend_for("block_scores", scores.device) == "torch":
        return reference.block_scores(scores, parsed)
    return torch.ops.bipkernels.block_scores(scores, *parsed.op_args())


def topk_threshold(block_scores_list, k: int) -> torch.Tensor:
    """Thresholds (L, 2) float64 that keep the top ``k`` of all block scores of the list together.

    The per-tensor form, a single tensor instead of a list, returns its one threshold of shape (2,).

    Exactly min(k, non-NaN count) blocks are kept; ties go to the lowest global flat index (list order,
    then flat index). Row i = (value, cut) of tensor i, on the tensors' device. k = 0 keeps nothing;
    k >= the number of blocks keeps every non-NaN block. No host synchronisation.
    """
    op = "topk_threshold"
    if isinstance(block_scores_list, torch.Tensor):
        return topk_threshold([block_scores_list], k)[0]
    block_scores_list = list(block_scores_list)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"bipkernels.{op}: k must be an int >= 0, got {k!r}")
    for i, tensor in enumerate(block_scores_list):
        _check_float(op, f"block_scores[{i}]", tensor)
        first = block_scores_list[0]
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(f"bipkernels.{op}: block_scores[{i}] is {tensor.dtype} on {tensor.device} but "
                             f"block_scores[0] is {first.dtype} on {first.device}")
    device = block_scores_list[0].device if block_scores_list else torch.device("cpu")
    if backend_for(op, device) == "torch":
        return reference.topk_threshold(block_scores_list, k)
    return torch.ops.bipkernels.topk_threshold(block_scores_list, k)


def block_mask(scores: torch.Tensor, threshold: torch.Tensor | None, structure: str | Structure = "unstructured",
               p: int | None = None) -> torch.Tensor:
    """Bool mask shaped like ``scores``: the elements whose block is kept under ``threshold``."""
    _check_float("block_mask", "scores", scores)
    parsed = _structure("block_mask", structure, p, scores)
    threshold = _check_threshold("block_mask", threshold, scores, parsed)
    if backend_for("block_mask", scores.device) == "torch":
        return reference.block_mask(scores, threshold, parsed)
    return torch.ops.bipkernels.block_mask(scores, threshold, *parsed.op_args())


def topk_masks(scores_list, k: int | None, structure: str | Structure = "unstructured", p: int | None = None):
    """Bool masks shaped like each of ``scores_list`` that keep the top ``k`` blocks of all together.

    For N:M structures the masks keep N of every M by themselves and ``k`` must be None.
    """
    parsed = parse_structure(structure, p)
    scores_list = [scores_list] if isinstance(scores_list, torch.Tensor) else list(scores_list)
    if not parsed.uses_threshold:
        if k is not None:
            raise ValueError(f"bipkernels.topk_masks: N:M structure {parsed} keeps N of every M; k must be None, got {k!r}")
        return [block_mask(scores, None, parsed) for scores in scores_list]
    thresholds = topk_threshold([block_scores(scores, parsed) for scores in scores_list], k)
    return [block_mask(scores, threshold, parsed) for scores, threshold in zip(scores_list, thresholds)]


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: str | Structure = "unstructured", p: int | None = None) -> torch.Tensor:
    """θ ⊙ m with m recomputed from ``scores`` and ``threshold``; pruned entries are exactly 0 (a select)."""
    _check_float("masked_weight", "weight", weight)
    _check_like("masked_weight", "scores", scores, "weight", weight)
    parsed = _structure("masked_weight", structure, p, scores)
    threshold = _check_threshold("masked_weight", threshold, scores, parsed)
    if backend_for("masked_weight", weight.device) == "torch":
        return reference.masked_weight(weight, scores, threshold, parsed)
    return torch.ops.bipkernels.masked_weight(weight, scores, threshold, *parsed.op_args())


def hypergrad(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
              structure: str | Structure = "unstructured", p: int | None = None, inv_gamma: float = 0.0,
              implicit: str = "paper"):
    """Both levels' gradients of z = m ⊙ θ from g = ∂l/∂z in one pass: (grad_θ, grad_s).

    grad_θ = m ⊙ g; grad_s = θ ⊙ g − inv_gamma · I with I = m ⊙ g ⊙ g (``implicit="paper"``) or
    (θ ⊙ g)² (``"released"``, the official code's G1 ⊙ G2). inv_gamma = 0 is HYDRA's straight-through
    score gradient. Shapes and dtype of ``weight``; half types compute in float32.
    """
    op = "hypergrad"
    _check_float(op, "weight", weight)
    _check_like(op, "grad", grad, "weight", weight)
    _check_like(op, "scores", scores, "weight", weight)
    if implicit not in IMPLICIT_FORMS:
        raise ValueError(f"bipkernels.{op}: implicit must be one of {IMPLICIT_FORMS}, got {implicit!r}")
    if isinstance(inv_gamma, bool) or not isinstance(inv_gamma, (int, float)) or not math.isfinite(inv_gamma):
        raise ValueError(f"bipkernels.{op}: inv_gamma must be a finite number, got {inv_gamma!r}")
    parsed = _structure(op, structure, p, scores)
    threshold = _check_threshold(op, threshold, scores, parsed)
    if backend_for(op, weight.device) == "torch":
        return reference.hypergrad(grad, weight, scores, threshold, parsed, float(inv_gamma), implicit)
    return torch.ops.bipkernels.hypergrad(grad, weight, scores, threshold, *parsed.op_args(), float(inv_gamma),
                                          IMPLICIT_FORMS.index(implicit))


# ---------------------------------------------------------------------------------------- fake kernels


def _structure_of(kind: int, a: int, b: int, p: int) -> Structure:
    return Structure(KINDS[kind], a, b, p)


if _C is not None:

    @torch.library.register_fake("bipkernels::block_scores")
    def _block_scores_fake(scores, kind, a, b, p):
        _check_float("block_scores", "scores", scores)
        shape = _structure_of(kind, a, b, p).block_scores_shape(scores.shape)
        return scores.new_empty(shape, dtype=reference.score_dtype(scores.dtype))

    @torch.library.register_fake("bipkernels::topk_threshold")
    def _topk_threshold_fake(block_scores_list, k):
        device = block_scores_list[0].device if block_scores_list else torch.device("cpu")
        return torch.empty(len(block_scores_list), 2, dtype=torch.float64, device=device)

    @torch.library.register_fake("bipkernels::block_mask")
    def _block_mask_fake(scores, threshold, kind, a, b, p):
        _check_threshold("block_mask", threshold, scores, _structure_of(kind, a, b, p))
        return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bipkernels::masked_weight")
    def _masked_weight_fake(weight, scores, threshold, kind, a, b, p):
        _check_like("masked_weight", "scores", scores, "weight", weight)
        _check_threshold("masked_weight", threshold, scores, _structure_of(kind, a, b, p))
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bipkernels::hypergrad")
    def _hypergrad_fake(grad, weight, scores, threshold, kind, a, b, p, inv_gamma, implicit):
        _check_like("hypergrad", "grad", grad, "weight", weight)
        _check_like("hypergrad", "scores", scores, "weight", weight)
        _check_threshold("hypergrad", threshold, scores, _structure_of(kind, a, b, p))
        empty = torch.empty_like(weight, memory_format=torch.contiguous_format)
        return empty, torch.empty_like(empty)
