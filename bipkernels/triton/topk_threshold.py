"""topk_threshold in Triton: the exact k-th largest block score over a list of tensors by a most
significant digit radix select, with the passes, digits and decisions of csrc's GPU select
(csrc/include/bipkernels/select.h and gpu_select.h), and nothing that waits for the host.

Keys: a score (widened to float32, or float64) maps to an integer key whose unsigned order is the
order of the values; -0.0 folds onto +0.0 and NaN maps to 0, which no other score has (select.h
key_of_bits). The kernels hold the key's bits in a signed integer of the same width (the interpreter
cannot bit-invert unsigned integers) and read only bits from it (digits, equality, the top bit), never
its signed order.

Launches, each over one tensor of the list at a time (so the list is never concatenated):
 1. ceil(W / 11) histogram passes over 11-bit digits (W = 32 or 64): pass p counts digit p of every
    non-NaN key whose higher digits equal the prefix chosen so far (pass 0 also counts the NaNs); then
    one program picks the bucket that holds the k-th largest key and appends its digit to the prefix.
    After the last pass the prefix is the k-th largest key, and the state says how many of the scores
    equal to it (its ties) are kept.
 2. Only when the k-th value is tied and only some of its ties are kept: ties per chunk of each tensor.
 3. One program per tensor, in list order: its row (value, cut), the cut canonical (reference.py), found
    by walking the chunk counts to the chunk of the last kept tie and inside it to the element.
The state lives on the device (int64): prefix, rank left in the bucket, ties, kept count, NaNs, ties in
earlier tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .layout import check_float, launch_size, on_device, traceable

DIGIT_BITS = 11
_BUCKETS = tl.constexpr(1 << DIGIT_BITS)
_PREFIX, _REMAINING, _TIES, _KEPT, _NANS, _TIES_BEFORE = (tl.constexpr(i) for i in range(6))
_INF = tl.constexpr(float("inf"))

_BLOCK = launch_size(1024, 8)  # scores per histogram step
_PROGRAMS = launch_size(1024, 2)  # histogram programs at most; each strides over the tensor
_CHUNK = launch_size(4096, 8)  # scores per tie count
_CHUNK_BLOCK = launch_size(1024, 4)  # chunk counts read at a time when locating the cut


@triton.jit
def _keys(x, F64: tl.constexpr, ABSOLUTE: tl.constexpr):
    """select.h key_of_bits of ``x`` (of |x| when ABSOLUTE), held in int32 / int64."""
    if ABSOLUTE:
        x = tl.abs(x)
    if F64:
        bits = x.to(tl.float64).to(tl.int64, bitcast=True)
        sign = -9223372036854775808
        magnitude = bits & 0x7FFFFFFFFFFFFFFF
        nan = magnitude > 0x7FF0000000000000
    else:
        if x.dtype == tl.bfloat16:  # widened by its bits: exact, where the interpreter's conversion is not
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) << 16
        else:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        sign = -2147483648
        magnitude = bits & 0x7FFFFFFF
        nan = magnitude > 0x7F800000
    key = tl.where(magnitude == 0, sign, bits ^ tl.where(bits < 0, -1, sign))
    return tl.where(nan, 0, key)


@triton.jit
def _value_of_key(key, F64: tl.constexpr):
    """The score (as float64) of a non-NaN key: select.h value_of_key."""
    if F64:
        return tl.where(key < 0, key & 0x7FFFFFFFFFFFFFFF, key ^ -1).to(tl.float64, bitcast=True)
    else:
        return tl.where(key < 0, key & 0x7FFFFFFF, key ^ -1).to(tl.float32, bitcast=True).to(tl.float64)


@triton.jit
def _prefix(state_ptr, F64: tl.constexpr):
    """The prefix in the key's width (the state holds it in int64; 32-bit keys in its low half)."""
    prefix = tl.load(state_ptr + _PREFIX)
    if F64:
        return prefix
    else:
        return prefix.to(tl.int32)


@triton.jit
def _partial(state_ptr):
    """Whether the k-th value is tied and only some of its ties are kept (the cut must be located)."""
    return (tl.load(state_ptr + _KEPT) > 0) & (tl.load(state_ptr + _REMAINING) < tl.load(state_ptr + _TIES))


