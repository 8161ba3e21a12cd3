#!/usr/bin/env bash
# CMake build of bipkernels._C into build-cmake/, then a smoke test of the built module. BIPKERNELS_CUDA
# as for setup.py: auto (default) builds the CUDA kernels where torch is a CUDA build and nvcc is found
# (2 to 4 minutes more on 2 cores), 1 builds them or fails, 0 builds the CPU kernels alone. Run from the
# repository root.
# PYTHON (default .venv/bin/python) must have torch and pybind11; MAX_JOBS (default 2) sets the
# parallel compile jobs.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
BUILD_DIR=build-cmake
# Absolute path, but not symlink-resolved (that would leave the venv): a relative Python_EXECUTABLE is
# ignored by CMake's FindPython, which then picks whatever python3 is first on PATH.
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
"$PYTHON" -c "import torch, pybind11" || { echo "cmake build: $PYTHON lacks torch or pybind11" >&2; exit 1; }
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}

torch_prefix=$("$PYTHON" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
pybind11_dir=$("$PYTHON" -m pybind11 --cmakedir)
# torch's CMake config looks for nvrtc even for a CPU-only target; the pip wheels ship it in nvidia/cu*/lib.
nvrtc=$("$PYTHON" -c "
import glob, os
try:
    import nvidia
    hits = sorted(p for b in nvidia.__path__ for p in glob.glob(os.path.join(b, 'cu*', 'lib', 'libnvrtc.so.*')) if 'builtins' not in p and '.alt.' not in p)
except ImportError:
    hits = []
print(hits[0] if hits else '')")

cuda_args=()
torch_has_cuda=0
"$PYTHON" -c "import sys, torch; sys.exit(torch.version.cuda is None)" && torch_has_cuda=1
if [[ -x "$CUDA_ROOT/bin/nvcc" ]]; then
  # A CUDA build of torch fails find_package(Torch) without them, even when nothing is compiled by nvcc.
  cuda_args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
  if [[ -n "$nvrtc" ]]; then cuda_args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc"); fi
fi
case ${BIPKERNELS_CUDA:-auto} in
  0) cuda=OFF ;;
  1) cuda=ON
     if [[ ! -x "$CUDA_ROOT/bin/nvcc" || $torch_has_cuda == 0 ]]; then
       echo "cmake build: BIPKERNELS_CUDA=1, but nvcc ($CUDA_ROOT/bin/nvcc) or a CUDA build of torch is missing" >&2
       exit 1
     fi ;;
  auto) if [[ -x "$CUDA_ROOT/bin/nvcc" && $torch_has_cuda == 1 ]]; then cuda=ON; else cuda=OFF; fi ;;
  *) echo "cmake build: BIPKERNELS_CUDA must be auto, 0 or 1, got '$BIPKERNELS_CUDA'" >&2; exit 1 ;;
esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

start=$(date +%s)
cmake -S . -B "$BUILD_DIR" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBIPKERNELS_CUDA=$cuda \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -Dpybind11_DIR="$pybind11_dir" \
  -DPython_EXECUTABLE="$PYTHON" \
  "${cuda_args[@]}"
configured=$(date +%s)
cmake --build "$BUILD_DIR" --parallel "${MAX_JOBS:-2}"
built=$(date +%s)
echo "cmake build (CUDA kernels $cuda): configure $((configured - start)) s, build $((built - configured)) s"

# Load the .so directly: importing the bipkernels package would load the setup.py-built _C as well and
# register the ops twice. The module name must be "_C" because the init function is PyInit__C.
"$PYTHON" - "$BUILD_DIR" "$cuda" <<'PY'
import glob
import importlib.util
import sys

import torch

build_dir, cuda = sys.argv[1:]
paths = sorted(glob.glob(f"{build_dir}/_C*.so"))
if len(paths) != 1:
    sys.exit(f"smoke test: expected one {build_dir}/_C*.so, found {paths}")
spec = importlib.util.spec_from_file_location("_C", paths[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(f"loaded {paths[0]}: version {module.__version__}, torch {module.torch_version}, with_cuda {module.with_cuda}")

if not hasattr(torch.ops.bipkernels, "masked_weight"):
    sys.exit("smoke test: torch.ops.bipkernels.masked_weight is not registered")
weight = torch.randn(4, 6)
scores = weight.abs()
threshold = torch.tensor([float("-inf"), float("inf")], dtype=torch.float64)
out = torch.ops.bipkernels.masked_weight(weight, scores, threshold, 0, 0, 0, 1)
if not torch.equal(out, weight):
    sys.exit(f"smoke test: masked_weight with threshold -inf changed the weight:\n{out}\n{weight}")
kernels = module.registered_kernels()
print(f"registered_kernels: {kernels}")
expected = {"CPU", "CUDA"} if cuda == "ON" else {"CPU"}
for op in ("block_scores", "topk_threshold", "block_mask", "masked_weight", "hypergrad"):
    if set(kernels.get(op, [])) != expected:
        sys.exit(f"smoke test: {op} has kernels {kernels.get(op)}, expected {sorted(expected)}")
if module.with_cuda != (cuda == "ON"):
    sys.exit(f"smoke test: with_cuda is {module.with_cuda} in a build with BIPKERNELS_CUDA={cuda}")
if bool(module.cuda_archs) != (cuda == "ON"):
    sys.exit(f"smoke test: cuda_archs is {module.cuda_archs!r} in a build with BIPKERNELS_CUDA={cuda}")
PY
echo "cmake build: ok"
