"""Build facts of the installed bipkernels (what `bipkernels info` prints)."""

from __future__ import annotations

from importlib import metadata

import torch

from . import ops
from . import triton as triton_kernels
from .version import __version__


def _triton_version() -> str | None:
    """The installed triton's version, read from its metadata (importing triton is slow and may touch CUDA)."""
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def build_info() -> dict:
    """Versions, CUDA archs and, per op, the backends that have a kernel for it (triton: when installed; it
    runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1)."""
    compiled = ops._C
    kernels = ops._KERNELS
    triton = _triton_version()
    return {
        "version": __version__,
        "extension": compiled is not None,
        "extension_version": getattr(compiled, "__version__", None),
        "built_against_torch": getattr(compiled, "torch_version", None),
        "running_torch": torch.__version__,
        "cuda_kernels_built": bool(getattr(compiled, "with_cuda", False)),
        "cuda_archs": getattr(compiled, "cuda_archs", "") or None,
        "triton_version": triton,
        "ops": {op: ["torch"] + [key.lower() for key in kernels.get(op, [])]
                + (["triton"] if triton and op in triton_kernels.OPS else []) for op in ops.OP_NAMES},
    }


def format_info(info: dict) -> str:
    lines = [f"bipkernels {info['version']}"]
    if not info["extension"]:
        lines.append("compiled extension: missing (every op runs the PyTorch reference)")
    else:
        lines += [
            f"compiled extension: {info['extension_version']}, built against torch {info['built_against_torch']}, "
            f"running torch {info['running_torch']}",
            "CUDA kernels: " + (f"built for archs {info['cuda_archs']}" if info['cuda_kernels_built'] else "not built"),
        ]
    lines.append(f"triton: {info['triton_version']}" if info["triton_version"] else "triton: not installed")
    lines.append("ops (backends with a kernel):")
    lines += [f"  {op:<16} {', '.join(backends)}" for op, backends in info["ops"].items()]
    return "\n".join(lines)
