"""benchmarks/gpu_check.sh and `python -m benchmarks` as a GPU loan meets them, checked without a GPU: the
script runs against a stand-in python whose build fails, the benchmark runner against a pytest run that
fails, and the GPU tests' input generators on fake CUDA tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import tied_scores, with_specials

ROOT = Path(__file__).parents[1]

# Answers what gpu_check.sh asks its python: the arch and device name, pip (the build fails), pytest and
# the benchmark runner (pass, printing their arguments). The bin folder it names is its own.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -c) case "$2" in
        *get_device_capability*) echo 9.0 ;;
        *device_name*) echo FAKE-GPU ;;
        *sys.executable*) dirname "$0" ;;
      esac ;;
  -m) case "$2" in
        pip) echo "build error"; exit 1 ;;
        pytest) echo "pytest ran: ${*:3}" ;;
        benchmarks) echo "benchmarks ran: ${*:3}" ;;
        bipkernels) echo "bipkernels info" ;;
      esac ;;
esac
"""


def run_gpu_check(tmp_path, *stages: str) -> tuple[subprocess.CompletedProcess, Path]:
    """gpu_check.sh's ``stages`` run against FAKE_PYTHON; returns the run and its OUT_DIR."""
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), *stages],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(python), "BUDGET_S": "100"})
    return result, out


def stage_logs(out: Path) -> dict[str, str]:
    """Each stage's log in OUT_DIR/gpu_check.tar.gz, by stage name."""
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        return {Path(member.name).stem: archive.extractfile(member).read().decode()
                for member in archive.getmembers() if member.name.endswith(".log")}


def test_gpu_check_after_a_failed_build(tmp_path):
    """The stages that need the extension are not run, the triton one still is; OUT_DIR holds two files
    (the device tool brings back at most 8), the archive every stage's log."""
    result, out = run_gpu_check(tmp_path, "build", "cuda", "triton", "memcheck")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(" in ")[0] for line in summary] == [
        "build: FAILED (exit 1)", "cuda: not run (the build failed)", "triton: ok",
        "memcheck: not run (the build failed)"], summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"build.log", "triton.log", "info.txt", "nvidia-smi.txt"} <= names
    assert "pytest ran: -q -p no:cacheprovider tests/triton/test_gpu.py" in stage_logs(out)["triton"]


def _collected_benchmarks(log: str) -> set[str]:
    """The benchmarks that the ``-k`` expression a benchmark stage passed (its log) selects."""
    expression = log.split("benchmarks ran: -k ", 1)[1].splitlines()[0]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "benchmarks"), "-k", expression], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_gpu_check_times_what_auto_on_cuda_needs_before_the_other_benchmarks(tmp_path):
    """Every benchmark of benchmarks/test_triton.py (what bipkernels.triton.AUTO_ON_CUDA is filled from,
    its masked_linear row too) runs in a stage of its own before `bench`, the longest, which the time
    budget cuts short first; no benchmark runs twice."""
    result, out = run_gpu_check(tmp_path, "auto", "linear", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
    logs = stage_logs(out)
    auto, linear, bench = (_collected_benchmarks(logs[stage]) for stage in ("auto", "linear", "bench"))
    triton = {test for test in auto | linear | bench if test.startswith("benchmarks/test_triton.py::")}
    assert triton and auto | linear == triton and not auto & linear, (auto, linear)
    assert bench and not bench & triton, bench & triton


def test_benchmark_tables_are_written_for_a_run_that_failed(tmp_path, monkeypatch):
    """A failing or interrupted benchmark run still leaves the JSON of what ran: the table is made from
    it and the exit status stays the failure's."""
    import pytest

    from benchmarks import __main__ as runner

    def failing_run(args):
        json_path = Path(next(arg for arg in args if arg.startswith("--benchmark-json=")).split("=", 1)[1])
        bench = {"group": "g", "name": "test", "params": {"method": "ours"}, "extra_info": {},
                 "stats": {"median": 0.5, "min": 0.4, "max": 0.6, "rounds": 3}}
        json_path.write_text(json.dumps({"benchmarks": [bench], "machine_info": {}, "datetime": "today"}))
        return 2

    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    monkeypatch.setattr(pytest, "main", failing_run)
    monkeypatch.setattr(runner, "plot", lambda results, path: False)
    assert runner.main(["-k", "nothing"]) == 2
    assert len(list(tmp_path.glob("*.md"))) == 1


def test_specials_are_written_on_the_device_of_cuda_scores():
    """tests/triton/test_gpu.py puts NaN and infinities into CUDA scores with with_specials: FakeTensorMode
    checks an indexed assignment's devices as a GPU does (a CUDA tensor takes a CPU tensor of values only
    when it is one scalar), so fake CUDA tensors find here what failed every such test on a GPU."""
    with FakeTensorMode():
        scores = with_specials(tied_scores((6, 5), torch.bfloat16, device="cuda"))
    assert scores.device.type == "cuda" and scores.dtype == torch.bfloat16 and scores.shape == (6, 5)
