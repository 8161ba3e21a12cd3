"""BiP across processes (torch.distributed).

Replicated models (DistributedDataParallel) need nothing from here. DDP averages every parameter's
gradient, the scores' included, so every rank takes the same optimiser steps on the same values and
bipkernels.project computes the same threshold from the same scores: identical masks and the exact global
kept count on every rank, with no communication of its own. Order: ``convert(model)``, then
``DDP(model)``, then ``BiP(ddp_model, ...)`` (DDP registers the parameters it synchronises when built).
BiP.fit gives each rank its own share of every epoch (solvers.training.epoch_batches). The implicit
term of the score gradient is the average of the ranks' own (g ⊙ g per rank), not the square of the
averaged g that one process on the ranks' batches together would use.

Sharded scores, where each rank holds only some of the masked layers (pipeline stages, layers split for
memory), still need one top-k over every rank's blocks. ``topk_threshold(local_blocks, k, group)`` gives
each rank exactly the rows that bipkernels.topk_threshold would give for its tensors if it were called on
every rank's list concatenated in rank order (ties to the lowest global index: rank, then list order,
then flat index). It is a radix select over 64-bit keys that order the scores like their float64 values:
four all-reduces of a 65,536-bin histogram (one per 16-bit digit, most significant first) and one of the
ranks' tie counts. Scores never leave their rank. ``project`` is nn.project for a model shard, and
``BiP(..., group=group)`` uses it.

Both are collectives: every rank of the group calls them, with the same ``k`` or ``sparsity`` and scope.
Before any work they agree in one small all-reduce: a rank whose arguments fail their checks raises its
own error and every other rank a RuntimeError naming it, and ranks that disagree on ``k``, the scope or
the block scores' dtype all raise the same ValueError, instead of some ranks waiting forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .nn import SCOPES, check_module, ranked_layers
from .nn import project as project_locally

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_SHIFTS = (48, 32, 16, 0)  # the four digits of a 64-bit key, most significant first
_LOW_63 = 0x7FFF_FFFF_FFFF_FFFF


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float64 ``values`` (flattened): the bits of a non-negative float,
    the low 63 bits flipped for a negative one (more negative, smaller key). -0.0 is read as +0.0, which
    it equals (the reference ties them); NaN keys are meaningless and left to the caller to skip."""
    bits = (values.reshape(-1).double() + 0.0).view(torch.int64)
    return torch.where(bits < 0, bits ^ _LOW_63, bits)


def _from_key(key: torch.Tensor) -> torch.Tensor:
    """The float64 whose key (see _keys) is ``key``: the same bit flip undoes itself."""
    return torch.where(key < 0, key ^ _LOW_63, key).view(torch.float64)