@triton.jit
def _histogram_kernel(x_ptr, n, histogram_ptr, state_ptr, F64: tl.constexpr, ABSOLUTE: tl.constexpr,
                      FIRST: tl.constexpr, SHIFT: tl.constexpr, HIGHER: tl.constexpr, DIGIT_MASK: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Adds this tensor's counts of digit (key >> SHIFT) & DIGIT_MASK over the keys whose bits from HIGHER
    up equal the prefix's (every non-NaN key on the FIRST pass, which also counts the NaNs)."""
    prefix = _prefix(state_ptr, F64)
    counts = tl.zeros([_BUCKETS], dtype=tl.int64)
    nans = tl.zeros([BLOCK], dtype=tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
        offsets = start + tl.arange(0, BLOCK)
        valid = offsets < n
        key = _keys(tl.load(x_ptr + offsets, mask=valid, other=0.0), F64, ABSOLUTE)
        candidate = valid & (key != 0)
        if not FIRST:
            candidate = candidate & ((key >> HIGHER) == (prefix >> HIGHER))
        counts += tl.histogram(((key >> SHIFT) & DIGIT_MASK).to(tl.int32), _BUCKETS, mask=candidate).to(tl.int64)
        if FIRST:
            nans += (valid & (key == 0)).to(tl.int64)
    tl.atomic_add(histogram_ptr + tl.arange(0, _BUCKETS), counts, mask=counts != 0)  # most buckets are empty
    if FIRST:
        tl.atomic_add(state_ptr + _NANS, tl.sum(nans))


@triton.jit
def _choose_kernel(histogram_ptr, state_ptr, k, total, F64: tl.constexpr, FIRST: tl.constexpr, SHIFT: tl.constexpr):
    """One program: the bucket of this pass that holds the remaining-th largest key (select.h
    bucket_holds, tested for every bucket at once); its digit joins the prefix."""
    counts = tl.load(histogram_ptr + tl.arange(0, _BUCKETS))
    if FIRST:
        kept = tl.minimum(total - tl.load(state_ptr + _NANS), k)
        tl.store(state_ptr + _KEPT, kept)
        remaining = kept
    else:
        remaining = tl.load(state_ptr + _REMAINING)
    above = tl.sum(counts) - tl.cumsum(counts, 0)  # keys in the larger buckets
    holds = (above < remaining) & (remaining <= above + counts)
    digit = tl.max(tl.where(holds, tl.arange(0, _BUCKETS), -1))
    found = digit >= 0  # none when nothing is kept
    tl.store(state_ptr + _PREFIX,
             tl.where(found, tl.load(state_ptr + _PREFIX) | (digit.to(tl.int64) << SHIFT), 0))
    tl.store(state_ptr + _REMAINING, tl.where(found, remaining - tl.sum(tl.where(holds, above, 0)), 0))
    tl.store(state_ptr + _TIES, tl.where(found, tl.sum(tl.where(holds, counts, 0)), 0))


@triton.jit
def _tie_count_kernel(x_ptr, n, chunk_ties_ptr, state_ptr, F64: tl.constexpr, ABSOLUTE: tl.constexpr,
                      CHUNK: tl.constexpr):
    """Ties (keys equal to the k-th) in each chunk of this tensor, only when the cut must be located."""
    if _partial(state_ptr):
        offsets = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        valid = offsets < n
        key = _keys(tl.load(x_ptr + offsets, mask=valid, other=0.0), F64, ABSOLUTE)
        tie = valid & (key == _prefix(state_ptr, F64))
        tl.store(chunk_ties_ptr + tl.program_id(0), tl.sum(tie.to(tl.int64)))


@triton.jit
def _last_kept_tie(x_ptr, n, chunk_ties_ptr, chunks, wanted, prefix, F64: tl.constexpr, ABSOLUTE: tl.constexpr,
                   CHUNK: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    """Flat index of this tensor's ``wanted``-th tie (1 <= wanted < its ties): the chunk where the running
    tie count reaches it, then the element inside that chunk."""
    seen = tl.zeros([], dtype=tl.int64)
    chunk = tl.full([], -1, dtype=tl.int64)
    before = tl.zeros([], dtype=tl.int64)  # ties in the chunks before that one
    for start in range(0, chunks, CHUNK_BLOCK):
        index = start + tl.arange(0, CHUNK_BLOCK).to(tl.int64)
        ties = tl.load(chunk_ties_ptr + index, mask=index < chunks, other=0)
        through = seen + tl.cumsum(ties, 0)
        hit = (through >= wanted) & (through - ties < wanted)  # exactly one chunk of all
        chunk = tl.maximum(chunk, tl.max(tl.where(hit, index, -1)))
        before += tl.sum(tl.where(hit, through - ties, 0))
        seen += tl.sum(ties)
    offsets = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offsets < n
    tie = valid & (_keys(tl.load(x_ptr + offsets, mask=valid, other=0.0), F64, ABSOLUTE) == prefix)
    through = before + tl.cumsum(tie.to(tl.int64), 0)
    return tl.max(tl.where(tie & (through == wanted), offsets, -1))


@triton.jit
def _row_kernel(x_ptr, n, chunk_ties_ptr, chunks, state_ptr, row_ptr, F64: tl.constexpr, ABSOLUTE: tl.constexpr,
                CHUNK: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    """One program: this tensor's (value, cut); runs after the rows of the tensors before it."""
    kept = tl.load(state_ptr + _KEPT)
    prefix = _prefix(state_ptr, F64)
    cut = tl.where(kept == 0, 0, n).to(tl.float64)  # no tie cut inside: all kept, or nothing at all
    if _partial(state_ptr):
        ties_before = tl.load(state_ptr + _TIES_BEFORE)
        ties = tl.zeros([], dtype=tl.int64)
        for start in range(0, chunks, CHUNK_BLOCK):
            index = start + tl.arange(0, CHUNK_BLOCK).to(tl.int64)
            ties += tl.sum(tl.load(chunk_ties_ptr + index, mask=index < chunks, other=0))
        kept_here = tl.minimum(tl.maximum(tl.load(state_ptr + _REMAINING) - ties_before, 0), ties)
        if kept_here == 0 and ties > 0:
            cut = tl.zeros([], dtype=tl.float64)
        elif kept_here < ties:
            cut = (_last_kept_tie(x_ptr, n, chunk_ties_ptr, chunks, kept_here, prefix, F64, ABSOLUTE, CHUNK,
                                  CHUNK_BLOCK) + 1).to(tl.float64)
        tl.store(state_ptr + _TIES_BEFORE, ties_before + ties)
    tl.store(row_ptr, tl.where(kept == 0, _INF, _value_of_key(prefix, F64)))
    tl.store(row_ptr + 1, cut)


def _passes(width: int):
    """(first, shift, higher, digit mask) of every pass over keys of ``width`` bits (select.h Radix)."""
    for index in range(-(-width // DIGIT_BITS)):
        shift = max(width - DIGIT_BITS * (index + 1), 0)
        yield index == 0, shift, width - DIGIT_BITS * index, (1 << min(DIGIT_BITS, width - DIGIT_BITS * index)) - 1


@triton_op("bipkernels_triton::topk_threshold", mutates_args=())
def topk_threshold(block_scores: list[torch.Tensor], k: int, absolute: bool = False) -> torch.Tensor:
    """(L, 2) float64 rows (value, cut) keeping the top ``k`` of all block scores together, ranking |x|
    when ``absolute`` (bipkernels.ops.topk_threshold; reference.py states the contract). An empty list
    gives (0, 2) on the CPU; k = 0, or no non-NaN score, gives (+inf, 0) rows."""
    op = "topk_threshold"
    if k < 0:
        raise ValueError(f"bipkernels.{op}: k must be >= 0, got {k}")
    if not block_scores:
        return torch.empty(0, 2, dtype=torch.float64)
    tensors = [tensor.contiguous() for tensor in block_scores]
    first = tensors[0]
    for i, tensor in enumerate(tensors):
        check_float(op, f"block_scores[{i}]", tensor)
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(f"bipkernels.{op}: block_scores[{i}] is {tensor.dtype} on {tensor.device} but "
                             f"block_scores[0] is {first.dtype} on {first.device}")
    f64, device = first.dtype == torch.float64, first.device
    total = sum(tensor.numel() for tensor in tensors)
    with on_device(first):
        rows = torch.empty(len(tensors), 2, dtype=torch.float64, device=device)
        state = torch.zeros(6, dtype=torch.int64, device=device)
        passes = list(_passes(64 if f64 else 32))
        histograms = torch.zeros(len(passes), _BUCKETS.value, dtype=torch.int64, device=device)
        for histogram, (first_pass, shift, higher, digit_mask) in zip(histograms, passes):
            for tensor in tensors:
                if tensor.numel():
                    grid = (min(triton.cdiv(tensor.numel(), _BLOCK), _PROGRAMS),)
                    traceable(_histogram_kernel)[grid](tensor, tensor.numel(), histogram, state, F64=f64,
                                                         ABSOLUTE=absolute, FIRST=first_pass, SHIFT=shift,
                                                         HIGHER=higher, DIGIT_MASK=digit_mask, BLOCK=_BLOCK)
            traceable(_choose_kernel)[(1,)](histogram, state, min(k, total), total, F64=f64, FIRST=first_pass,
                                              SHIFT=shift)
        chunks = [triton.cdiv(tensor.numel(), _CHUNK) for tensor in tensors]
        chunk_ties = torch.empty(max(sum(chunks), 1), dtype=torch.int64, device=device)
        begin = 0
        for tensor, count in zip(tensors, chunks):
            if count:
                traceable(_tie_count_kernel)[(count,)](tensor, tensor.numel(), chunk_ties[begin:], state, F64=f64,
                                                         ABSOLUTE=absolute, CHUNK=_CHUNK)
            begin += count
        begin = 0
        for tensor, count, row in zip(tensors, chunks, rows):
            traceable(_row_kernel)[(1,)](tensor, tensor.numel(), chunk_ties[begin:], count, state, row, F64=f64,
                                           ABSOLUTE=absolute, CHUNK=_CHUNK, CHUNK_BLOCK=_CHUNK_BLOCK)
            begin += count
        return rows
