"""benchmarks/gpu_check.sh and `python -m benchmarks` as a GPU loan meets them, checked without a GPU: the
script runs against a stand-in python whose build fails, the benchmark runner against a pytest run that
fails, and the GPU tests' input generators on fake CUDA tensors."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import tied_scores, with_specials

ROOT = Path(__file__).parents[1]

# Answers what gpu_check.sh asks its python: the arch and device name, pip (the build fails), pytest
# (passes, printing its arguments). The bin folder it names is its own.
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
        bipkernels) echo "bipkernels info" ;;
      esac ;;
esac
"""


def test_gpu_check_after_a_failed_build(tmp_path):
    """The stages that need the extension are not run, the triton one still is; OUT_DIR holds two files
    (the device tool brings back at most 8), the archive every stage's log."""
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "build", "cuda", "triton",
                             "memcheck"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": str(python), "BUDGET_S": "100"})
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(" in ")[0] for line in summary] == [
        "build: FAILED (exit 1)", "cuda: not run (the build failed)", "triton: ok",
        "memcheck: not run (the build failed)"], summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
        assert {"build.log", "triton.log", "info.txt", "nvidia-smi.txt"} <= names
        triton_log = archive.extractfile(next(m for m in archive.getmembers() if m.name.endswith("triton.log")))
        assert "pytest ran: -q -p no:cacheprovider tests/triton/test_gpu.py" in triton_log.read().decode()


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
