"""GPU timing for the benchmarks: CUDA-event medians (triton.testing.do_bench, which also flushes the L2
cache between runs) and the bandwidth of a device copy measured in the same run, so every kernel's
achieved bandwidth is reported as a fraction of what this GPU really moves.

pytest-benchmark still runs each GPU benchmark (its wall-clock statistics include launch overhead);
`record` stores the CUDA-event median, the bytes moved and the fraction of copy bandwidth in
``benchmark.extra_info``, which benchmarks/report.py prefers when present.
"""

from __future__ import annotations

import functools

import torch

COPY_BYTES = 1 << 30  # 1 GiB read + 1 GiB written: far past any L2 cache


def cuda_median_seconds(fn, *args) -> float:
    """Median run time of ``fn(*args)`` on the current CUDA device, from CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median") / 1e3
    fn(*args)
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@functools.cache
def copy_bytes_per_second() -> float:
    """Bytes per second of a device-to-device copy (counting the bytes read and the bytes written)."""
    source = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    seconds = cuda_median_seconds(target.copy_, source)
    return 2 * COPY_BYTES / seconds


def synchronised(fn):
    """``fn`` followed by a device synchronisation, so pytest-benchmark's wall clock covers the GPU work."""
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out
    return run


def record(benchmark, fn, args, bytes_moved: int | None = None, rounds: int = 20):
    """Time ``fn(*args)`` with pytest-benchmark and CUDA events; returns fn's result.

    ``bytes_moved``, for memory-bound operations, is the least traffic they need (every input read once,
    every output written once); then extra_info also gets GB/s and the fraction of copy bandwidth.
    """
    seconds = cuda_median_seconds(fn, *args)
    benchmark.extra_info.update(cuda_median_s=seconds, device=torch.cuda.get_device_name())
    if bytes_moved is not None:
        benchmark.extra_info.update(bytes=bytes_moved, gbps=bytes_moved / seconds / 1e9,
                                    fraction_of_copy=bytes_moved / seconds / copy_bytes_per_second())
    return benchmark.pedantic(synchronised(fn), args, rounds=rounds, warmup_rounds=2)
