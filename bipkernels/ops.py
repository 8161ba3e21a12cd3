"""The public ops: argument checks, the backend choice, and the fake kernels of the compiled ops.

Backends: ``torch`` (bipkernels.reference), ``cpu`` (C++), ``cuda`` (C++/CUDA), ``triton``. By default a
CPU tensor runs the C++ kernel when the extension is built, else the reference; a CUDA tensor runs the
backend that bipkernels.triton.AUTO_ON_CUDA picks for the op (with the measurement behind it), else the
reference (with one warning per op, also for a CPU build that lacks an op's kernel). The triton backend
runs CUDA tensors, and CPU tensors under the Triton interpreter (TRITON_INTERPRET=1); importing
bipkernels never imports triton.
``BIPKERNELS_BACKEND=torch|cpu|cuda|triton`` forces one backend: if it cannot serve a call, the call
raises instead of falling back.

Keep counts: ``keep_count(n, sparsity)`` = round-half-up((1 − sparsity) · n), clamped to [0, n].
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import warnings

import torch

from . import op_autograd, reference
from . import triton as _triton
from .reference import IMPLICIT_FORMS
from .structures import KINDS, Structure, parse_structure

try:
    # import_module, not `from . import _C`: while the package initialises, the latter reports a missing _C as
    # "partially initialized module ... (most likely due to a circular import)", which sends users astray.
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as _error:  # a source checkout without a build, or a build for another torch
    _C = None
    _why = (f"{__package__}._C is not built: `pip install --no-build-isolation .` in the source tree builds it"
            if isinstance(_error, ModuleNotFoundError) and _error.name == f"{__package__}._C" else str(_error))
    warnings.warn(f"bipkernels: the compiled extension is not available ({_why}); "
                  "every op runs the pure-PyTorch reference", stacklevel=2)

BACKENDS = ("torch", "cpu", "cuda", "triton")
OP_NAMES = ("block_scores", "topk_threshold", "block_mask", "masked_weight", "hypergrad")
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[tuple[str, str]] = set()


if _C is not None:
    op_autograd.register("bipkernels")


def _registered_kernels() -> dict[str, list[str]]:
    return _C.registered_kernels() if _C is not None else {}


_KERNELS = _registered_kernels()


def _available(backend: str, op: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton.unavailable(op, device)
    if _C is None:
        return "the compiled extension is not available"
    if device.type != backend:
        return f"the {backend} backend does not run {device.type} tensors"
    if backend.upper() not in _KERNELS.get(op, []):
        return f"the extension was built without a {backend} kernel for {op}"
    return None


def _forced_backend() -> str:
    return os.environ.get("BIPKERNELS_BACKEND", "").strip().lower()


def _kernels(backend: str):
    """The compiled ops of ``backend``: the C++ ones (the dispatcher picks the cpu or cuda kernel by
    device) or the triton ones (imported and registered on first use)."""
    if backend == "triton":
        _triton.load()
        return torch.ops.bipkernels_triton
    return torch.ops.bipkernels


def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` (see the module docstring)."""
    forced = _forced_backend()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BIPKERNELS_BACKEND must be one of {BACKENDS}, got {forced!r}")
        reason = _available(forced, op, device)
        if reason:
            raise RuntimeError(f"bipkernels.{op}: BIPKERNELS_BACKEND={forced} cannot run on {device}: {reason}")
        return forced
    if device.type in ("cpu", "cuda"):
        choice = _triton.AUTO_ON_CUDA.get(op, ("cuda",))[0] if device.type == "cuda" else "cpu"
        reason = _available(choice, op, device)
        if reason is None:
            return choice
        # Without the extension at all, its import already warned; a build lacking one op's kernel warns here.
        if (device.type == "cuda" or _C is not None) and (op, reason) not in _warned:
            _warned.add((op, reason))
            warnings.warn(f"bipkernels.{op}: {reason}; running the PyTorch reference on {device}", stacklevel=3)
    return "torch"


