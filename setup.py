"""Builds bipkernels and its extension bipkernels._C (python/ + csrc/).

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when BIPKERNELS_CUDA allows it:
  auto (default)  when torch was built with CUDA and nvcc is found, GPU or not
  1               required: the build fails if it cannot build them
  0               never
TORCH_CUDA_ARCH_LIST picks the archs (default here: 9.0 when no GPU is visible to pick from) and MAX_JOBS
the parallel compile jobs. Build with --no-build-isolation to reuse the installed torch. The CUDA toolkit is
CUDA_HOME (or CUDA_PATH) when set, else the one the nvcc on PATH belongs to.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "bipkernels" / "version.py").read_text()).group(1)


def nvcc_toolkit() -> str | None:
    """The root of the CUDA toolkit that the nvcc on PATH runs from, as nvcc reports it (None without one).

    torch's own guess when CUDA_HOME is unset, the folder above `which nvcc`, is /usr/local for a link or a
    wrapper script at /usr/local/bin/nvcc: the build then compiled every kernel and failed to link -lcudart.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stderr + dryrun.stdout, re.MULTILINE)  # the real nvcc's bin/
    return str(Path(here.group(1).strip()).parent.resolve()) if here else None


def cuda_wanted(torch, cpp_extension):
    mode = os.environ.get("BIPKERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: BIPKERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "BIPKERNELS_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} has no CUDA")
    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons and mode == "1":
        sys.exit("setup.py: BIPKERNELS_CUDA=1 but " + "; ".join(reasons))
    return not reasons, "; ".join(reasons) or f"nvcc in {cpp_extension.CUDA_HOME}"


def cuda_library_includes():
    """Headers of the CUDA libraries that torch's pip wheels ship (e.g. nvidia/cu13/include/cusparse.h)."""
    import nvidia  # noqa: F401 - the namespace package of torch's CUDA wheels

    return [str(p) for base in nvidia.__path__ for p in sorted(Path(base).glob("cu*/include")) if p.is_dir()]


def extensions():
    import torch

    # Before cpp_extension is imported: it reads CUDA_HOME once, at import.
    cuda_allowed = os.environ.get("BIPKERNELS_CUDA", "auto").lower() != "0"
    if cuda_allowed and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        toolkit = nvcc_toolkit()
        if toolkit is not None:
            os.environ["CUDA_HOME"] = toolkit
    from torch.utils import cpp_extension

    with_cuda, why = cuda_wanted(torch, cpp_extension)
    sources = ["python/module.cpp", "csrc/registration.cpp",
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))]
    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]
    macros = [
        ("BIPKERNELS_VERSION", f'"{VERSION}"'),
        ("BIPKERNELS_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is
    # compiled with OpenMP (torch's own OpenMP backend does not reach into our objects).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    archs = ""
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        try:
            include_dirs += cuda_library_includes()
        except ImportError:
            pass
        macros += [("BIPKERNELS_WITH_CUDA", None), ("BIPKERNELS_CUDA_ARCHS", f'"{archs}"')]
    cuda_kernels = f"yes (archs {archs})" if with_cuda else "no"
    print(f"bipkernels setup: CPU kernels: yes; CUDA kernels: {cuda_kernels} [{why}]; "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}", flush=True)
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    # nvcc must not contract a*b+c into an FMA: the CUDA kernels' arithmetic must equal the CPU kernels'.
    flags = {"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]} if with_cuda else {"cxx": cxx_flags}
    return [kind("bipkernels._C", sources, include_dirs=include_dirs, define_macros=macros, extra_compile_args=flags,
                 extra_link_args=["-fopenmp"])], cpp_extension.BuildExtension


if __name__ == "__main__":
    ext_modules, build_ext = extensions()
    setup(
        version=VERSION,
        packages=find_packages(include=["bipkernels", "bipkernels.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    )