def _digit(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """The 16-bit digit of the keys at ``shift``, as an unsigned bin (the top digit carries the sign)."""
    return (keys >> shift) + _BINS // 2 if shift == _SHIFTS[0] else (keys >> shift) & (_BINS - 1)


def collective_device(block_scores: list, group, device: torch.device | None = None) -> torch.device:
    """Where a collective's tensors go: beside ``block_scores``; for none, where the backend takes them: NCCL
    (CUDA tensors only) on ``device`` where it is a GPU (the caller's model's: a DistributedDataParallel
    rank's GPU, given by device_ids, need not be the current one, and two ranks on one GPU fail), else on
    the current GPU; the other backends on the CPU."""
    if block_scores:
        return block_scores[0].device
    if dist.get_backend(group) == "nccl":
        return device if device is not None and device.type == "cuda" else \
            torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_group(owner: str, group) -> None:
    """TypeError naming ``owner`` unless ``group`` is None or a torch.distributed process group. Checked on
    each rank before any collective (and before BiP converts the model): a group of another type cannot
    carry the agreement (_agree) that raises the other errors on every rank."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{owner}: group must be a torch.distributed process group (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(group).__name__} {group!r}")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _no_process_group(owner: str, group) -> ValueError:
    """The error, naming ``owner``, for a collective called before init_process_group (torch's named nothing
    of ours)."""
    return ValueError(f"{owner}: group={group!r}, but torch.distributed has no process group: call "
                      "torch.distributed.init_process_group on every rank first (a model held whole by one process "
                      "needs none: bipkernels.project)")


def group_backend(owner: str, group) -> str:
    """The backend of ``group`` (None: the default group), as check_devices takes it; _no_process_group's
    error before init_process_group."""
    if not _initialised():
        raise _no_process_group(owner, group)
    return dist.get_backend(group)


def check_devices(owner: str, tensors: list, backend: str) -> None:
    """ValueError naming ``owner`` unless ``tensors`` (this rank's scores) lie on one device that a
    ``backend`` collective takes: NCCL communicates CUDA tensors only. Checked before the first collective,
    so that a rank fails with this message rather than inside the all-reduce; topk_threshold, project
    and BiP's set-up run it where a failure raises on every rank (_agree)."""
    devices = sorted({str(tensor.device) for tensor in tensors})
    if devices == ["meta"]:
        raise ValueError(f"{owner}: this rank's scores lie on the meta device, with no values to rank: load the "
                         "weights first")
    if len(devices) > 1:
        raise ValueError(f"{owner}: this rank's scores lie on several devices {devices}: one top-k over the group "
                         "needs them on one device per rank")
    if backend == "nccl" and devices and not devices[0].startswith("cuda"):
        raise ValueError(f"{owner}: the group's backend is NCCL, which communicates CUDA tensors only, but this "
                         f"rank's scores lie on {devices[0]}: move the shard to its GPU or use gloo")


def raise_together(owner: str, error: Exception | None, group=None, device: torch.device | None = None) -> None:
    """A collective: raises on every rank of ``group`` if ``error`` is set on any. A rank that failed
    raises its own ``error``, the others a RuntimeError naming the lowest rank that failed: a rank that
    raised alone would leave the others waiting forever in the next collective. ``device``: where the
    caller's model lies (collective_device)."""
    _agree(owner, error, group, device=device)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _agree(owner: str, error: Exception | None, group, tensors=(), k: int | None = None,
           scope: str | None = None, sparsity: float | None = None, device: torch.device | None = None) -> None:
    """One all-reduce (MAX) of what every rank of ``group`` must share before a collective's work: whether
    a rank failed its checks (``error``: it raises its own, the others a RuntimeError naming the lowest
    failing rank, by its global rank), the dtype of the block scores ``tensors`` (one over the group), ``k``,
    ``scope`` and ``sparsity`` (the same on every rank: layer scope has no k to compare, and a rank of
    its own sparsity would train on silently). Every rank sees the same reduced values, so every rank raises,
    or none. The all-reduce runs beside ``tensors`` (NCCL: on their GPU, whether or not it is the current
    one), else where the backend takes tensors (NCCL: on ``device``, see collective_device). Without a
    process group a rank's own error is raised as it is, and no error is _no_process_group's."""
    if not _initialised():
        raise error or _no_process_group(owner, group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    k_value = -1 if k is None else min(k, _LOW_63)
    scope_code = -1 if scope is None else SCOPES.index(scope)
    # A sparsity in [0, 1] by its float64 bits, which order as the values do.
    sparsity_bits = -1 if sparsity is None else _float_bits(sparsity)
    dtypes = {tensor.dtype for tensor in tensors}
    shared = [world - rank if error is not None else 0, *(int(dtype in dtypes) for dtype in _DTYPES),
              k_value, -k_value, scope_code, -scope_code, sparsity_bits, -sparsity_bits]
    reduced = torch.tensor(shared, dtype=torch.int64, device=collective_device(list(tensors), group, device))
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    first_failed, *held, k_max, k_min, scope_max, scope_min, sparsity_max, sparsity_min = reduced.tolist()
    if error is not None:
        raise error
    if first_failed:
        failed = dist.get_global_rank(group if group is not None else dist.group.WORLD, world - first_failed)
        raise RuntimeError(f"{owner}: rank {failed} of the process group failed (its error says why), so this "
                           "rank stops too")
    names = [str(dtype) for dtype, present in zip(_DTYPES, held) if present]
    if len(names) > 1:
        raise ValueError(f"{owner}: the ranks' block scores have several dtypes ({', '.join(names)}), but one top-k "
                         "over the group compares them in one: give every rank's masked layers one dtype (float16, "
                         "bfloat16 and float32 layers rank as float32)")
    if k_max != -k_min:
        raise ValueError(f"{owner}: the ranks ask for different k (from {-k_min} to {k_max}): every rank of the "
                         "group must pass the same k (the same sparsity)")
    if scope_max != -scope_min:
        raise ValueError(f"{owner}: the ranks ask for different scopes ({' and '.join(SCOPES)}): every rank of the "
                         "group must pass the same scope")
    if sparsity_max != -sparsity_min:
        raise ValueError(f"{owner}: the ranks ask for different sparsities (from {_bits_float(-sparsity_min)} to "
                         f"{_bits_float(sparsity_max)}): every rank of the group must pass the same sparsity")


def _float_bits(value: float) -> int:
    return torch.tensor(value, dtype=torch.float64).view(torch.int64).item()


def _bits_float(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int64).view(torch.float64).item()


def topk_threshold(block_scores_list, k: int, group=None) -> torch.Tensor:
    """(L, 2) float64 thresholds for this rank's L tensors keeping the top ``k`` blocks of all ranks (a
    single tensor instead of a list: its one threshold of shape (2,)).

    Equal, bit for bit, to rows [offset, offset + L) of bipkernels.topk_threshold(all ranks' lists
    concatenated in rank order, k), offset = the number of tensors of lower ranks: exactly min(k, non-NaN
    blocks) kept over all ranks, ties to the lowest global index. A rank may hold no tensors (it gets a
    (0, 2) result and still takes part). Tensors of one floating dtype over the group (ranked by their
    float64 values); every rank passes the same ``k`` (_agree checks both, and each rank's arguments, before
    the select). Host synchronisations: the agreement's, besides the collectives themselves.
    """
    owner = "bipkernels.distributed.topk_threshold"
    check_group(owner, group)
    if isinstance(block_scores_list, torch.Tensor):  # the per-tensor form, as bipkernels.topk_threshold's
        return topk_threshold([block_scores_list], k, group)[0]
    error = None
    try:
        k = ops.check_int(owner, "k", k)
        try:
            block_scores_list = list(block_scores_list)  # read twice: a generator would be empty the second time
        except TypeError:
            raise TypeError(f"{owner}: block_scores_list must be a tensor or an iterable of tensors, got "
                            f"{type(block_scores_list).__name__} {block_scores_list!r}") from None
        for index, scores in enumerate(block_scores_list):
            ops.check_float("distributed.topk_threshold", f"block_scores[{index}]", scores)
        check_devices(owner, block_scores_list, group_backend(owner, group))
    except Exception as caught:  # raised on every rank by _agree
        error = caught
    _agree(owner, error, group, block_scores_list if error is None else (), k=k if error is None else None)
    k = min(k, _LOW_63)  # a count of blocks never reaches it; clamp (below) takes an int64
    flat = [scores.reshape(-1).double() for scores in block_scores_list]
    device = collective_device(flat, group)
    keys = [_keys(scores) for scores in flat]
    valid = [~scores.isnan() for scores in flat]
    count = sum((ok.sum() for ok in valid), torch.zeros((), dtype=torch.int64, device=device))
    dist.all_reduce(count, group=group)
    kept = count.clamp(max=k)

    # Radix select of the kept-th largest key: per digit, the bin holding it among the keys that share
    # the digits chosen so far; ``remaining`` counts how far into that bin (from the top) it lies.
    remaining, prefix = kept.clone(), torch.zeros((), dtype=torch.int64, device=device)
    for index, shift in enumerate(_SHIFTS):
        histogram = torch.zeros(_BINS + 1, dtype=torch.int64, device=device)  # the last bin: not counted
        for key, ok in zip(keys, valid):
            match = ok if index == 0 else ok & ((key >> (shift + _DIGIT_BITS)) == prefix)
            bins = torch.where(match, _digit(key, shift), _BINS)
            histogram.scatter_add_(0, bins, torch.ones_like(bins))
        histogram = histogram[:_BINS]
        dist.all_reduce(histogram, group=group)
        from_top = histogram.flip(0).cumsum(0)  # from_top[j]: keys in the j + 1 highest bins
        j = torch.searchsorted(from_top, remaining.reshape(1)).reshape(()).clamp(max=_BINS - 1)
        digit = _BINS - 1 - j
        remaining = remaining - (from_top[j] - histogram[digit])
        prefix = digit - _BINS // 2 if index == 0 else prefix * _BINS + digit
    infinity = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    value = torch.where(kept > 0, _from_key(prefix), infinity)
    ties_kept = remaining  # kept minus the blocks strictly above the value, over all ranks

    # Ties go to lower ranks first: this rank's offset is the ties held by the ranks before it.
    ties = [scores == value for scores in flat]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    per_rank = torch.zeros(world, dtype=torch.int64, device=device)
    per_rank[rank] = sum((equal.sum() for equal in ties), torch.zeros((), dtype=torch.int64, device=device))
    dist.all_reduce(per_rank, group=group)
    ties_before = per_rank[:rank].sum()

    rows = []  # the canonical cut of bipkernels.reference.topk_threshold, per tensor
    for scores, equal in zip(flat, ties):
        ties_here = equal.sum()
        kept_here = torch.minimum((ties_kept - ties_before).clamp(min=0), ties_here)
        last_kept = (equal.cumsum(0) < kept_here).sum() + 1  # 1 + flat index of the kept_here-th tie
        cut = torch.where(kept_here == ties_here, scores.numel(), torch.where(kept_here == 0, 0, last_kept))
        rows.append(torch.stack([value, torch.where(kept == 0, 0, cut).double()]))
        ties_before = ties_before + ties_here
    return torch.stack(rows) if rows else torch.empty(0, 2, dtype=torch.float64, device=device)


@torch.no_grad()
def project(model: nn.Module, sparsity: float, scope: str = "global", group=None) -> None:
    """bipkernels.project for a model shard: ``model`` holds this rank's masked layers, and exactly
    keep_count(blocks of all ranks, sparsity) blocks stay over the group (global scope; ties: rank order,
    then module order, then flat index). ``scope="layer"`` is per layer, so it needs no communication.
    Every rank must hold the same structure kinds (block scores are compared across ranks as numbers) and
    pass the same ``sparsity`` and ``scope`` (checked: see _agree).
    """
    owner = "bipkernels.distributed.project"
    check_group(owner, group)
    error, layers, block_scores = None, [], []
    try:
        check_module(owner, model)
        if scope not in SCOPES:
            raise ValueError(f"{owner}: scope must be one of {SCOPES}, got {scope!r}")
        ops.check_sparsity(sparsity, owner)
        if scope == "global":
            layers = [layer for _, layer in ranked_layers(model)]
            check_devices(owner, [layer.scores for layer in layers], group_backend(owner, group))
            block_scores = [layer.block_scores() for layer in layers]  # before _agree: it may fail on one rank
    except Exception as caught:  # raised on every rank by _agree
        error = caught
    _agree(owner, error, group, block_scores if error is None else (), scope=scope if error is None else None,
           sparsity=float(sparsity) + 0.0 if error is None else None)  # -0.0 is 0.0 (its bits overflowed)
    if scope == "layer":
        project_locally(model, sparsity, scope)
        return
    total = torch.tensor(sum(scores.numel() for scores in block_scores), dtype=torch.int64,
                         device=collective_device(block_scores, group))
    dist.all_reduce(total, group=group)
    thresholds = topk_threshold(block_scores, ops.keep_count(int(total), sparsity), group)
    for layer, threshold in zip(layers, thresholds):
        layer.threshold.copy_(threshold)
