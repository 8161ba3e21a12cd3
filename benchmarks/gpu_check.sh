#!/usr/bin/env bash
# Everything a GPU machine has to check, in one call that fits a short loan: build the extension with the
# CUDA kernels for this GPU, the CUDA tests, the compiled Triton kernels, the >2^31-element tests, the
# kernel benchmarks (what bipkernels.triton.AUTO_ON_CUDA and the README's GPU table need) and
# compute-sanitizer. Stages run in that order (most wanted first) under one time budget: a stage gets at
# most its own cap and what is left of the budget, is stopped with SIGINT when either runs out (pytest still prints
# what it ran), and a stage with under 20 s left is reported as not run. When the build fails, the stages
# that need the extension are reported as not run; the Triton tests and benchmarks still run.
#
# OUT_DIR gets two files, since the device tool brings back at most 8 from its $OUT: summary.txt (one
# line per stage) and gpu_check.tar.gz (each stage's log, the benchmark results, `bipkernels info` and
# nvidia-smi), rewritten after every stage so that a run killed from outside keeps what it finished.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [STAGE ...]
#
# Stages: build cuda triton large auto linear bench memcheck racecheck (the default, in this order), and,
# asked for by name only, e2e (BiP iteration and peak-memory benchmarks) and large-cpu (the CPU >2^31 tests,
# ~13 GB).
# Environment: BUDGET_S (default 540: the whole call), PYTHON (default python3: the lent machines' python
# with torch; `python` may not be on their PATH). The exit status is 1 if any stage failed or was cut short.
set -uo pipefail
out=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR [STAGE ...]}" && cd "$1" && pwd)
shift
stages=${*:-build cuda triton large auto linear bench memcheck racecheck}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
# The interpreter's own bin first on PATH: torch builds with the ninja that pip installed beside it
# (without one on PATH it compiles one file at a time).
if ! bin=$($python -c 'import os, sys, torch; print(os.path.dirname(sys.executable))'); then
  echo "gpu_check: '$python' cannot import torch: set PYTHON" | tee "$out/summary.txt"
  exit 1
fi
PATH=$bin:$PATH
logs=$(mktemp -d)
results_since=$(mktemp)  # its time stamp tells the benchmark results of this run from older ones
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($python -c \
  "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# BIPKERNELS_CUDA=1: a build that cannot compile the CUDA kernels fails here, not in every later stage.
export BIPKERNELS_CUDA=1 BIPKERNELS_REQUIRE_EXTENSION=1 BIPKERNELS_EXPECT_CUDA=1
sanitizer=$CUDA_HOME/bin/compute-sanitizer
[[ -x $sanitizer ]] || sanitizer=compute-sanitizer
needs_extension=" cuda memcheck racecheck large e2e large-cpu "
failed=0
build_failed=0

pack() {  # OUT_DIR/gpu_check.tar.gz from the logs and results so far, replaced whole (a kill never leaves
  # half of one); the benchmark results each time too, so that a run killed from outside keeps them.
  mkdir -p "$logs/results"
  find benchmarks/results -type f -newer "$results_since" -exec cp {} "$logs/results"/ \;
  tar -czf "$out/gpu_check.tar.gz.part" -C "$logs" . && mv "$out/gpu_check.tar.gz.part" "$out/gpu_check.tar.gz"
}

stage() {  # stage NAME CAP_S COMMAND...: runs COMMAND if NAME was asked for, logging to NAME.log
  local name=$1 cap=$2 started left result rc
  shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  started=$(date +%s)
  left=$(( deadline - started ))
  if (( build_failed )) && [[ $needs_extension == *" $name "* ]]; then
    echo "$name: not run (the build failed)" | tee -a "$out/summary.txt"
    failed=1
    return 0
  fi
  if (( left < 20 )); then
    echo "$name: not run (budget spent)" | tee -a "$out/summary.txt"
    failed=1
    return 0
  fi
  echo "== $name (at most $(( cap < left ? cap : left )) s): $*"
  timeout --signal=INT --kill-after=15 $(( cap < left ? cap : left )) "$@" >"$logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124) result="CUT SHORT (time)"; failed=1 ;;
    137) result="KILLED (time past the SIGINT, or memory)"; failed=1 ;;
    *) result="FAILED (exit $rc)"; failed=1 ;;
  esac
  [[ $name == build && $rc != 0 ]] && build_failed=1
  echo "$name: $result in $(( $(date +%s) - started )) s" | tee -a "$out/summary.txt"
  tail -n 3 "$logs/$name.log"
  pack
}

pytest=($python -m pytest -q -p no:cacheprovider)
# The import at the end: an extension that builds but does not load fails here too.
stage build 300 bash -c '"$@" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . \
  && "$@" -c "import bipkernels._C"' build $python
# The nccl leg skips on one GPU (NCCL takes a GPU per rank); it runs where two are lent.
stage cuda 150 "${pytest[@]}" tests/test_cuda.py tests/test_build.py "tests/test_distributed.py::test_two_processes[nccl]" \
  tests/test_export.py::test_semi_structured_linear_equals_dense_on_gpu
# The compiled kernels (test_gpu.py skips under the interpreter), one matmul tile shape: one compile a case.
stage triton 150 env TRITON_INTERPRET=0 BIPKERNELS_TRITON_AUTOTUNE=0 "${pytest[@]}" tests/triton/test_gpu.py
# Issue 9's >2^31-element ops on the GPU: a correctness check, so before the benchmarks.
stage large 120 env BIPKERNELS_LARGE_TESTS=1 "${pytest[@]}" tests/test_cuda.py -m large
# What bipkernels.triton.AUTO_ON_CUDA is filled from first (benchmarks/test_triton.py), each in a stage of
# its own so that one cut short keeps the others: the triton-vs-cuda groups, then for its masked_linear row
# the fused matmul against the unfused layer (autotuned: nine tile shapes to compile), then the rest.
stage auto 120 $python -m benchmarks -k "triton_vs_cuda"
stage linear 240 $python -m benchmarks -k "masked_linear_triton"
stage bench 240 $python -m benchmarks -k "(triton or cuda or gpu) and not triton_vs_cuda and not masked_linear_triton \
  and not iteration and not peak_memory"
# The sanitizers slow every launch down many times over: float32 op tests, and the topk select. Without
# the caching allocator memcheck sees each tensor's own bounds, not a pooled block's.
stage memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $sanitizer --tool memcheck --error-exitcode 1 \
  --target-processes all "${pytest[@]}" tests/test_cuda.py -k "ops_match_reference and float32"
stage racecheck 60 $sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
  "${pytest[@]}" tests/test_cuda.py -k "(topk_threshold_matches or large_block_reduction) and float32"
stage e2e 300 $python -m benchmarks -k "cuda and (iteration or peak_memory)"
stage large-cpu 300 env BIPKERNELS_LARGE_TESTS=1 "${pytest[@]}" tests -m large --ignore=tests/test_cuda.py
$python -m bipkernels info >"$logs/info.txt" 2>&1
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
pack
rm -rf "$logs" "$results_since"
exit $failed
