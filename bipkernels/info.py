"""Build facts of the installed bipkernels (what `bipkernels info` prints)."""

from __future__ import annotations

import torch

from . import ops
from .version import __version__


def build_info() -> dict:
    """Versions, CUDA archs and, per op, the backends that can run it."""
    compiled = ops._C
    kernels = ops._KERNELS
    return {
        "version": __version__,
        "extension": compiled is not None,
        "extension_version": getattr(compiled, "__version__", None),
        "built_against_torch": getattr(compiled, "torch_version", None),
        "running_torch": torch.__version__,
        "cuda_kernels_built": bool(getattr(compiled, "with_cuda", False)),
        "cuda_archs": getattr(compiled, "cuda_archs", "") or None,
        "ops": {op: ["torch"] + [key.lower() for key in kernels.get(op, [])] for op in ops.OP_NAMES},
    }


def format_info(info: dict) -> str:
    lines = [f"bipkernels {info['version']}"]
    if not info["extension"]:
        lines.append("compiled extension: missing (every op runs the PyTorch reference)")
    else:
        lines += [
            f"compiled extension: {info['extension_version']}, built against torch {info['built_against_torch']}, "
            f"running torch {info['running_torch']}",
            f"CUDA kernels: {'built for archs ' + str(info['cuda_archs']) if info['cuda_kernels_built'] else 'not built'}",
        ]
    lines.append("ops (backends with a kernel):")
    lines += [f"  {op:<16} {', '.join(backends)}" for op, backends in info["ops"].items()]
    return "\n".join(lines)
