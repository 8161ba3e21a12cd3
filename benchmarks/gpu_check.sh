#!/usr/bin/env bash
# Everything a GPU machine has to check, in one go: build the extension with the CUDA kernels for this
# GPU, run the test suite (CUDA and Triton tests included), the >2^31-element tests, compute-sanitizer
# (memcheck, racecheck) over the CUDA op tests, and the GPU benchmarks. Each stage's log, a summary and
# the benchmark results land in the folder given as the first argument.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [STAGE ...]    # stages: build tests triton large memcheck
#                                                          #         racecheck bench (default: all)
# Uses $PYTHON (default python); a failing stage is reported and the others still run; the exit status
# is 1 if any stage failed.
set -uo pipefail
out=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR [STAGE ...]}" && cd "$1" && pwd)
shift
stages=${*:-build tests triton large memcheck racecheck bench}
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($python -c \
  "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export BIPKERNELS_REQUIRE_EXTENSION=1 BIPKERNELS_EXPECT_CUDA=1
failed=0

stage() {  # stage NAME COMMAND...: runs COMMAND if NAME was asked for, logging to OUT_DIR/NAME.log
  local name=$1 started result
  shift
  [[ " $stages " == *" $name "* ]] || return 0
  started=$(date +%s)
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then result=ok; else result="FAILED (exit $?)"; failed=1; fi
  echo "$name: $result in $(( $(date +%s) - started )) s" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log"
}

sanitized_tests=(-m pytest -q -p no:cacheprovider tests/test_cuda.py)
stage build $python -m pip install --no-build-isolation --no-deps -v -e .
stage tests $python -m pytest -q tests --ignore=tests/triton
stage triton $python -m pytest -q tests/triton
stage large env BIPKERNELS_LARGE_TESTS=1 $python -m pytest -q tests -m large
# The sanitizers slow every launch down many times over: the op tests on float32 and the topk tests.
stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
  $python "${sanitized_tests[@]}" -k "float32 and not graph and not large"
stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
  $python "${sanitized_tests[@]}" -k "topk_threshold_matches and float32"
stage bench $python -m benchmarks -k "cuda or triton or gpu"
if [[ " $stages " == *" bench "* ]]; then
  cp benchmarks/results/"$($python -c 'from benchmarks.__main__ import device_name; print(device_name())')"* "$out"/ \
    2>/dev/null || true
fi
$python -m bipkernels info >"$out/info.txt" 2>&1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
exit $failed
