"""Compile the Triton kernels the ops launch for a GPU target (sm_90 by default) on a machine without one.

The interpreter runs kernels as Python: it accepts code the GPU compiler rejects (a loop-carried value
that changes type, an op without a lowering) and it never checks shared memory. This script runs the
triton ops on small CPU tensors with TRITON_INTERPRET unset and a driver that only compiles: every
launch becomes a compilation for the target. Nothing is computed.

Default (tests/triton/test_gpu_compile.py, about a minute): every kernel on every code path (structure
kind, float32 / float64 scores, implicit form, select pass), the matmuls for every structure in
bfloat16 and unstructured in float32 and float16, the weight gradient split over rows, each autotuned
kernel in its smallest configuration; every kernel must fit the target's shared memory.
``--all-configs`` compiles every autotune configuration too (minutes) and requires at least one
configuration of each autotuned launch to fit (the autotuner skips the others, as it does
configurations that run out of resources). The elementwise kernels must hold no fused multiply-add.

    python tests/triton/gpu_compile.py [--all-configs] [capability]
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch

SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in maximum
NO_FMA = ("_hypergrad_kernel", "_block_scores_kernel", "_masked_weight_kernel")


class CompileOnlyDriver:
    """The parts of a triton driver that compilation reads: device 0 of a GPU of ``capability``."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def install(capability: int, all_configs: bool) -> list:
    """Launches become compilations; returns the list that collects (launch, config size, compiled kernel),
    a launch being the kernel's name with its constexprs."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    driver.set_active(CompileOnlyDriver(capability))
    compiled = []

    def launch(kernel, grid, args, kwargs):
        name = f"{getattr(kernel.fn, 'fn', kernel.fn).__name__}{sorted(kwargs.items())}"
        if isinstance(kernel, Autotuner):
            configs = kernel.configs if all_configs else \
                [min(kernel.configs, key=lambda config: _volume(config.all_kwargs()))]
            for config in configs:
                compiled.append((name, config.all_kwargs(),
                                 kernel.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())))
        else:
            compiled.append((name, {}, kernel.warmup(*args, grid=grid, **kwargs)))

    KernelInterface.__getitem__ = lambda kernel, grid: lambda *args, **kwargs: launch(kernel, grid, args, kwargs)
    return compiled


def _volume(config: dict) -> int:
    return config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"]


def run_every_op() -> None:
    """Each op on every code path, on tiny tensors (the compiled code does not depend on sizes, except
    through the specialisation of integer arguments)."""
    from bipkernels import triton as bipkernels_triton
    from bipkernels.structures import parse_structure

    bipkernels_triton.load()
    ops = torch.ops.bipkernels_triton
    threshold = torch.tensor([0.5, 3.0], dtype=torch.float64)
    kinds = [parse_structure(name, p=2 if name == "filter" else 1).op_args()
             for name in ("unstructured", "filter", "channel", "2:4", "tile4x8")]
    for dtype, structures in ((torch.float32, kinds), (torch.float64, kinds[:1]), (torch.bfloat16, kinds[:1])):
        for args in structures:
            scores = torch.rand(8, 16, dtype=dtype)
            ops.block_scores(scores, *args)
            ops.block_mask(scores, threshold, *args)
            ops.masked_weight(scores, scores, threshold, *args)
            for implicit in (0, 1):
                ops.hypergrad(scores, scores, scores, threshold, *args, 0.1, implicit)
    # An unstructured mask over a channels_last weight: the path that runs where the elements lie.
    for dtype in (torch.float32, torch.float64):
        last = torch.rand(4, 6, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        ops.masked_weight(last, last, threshold, *kinds[0])
        ops.hypergrad(last, last, last, threshold, *kinds[0], 0.1, 0)
    for dtype in (torch.float32, torch.float64):
        ops.topk_threshold([torch.rand(5, dtype=dtype), torch.rand(7, dtype=dtype)], 3)
    for dtype, structures in ((torch.bfloat16, kinds), (torch.float32, kinds[:1]), (torch.float16, kinds[:1])):
        for args in structures:
            weight, x, grad = (torch.rand(*shape, dtype=dtype) for shape in ((8, 16), (4, 16), (4, 8)))
            ops.masked_linear(x, weight, weight, threshold, weight[:, 0], *args)
            ops.masked_linear_grad_input(grad, weight, weight, threshold, *args)
            ops.masked_linear_grad_weight(grad, x, weight, weight, threshold, *args, 0.1, 0)
    # Enough rows for the weight gradient's split over them (partials, then the hypergradient's sum).
    weight, x, grad = (torch.rand(*shape, dtype=torch.bfloat16) for shape in ((8, 16), (2048, 16), (2048, 8)))
    ops.masked_linear_grad_weight(grad, x, weight, weight, threshold, *kinds[0], 0.1, 0)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("gpu_compile.py: unset TRITON_INTERPRET (it compiles for a GPU)")
    all_configs = "--all-configs" in argv
    capability = int(next((arg for arg in argv if not arg.startswith("--")), 90))
    limit = SHARED_MEMORY_LIMIT[capability]
    compiled = install(capability, all_configs)
    run_every_op()
    fitting = defaultdict(list)
    for name, config, kernel in compiled:
        fitting[name].append(kernel.metadata.shared <= limit)
        if kernel.metadata.shared > limit:
            print(f"over the shared memory limit ({limit} bytes): {name} {config} needs {kernel.metadata.shared}")
    failed = [name for name, fits in fitting.items() if not any(fits)]
    for name in failed:
        print(f"no configuration fits: {name}")
    # The elementwise kernels' products round on their own (layout.product), as in the C++ and CUDA
    # kernels; the matmuls' dots are fused multiply-adds by nature.
    fused = sorted({name for name, _, kernel in compiled if name.startswith(NO_FMA) and "fma.rn" in kernel.asm["ptx"]})
    for name in fused:
        print(f"a fused multiply-add in: {name}")
    failed += fused
    print(f"compiled {len(compiled)} kernels ({len(fitting)} launches) for sm_{capability}: "
          f"{'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
