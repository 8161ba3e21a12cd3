#!/usr/bin/env bash
# Everything a GPU machine has to check, in one call that fits a short loan: build the extension with the
# CUDA kernels for this GPU, the CUDA tests, the compiled Triton kernels, the kernel benchmarks (what
# bipkernels.triton.AUTO_ON_CUDA and the README's GPU table need), compute-sanitizer and the >2^31-element
# tests. Stages run in that order (most wanted first) under one time budget: a stage gets at most its own
# cap and what is left of the budget, is stopped with SIGINT when either runs out (pytest still prints
# what it ran), and a stage with under 20 s left is reported as not run. Each stage's log, a summary
# and the benchmark results land in the folder given as the first argument.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [STAGE ...]
#
# Stages: build cuda triton bench memcheck racecheck large (the default, in this order), and, asked for
# by name only, e2e (BiP iteration and peak-memory benchmarks) and large-cpu (the CPU >2^31 tests, ~13 GB).
# Environment: BUDGET_S (default 540: the whole call), PYTHON (default python). The exit status is 1 if
# any stage failed or was cut short.
set -uo pipefail
out=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR [STAGE ...]}" && cd "$1" && pwd)
shift
stages=${*:-build cuda triton bench memcheck racecheck large}
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($python -c \
  "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export BIPKERNELS_REQUIRE_EXTENSION=1 BIPKERNELS_EXPECT_CUDA=1
sanitizer=$CUDA_HOME/bin/compute-sanitizer
[[ -x $sanitizer ]] || sanitizer=compute-sanitizer
failed=0

stage() {  # stage NAME CAP_S COMMAND...: runs COMMAND if NAME was asked for, logging to OUT_DIR/NAME.log
  local name=$1 cap=$2 started left result rc
  shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  started=$(date +%s)
  left=$(( deadline - started ))
  if (( left < 20 )); then
    echo "$name: not run (budget spent)" | tee -a "$out/summary.txt"
    failed=1
    return 0
  fi
  echo "== $name (at most $(( cap < left ? cap : left )) s): $*"
  timeout --signal=INT --kill-after=15 $(( cap < left ? cap : left )) "$@" >"$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124) result="CUT SHORT (time)"; failed=1 ;;
    137) result="KILLED (time past the SIGINT, or memory)"; failed=1 ;;
    *) result="FAILED (exit $rc)"; failed=1 ;;
  esac
  echo "$name: $result in $(( $(date +%s) - started )) s" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log"
}

pytest=($python -m pytest -q -p no:cacheprovider)
stage build 300 $python -m pip install --no-build-isolation --no-deps -v -e .
stage cuda 150 "${pytest[@]}" tests/test_cuda.py tests/test_build.py "tests/test_distributed.py::test_two_processes[nccl]" \
  tests/test_export.py::test_semi_structured_linear_equals_dense_on_gpu
# The compiled kernels (test_gpu.py skips under the interpreter), one matmul tile shape: one compile a case.
stage triton 150 env TRITON_INTERPRET=0 BIPKERNELS_TRITON_AUTOTUNE=0 "${pytest[@]}" tests/triton/test_gpu.py
stage bench 240 $python -m benchmarks -k "(triton or cuda or gpu) and not iteration and not peak_memory"
# The sanitizers slow every launch down many times over: float32 op tests, and the topk select. Without
# the caching allocator memcheck sees each tensor's own bounds, not a pooled block's.
stage memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $sanitizer --tool memcheck --error-exitcode 1 \
  --target-processes all "${pytest[@]}" tests/test_cuda.py -k "ops_match_reference and float32"
stage racecheck 60 $sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
  "${pytest[@]}" tests/test_cuda.py -k "(topk_threshold_matches or large_block_reduction) and float32"
stage large 120 env BIPKERNELS_LARGE_TESTS=1 "${pytest[@]}" tests/test_cuda.py -m large
stage e2e 300 $python -m benchmarks -k "cuda and (iteration or peak_memory)"
stage large-cpu 300 env BIPKERNELS_LARGE_TESTS=1 "${pytest[@]}" tests -m large --ignore=tests/test_cuda.py
cp benchmarks/results/"$($python -c 'from benchmarks.__main__ import device_name; print(device_name())')"* \
  "$out"/ 2>/dev/null || true
$python -m bipkernels info >"$out/info.txt" 2>&1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
exit $failed