def check_int(owner: str, name: str, value, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int if it is one (not a bool) in [minimum, maximum]; else ValueError naming
    ``owner`` (left out when empty), ``name`` and the value."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (integral and minimum <= value and (maximum is None or value <= maximum)):
        raise ValueError(f"{owner + ': ' if owner else ''}{name} must be an int {bounds}, got {value!r}")
    return int(value)


def check_number(owner: str, name: str, value, minimum: float = 0.0, maximum: float = math.inf,
                 open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a float if it is a finite real (not a bool) between ``minimum`` and ``maximum``, each
    included unless ``open_low`` / ``open_high``; else ValueError naming ``owner`` (left out when empty),
    ``name`` and the value. NaN and ±inf always fail. Under torch.compile the value (a symbolic float once
    a setting changed after the first compilation) is checked by the comparisons alone, which become
    guards of the graph (math.isfinite and repr would break it): NaN fails them, ±inf too unless a bound
    is infinite."""
    within = lambda: ((minimum < value if open_low else minimum <= value)  # noqa: E731
                      and (value < maximum if open_high else value <= maximum))
    if torch.compiler.is_compiling():
        # Outside the bounds: the check runs eagerly (a graph break; under fullgraph torch refuses it),
        # since dynamo cannot trace its message (it failed inside dynamo on the format of the bounds).
        return value if within() else torch.compiler.disable(check_number)(owner, name, value, minimum, maximum,
                                                                           open_low, open_high)
    low = f"{'(' if open_low else '['}{minimum:g}"
    bounds = f"{'>' if open_low else '>='} {minimum:g}" if maximum == math.inf else \
        f"in {low}, {maximum:g}{')' if open_high else ']'}"
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        finite = real and math.isfinite(value)
    except OverflowError:  # an int past the float range (10**400)
        finite = False
    if not (finite and (minimum < value if open_low else minimum <= value)
            and (value < maximum if open_high else value <= maximum)):
        kind = "number" if finite or not real else "finite number"
        raise ValueError(f"{owner + ': ' if owner else ''}{name} must be a {kind} {bounds}, got {value!r}")
    return float(value)


def check_sparsity(sparsity, owner: str = "bipkernels") -> float:
    """``sparsity`` (the pruned fraction) as a float, or ValueError unless it is a number in [0, 1]."""
    return check_number(owner, "sparsity", sparsity, 0.0, 1.0)


def keep_count(n: int, sparsity: float) -> int:
    """Blocks kept out of ``n`` >= 0 at ``sparsity`` (the pruned fraction): round-half-up((1 − sparsity)·n),
    so in [0, n]; keep_count(0, s) = 0. The product is exact, with ``sparsity`` read as the decimal it
    prints as: keep_count(5, 0.9) = 1 (0.5 rounds up), although 1 − 0.9 is 0.09999999999999998 in floats."""
    n = check_int("bipkernels.keep_count", "n", n)
    sparsity = check_sparsity(sparsity, "bipkernels.keep_count")
    if torch.compiler.is_compiling():  # dynamo traces no repr of a float, and a symbolic one has none
        # The product in floats is off by at most n·2^-52 from (1 − decimal)·n (the decimal's own rounding,
        # 1 − s, the product): where it lies farther than that (n·2^-50, to spare) from a half, rounding it
        # is exact; nearer, the decimal is found by search (a guard on the value, so the rare near-half
        # sparsity compiles on its own).
        kept = (1.0 - sparsity) * n
        if abs(kept - math.floor(kept) - 0.5) > n * 2.0**-50:
            return min(max(math.floor(kept + 0.5), 0), n)
        digits, scale = _decimal_by_search(sparsity)
    else:  # sparsity = digits / 10**scale, read from its shortest repr ('0.9', '1e-05')
        mantissa, _, exponent = repr(float(sparsity)).partition("e")
        whole, _, fraction = mantissa.partition(".")
        digits, scale = int(whole + fraction), len(fraction) - int(exponent or 0)
    unit = 10**scale  # then all in ints
    return min(max((2 * (unit - digits) * n + unit) // (2 * unit), 0), n)


def _decimal_by_search(sparsity: float) -> tuple[int, int]:
    """(digits, scale) of a decimal digits / 10**scale that reads as ``sparsity``, in arithmetic dynamo
    traces: repr's own wherever repr needs at most 15 significant digits; with 16 or 17, the scaled
    float's rounding can miss repr's and go on to a longer decimal that reads the same (so a count near a
    half can differ by one from the eager one). For keep_count near a half with n < 2^49: s ≥ 0.5/n
    there, so the search ends within 40 places."""
    scale = 0
    while round(sparsity * 10.0**scale) / 10**scale != sparsity:
        scale += 1
    return round(sparsity * 10.0**scale), scale


# ----------------------------------------------------------------------------------------------- checks


def check_float(op: str, name: str, tensor) -> None:
    """TypeError naming bipkernels.``op`` and ``name`` unless ``tensor`` is a dense floating tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"bipkernels.{op}: {name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOATING:
        raise TypeError(f"bipkernels.{op}: {name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")
    # (Compiled graphs see only strided tensors, and dynamo's autograd.Function tracing bans .layout.)
    if not torch.compiler.is_compiling() and tensor.layout != torch.strided:
        raise TypeError(f"bipkernels.{op}: {name} must be a dense (strided) tensor, got layout {tensor.layout}")


def _check_like(op: str, name: str, tensor, like_name: str, like: torch.Tensor) -> None:
    check_float(op, name, tensor)
    for what, mine, theirs in (("shape", tuple(tensor.shape), tuple(like.shape)), ("dtype", tensor.dtype, like.dtype),
                               ("device", tensor.device, like.device)):
        if mine != theirs:
            raise ValueError(f"bipkernels.{op}: {name} has {what} {mine} but {like_name} has {what} {theirs}")


def _check_threshold(op: str, threshold, scores: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The threshold as the compiled ops take it (N:M: a placeholder, it is not read)."""
    if not structure.uses_threshold:
        if threshold is not None and not isinstance(threshold, torch.Tensor):
            raise TypeError(f"bipkernels.{op}: threshold must be None or a tensor (N:M does not read it), got "
                            f"{type(threshold).__name__} {threshold!r}")
        return torch.empty(2, dtype=torch.float64, device=scores.device) if threshold is None else threshold
    if not isinstance(threshold, torch.Tensor) or threshold.dtype != torch.float64 or tuple(threshold.shape) != (2,):
        got = f"{threshold.dtype} of shape {tuple(threshold.shape)}" if isinstance(threshold, torch.Tensor) else \
            type(threshold).__name__
        # TypeError for what is not a float64 tensor, ValueError for a float64 tensor of another shape.
        kind = ValueError if isinstance(threshold, torch.Tensor) and threshold.dtype == torch.float64 else TypeError
        raise kind(f"bipkernels.{op}: threshold must be a float64 tensor of shape (2,) = (value, cut), got {got}")
    if threshold.device != scores.device:
        raise ValueError(f"bipkernels.{op}: threshold is on {threshold.device} but scores are on {scores.device}")
    return threshold


def _structure(op: str, structure, p, scores: torch.Tensor) -> Structure:
    """The parsed structure, checked against the scores' shape and fitted to it; errors name the op."""
    parsed = parse_structure(structure, p, owner=f"bipkernels.{op}")
    try:
        parsed.check_shape(scores.shape, "scores")
    except ValueError as error:  # its message begins "structure 2:4: "
        raise ValueError(f"bipkernels.{op}: {error}") from None
    return parsed.fitted(scores.shape)


# -------------------------------------------------------------------------------------------------- ops


def block_scores(scores: torch.Tensor, structure: str | Structure = "unstructured", p: int | None = None):
    """|s| reduced within each block of ``structure``: Σ|s| for ``p`` = 1, Σs² (squared norm) for 2;
    unstructured and N:M, whose blocks are single elements, give |s| whatever ``p`` (the same ranking).

    Shapes: unstructured and N:M keep the shape of ``scores``; filter gives (out,), channel (in,), tile
    (ceil(rows/h), ceil(cols/w)). dtype: float32 (float64 for float64 scores). Empty in, empty out.
    """
    check_float("block_scores", "scores", scores)
    parsed = _structure("block_scores", structure, p, scores)
    backend = backend_for("block_scores", scores.device)
    if backend == "torch":
        return reference.block_scores(scores, parsed)
    return _kernels(backend).block_scores(scores, *parsed.op_args())


@torch.no_grad()  # a threshold has no useful derivative: none on any backend (op_autograd)
def topk_threshold(block_scores_list, k: int, *, absolute: bool = False) -> torch.Tensor:
    """Thresholds (L, 2) float64 that keep the top ``k`` of all block scores of the list together.

    The per-tensor form, a single tensor instead of a list, returns its one threshold of shape (2,).
    ``absolute=True`` ranks |x|: pass the scores themselves to get the threshold of their unstructured
    block scores without writing |s| out and reading it back (the same result as block_scores first).

    Exactly min(k, non-NaN count) blocks are kept; ties go to the lowest global flat index (list order,
    then flat index). Row i = (value, cut) of tensor i, on the tensors' device. k = 0 keeps nothing;
    k >= the number of blocks keeps every non-NaN block. No host synchronisation.

    k is a bound on the kept count, not an index (torch.topk raises past n): how many blocks can be kept
    depends on the values (NaN blocks never are), which only a host synchronisation could read, so no k
    can be checked against it; a k past the block count is the same case, kept alike on every backend.
    keep_count(n, sparsity) gives a k in [0, n]; a negative k is a ValueError.
    """
    op = "topk_threshold"
    if isinstance(block_scores_list, torch.Tensor):
        return topk_threshold([block_scores_list], k, absolute=absolute)[0]
    if not isinstance(absolute, bool):
        raise TypeError(f"bipkernels.{op}: absolute must be a bool, got {type(absolute).__name__} {absolute!r}")
    if not isinstance(block_scores_list, (list, tuple)):
        raise TypeError(f"bipkernels.{op}: block_scores_list must be a tensor or a list of tensors, "
                        f"got {type(block_scores_list).__name__} {block_scores_list!r}")
    block_scores_list = list(block_scores_list)
    # k past the number of blocks keeps them all: clamped, a k past int64 still reaches the compiled ops.
    k = min(check_int(f"bipkernels.{op}", "k", k), sum(t.numel() for t in block_scores_list
                                                         if isinstance(t, torch.Tensor)))
    for i, tensor in enumerate(block_scores_list):
        check_float(op, f"block_scores[{i}]", tensor)
        first = block_scores_list[0]
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(f"bipkernels.{op}: block_scores[{i}] is {tensor.dtype} on {tensor.device} but "
                             f"block_scores[0] is {first.dtype} on {first.device}")
    if not block_scores_list:  # nothing to keep, and no tensor that a compiled op could dispatch on
        return reference.topk_threshold(block_scores_list, k)
    backend = backend_for(op, block_scores_list[0].device)
    if backend == "torch":
        return reference.topk_threshold(block_scores_list, k, absolute)
    return _kernels(backend).topk_threshold(block_scores_list, k, absolute)


def block_mask(scores: torch.Tensor, threshold: torch.Tensor | None, structure: str | Structure = "unstructured",
               p: int | None = None) -> torch.Tensor:
    """Bool mask shaped like ``scores``: the elements whose block is kept under ``threshold``."""
    check_float("block_mask", "scores", scores)
    parsed = _structure("block_mask", structure, p, scores)
    threshold = _check_threshold("block_mask", threshold, scores, parsed)
    backend = backend_for("block_mask", scores.device)
    if backend == "torch":
        return reference.block_mask(scores, threshold, parsed)
    return _kernels(backend).block_mask(scores, threshold, *parsed.op_args())


def topk_masks(scores_list, k: int | None, structure: str | Structure = "unstructured", p: int | None = None):
    """Bool masks shaped like each of ``scores_list`` that keep the top ``k`` blocks of all together.

    For N:M structures the masks keep N of every M by themselves and ``k`` must be None.
    """
    parsed = parse_structure(structure, p, owner="bipkernels.topk_masks")
    if not isinstance(scores_list, (torch.Tensor, list, tuple)):
        raise TypeError(f"bipkernels.topk_masks: scores_list must be a tensor or a list of tensors, got "
                        f"{type(scores_list).__name__} {scores_list!r}")
    scores_list = [scores_list] if isinstance(scores_list, torch.Tensor) else list(scores_list)
    if not parsed.uses_threshold:
        if k is not None:
            raise ValueError(f"bipkernels.topk_masks: N:M structure {parsed} keeps N of every M; "
                             f"k must be None, got {k!r}")
        return [block_mask(scores, None, parsed) for scores in scores_list]
    check_int("bipkernels.topk_masks", "k", k)
    thresholds = topk_threshold([block_scores(scores, parsed) for scores in scores_list], k)
    return [block_mask(scores, threshold, parsed) for scores, threshold in zip(scores_list, thresholds)]


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: str | Structure = "unstructured", p: int | None = None) -> torch.Tensor:
    """θ ⊙ m with m recomputed from ``scores`` and ``threshold``; pruned entries are exactly 0 (a select)."""
    check_float("masked_weight", "weight", weight)
    _check_like("masked_weight", "scores", scores, "weight", weight)
    parsed = _structure("masked_weight", structure, p, scores)
    threshold = _check_threshold("masked_weight", threshold, scores, parsed)
    backend = backend_for("masked_weight", weight.device)
    if backend == "torch":
        return reference.masked_weight(weight, scores, threshold, parsed)
    return _kernels(backend).masked_weight(weight, scores, threshold, *parsed.op_args())


def check_implicit_term(owner: str, inv_gamma, implicit, dtype: torch.dtype | None = None) -> float:
    """inv_gamma as a float >= 0 and ``implicit`` one of IMPLICIT_FORMS, else ValueError naming ``owner``;
    given the weights' ``dtype``, inv_gamma must also be finite in their arithmetic (float32 for the half
    types): an infinite one times a pruned entry's zero implicit term would give NaN there, not θ ⊙ g.
    The autograd functions check them in the forward and their backwards run the ops' *_checked forms:
    dynamo cannot compare a float it traces as a graph input (torch.compile(dynamic=True)) inside a
    backward, so a check there would break the compiled graph."""
    if implicit not in IMPLICIT_FORMS:
        raise ValueError(f"{owner}: implicit must be one of {IMPLICIT_FORMS}, got {implicit!r}")
    inv_gamma = check_number(owner, "inv_gamma", inv_gamma)
    if dtype is None:
        return inv_gamma
    return check_number(owner, f"inv_gamma (in the {reference.score_dtype(dtype)} arithmetic of {dtype} weights)",
                        inv_gamma, maximum=reference.largest_inv_gamma(dtype))


def hypergrad(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
              structure: str | Structure = "unstructured", inv_gamma: float = 0.0, implicit: str = "paper", *,
              p: int | None = None):
    """Both levels' gradients of z = m ⊙ θ from g = ∂l/∂z in one pass: (grad_θ, grad_s).

    grad_θ = m ⊙ g; grad_s = sign(s) ⊙ (θ ⊙ g − inv_gamma · I) with I = m ⊙ g ⊙ g (``implicit="paper"``)
    or (θ ⊙ g)² (``"released"``, the official code's G1 ⊙ G2); sign(s) = -1 for s < 0, else +1 (the mask
    ranks |s|). The official code subtracts inv_gamma · I from its score gradient without the sign, so there
    the implicit term of a negative score shrinks |s|; here it moves |s| alike for either sign (the two agree
    where s ≥ 0, as scores initialised to |θ| are). inv_gamma = 0 is HYDRA's straight-through score gradient.
    Shapes and dtype of ``weight``; half types compute in float32. The arguments in DESIGN.md's order; ``p``
    (the block norm, see block_scores) by keyword.
    """
    check_float("hypergrad", "weight", weight)  # its dtype bounds inv_gamma
    inv_gamma = check_implicit_term("bipkernels.hypergrad", inv_gamma, implicit, weight.dtype)
    return hypergrad_checked(grad, weight, scores, threshold, structure, p, inv_gamma, implicit)


@torch.no_grad()  # gradients, not differentiated again: on every backend (op_autograd)
def hypergrad_checked(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                      structure: str | Structure, p: int | None, inv_gamma: float, implicit: str):
    """hypergrad of an ``inv_gamma`` and ``implicit`` that check_implicit_term passed (the tensors and
    the structure are checked here)."""
    op = "hypergrad"
    check_float(op, "weight", weight)
    _check_like(op, "grad", grad, "weight", weight)
    _check_like(op, "scores", scores, "weight", weight)
    parsed = _structure(op, structure, p, scores)
    threshold = _check_threshold(op, threshold, scores, parsed)
    backend = backend_for(op, weight.device)
    if backend == "torch":
        return reference.hypergrad(grad, weight, scores, threshold, parsed, inv_gamma, implicit)
    return _kernels(backend).hypergrad(grad, weight, scores, threshold, *parsed.op_args(), float(inv_gamma),
                                       IMPLICIT_FORMS.index(implicit))


# ------------------------------------------------------------------------------------- masked matmul

_FUSED_LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def masked_linear_fused(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a MaskedLinear call runs the fused masked matmul (masked_linear) instead of masked_weight
    then F.linear: when the triton backend is forced (BIPKERNELS_BACKEND=triton; raises where it cannot
    run) or bipkernels.triton.AUTO_ON_CUDA picks it for CUDA tensors, input and weight share a float32,
    float16 or bfloat16 dtype and a device, and autocast is off. float64 always runs unfused, and so does an
    input that is no tensor (where F.linear's TypeError names it, as nn.Linear's does)."""
    if (not isinstance(input, torch.Tensor) or weight.dtype not in _FUSED_LINEAR_DTYPES or input.dtype != weight.dtype
            or input.device != weight.device):
        return False
    forced = _forced_backend()
    if forced:
        fused = forced == "triton" and backend_for("masked_linear", weight.device) == "triton"
    else:
        fused = (weight.device.type == "cuda" and _triton.AUTO_ON_CUDA["masked_linear"][0] == "triton"
                 and _triton.unavailable("masked_linear", weight.device) is None)
    return fused and not torch.is_autocast_enabled(weight.device.type)


def _masked_linear_kernels(op: str, device: torch.device):
    reason = _triton.unavailable("masked_linear", device)
    if reason:
        raise RuntimeError(f"bipkernels.{op}: the fused masked matmul runs on the triton backend only, which "
                           f"cannot run on {device}: {reason}")
    return _kernels("triton")


def masked_linear(input: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor | None,
                  structure: str | Structure = "unstructured", bias: torch.Tensor | None = None,
                  p: int | None = None) -> torch.Tensor:
    """input (m ⊙ θ)ᵀ + bias by the fused masked matmul (triton backend): the mask is applied to the
    weight tiles as they load, no θ ⊙ m is written.

    input (..., in), weight and scores (out, in), bias (out,) or None -> (..., out) in weight's dtype
    (float32, float16 or bfloat16; bipkernels.triton.masked_linear lists the precisions). Every
    structure. Not differentiable by itself: bipkernels.autograd.masked_linear is.
    """
    op = "masked_linear"
    check_float(op, "weight", weight)
    _check_like(op, "scores", scores, "weight", weight)
    check_float(op, "input", input)
    if bias is not None:
        check_float(op, "bias", bias)
    parsed = _structure(op, structure, p, scores)
    threshold = _check_threshold(op, threshold, scores, parsed)
    return _masked_linear_kernels(op, weight.device).masked_linear(input, weight, scores, threshold, bias,
                                                                   *parsed.op_args())


def masked_linear_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                           scores: torch.Tensor, threshold: torch.Tensor | None,
                           structure: str | Structure = "unstructured", p: int | None = None,
                           inv_gamma: float = 0.0, implicit: str = "paper", input_grad: bool = True):
    """(grad_input or None, grad_θ, grad_s) of masked_linear from grad_output = ∂l/∂y (..., out).

    grad_input = grad_output (m ⊙ θ) (None unless ``input_grad``); grad_θ and grad_s are hypergrad's for
    G = grad_outputᵀ input (over all leading dimensions), computed from the float32 G: by the epilogue of
    the matmul that computes G, or, where a small weight's G is summed from slices of the rows, by the
    hypergradient kernel that sums them. grad_θ, grad_s: (out, in) in weight's dtype.
    """
    check_float("masked_linear_backward", "weight", weight)  # its dtype bounds inv_gamma
    inv_gamma = check_implicit_term("bipkernels.masked_linear_backward", inv_gamma, implicit, weight.dtype)
    return masked_linear_backward_checked(grad_output, input, weight, scores, threshold, structure, p, inv_gamma,
                                          implicit, input_grad)


def masked_linear_backward_checked(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                   scores: torch.Tensor, threshold: torch.Tensor | None, structure: str | Structure,
                                   p: int | None, inv_gamma: float, implicit: str, input_grad: bool):
    """masked_linear_backward of an ``inv_gamma`` and ``implicit`` that check_implicit_term passed."""
    op = "masked_linear_backward"
    check_float(op, "weight", weight)
    _check_like(op, "scores", scores, "weight", weight)
    parsed = _structure(op, structure, p, scores)
    threshold = _check_threshold(op, threshold, scores, parsed)
    kernels = _masked_linear_kernels(op, weight.device)
    grad_input = kernels.masked_linear_grad_input(grad_output, weight, scores, threshold, *parsed.op_args()) \
        if input_grad else None
    grad_weight, grad_scores = kernels.masked_linear_grad_weight(
        grad_output, input, weight, scores, threshold, *parsed.op_args(), inv_gamma, IMPLICIT_FORMS.index(implicit))
    return grad_input, grad_weight, grad_scores


# ---------------------------------------------------------------------------------------- fake kernels


def _structure_of(kind: int, a: int, b: int, p: int) -> Structure:
    return Structure(KINDS[kind], a, b, p)


if _C is not None:

    @torch.library.register_fake("bipkernels::block_scores")
    def _block_scores_fake(scores, kind, a, b, p):
        check_float("block_scores", "scores", scores)
        shape = _structure_of(kind, a, b, p).block_scores_shape(scores.shape)
        return scores.new_empty(shape, dtype=reference.score_dtype(scores.dtype))

    @torch.library.register_fake("bipkernels::topk_threshold")
    def _topk_threshold_fake(block_scores_list, k, absolute=False):
        device = block_scores_list[0].device if block_scores_list else torch.device("cpu")
        return torch.empty(len(block_scores_list), 2, dtype=torch.float64, device=device)

    @torch.library.register_fake("bipkernels::block_mask")
    def _block_mask_fake(scores, threshold, kind, a, b, p):
        _check_threshold("block_mask", threshold, scores, _structure_of(kind, a, b, p))
        return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)

    def _empty_result(kind: int, a: int, b: int, p: int, weight: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        """The C++ kernels' result layout (reference.keeps_weight_layout; checks.h: runs_in_memory_order)."""
        if reference.keeps_weight_layout(_structure_of(kind, a, b, p), weight, *others):
            # Strides given, not preserve_format: a fake (or meta) empty_like of an empty tensor is
            # contiguous, where the kernels' (eager) one keeps the strides.
            return weight.new_empty_strided(weight.shape, weight.stride())
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bipkernels::masked_weight")
    def _masked_weight_fake(weight, scores, threshold, kind, a, b, p):
        _check_like("masked_weight", "scores", scores, "weight", weight)
        _check_threshold("masked_weight", threshold, scores, _structure_of(kind, a, b, p))
        return _empty_result(kind, a, b, p, weight, scores)

    @torch.library.register_fake("bipkernels::hypergrad")
    def _hypergrad_fake(grad, weight, scores, threshold, kind, a, b, p, inv_gamma, implicit):
        _check_like("hypergrad", "grad", grad, "weight", weight)
        _check_like("hypergrad", "scores", scores, "weight", weight)
        _check_threshold("hypergrad", threshold, scores, _structure_of(kind, a, b, p))
        return _empty_result(kind, a, b, p, weight, scores, grad), _empty_result(kind, a, b, p, weight, scores, grad)
