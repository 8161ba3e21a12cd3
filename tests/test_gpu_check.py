"""benchmarks/gpu_check.sh and `python -m benchmarks` as a GPU loan meets them, checked without a GPU: the
script runs against a stand-in python whose build fails, the benchmark runner against a pytest run that
fails, and the GPU tests' input generators on fake CUDA tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import tied_scores, with_specials

ROOT = Path(__file__).parents[1]

# Answers what gpu_check.sh asks its python: the arch and device name, pip (the build fails), pytest and
# the benchmark runner (pass, printing their arguments; the runner writes a result, and with
# FAKE_HANG_PID_FILE set the bench stage's hangs, its pid in that file). The bin folder it names is its own.
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
        benchmarks) echo "benchmarks ran: ${*:3}"; touch "benchmarks/results/FAKE-GPU-$$.json"
                    if [[ -n "${FAKE_HANG_PID_FILE:-}" && "$*" == *"and not"* ]]; then
                      echo $$ >"$FAKE_HANG_PID_FILE"; exec sleep 60
                    fi ;;
        bipkernels) echo "bipkernels info" ;;
      esac ;;
esac
"""


def gpu_check_command(tmp_path, *stages: str) -> tuple[list[str], dict[str, str], Path]:
    """(argv, environment, OUT_DIR) of gpu_check.sh's ``stages`` against FAKE_PYTHON, the script copied
    into a repository of its own under ``tmp_path`` (benchmark results are written beside it), whose
    benchmarks/results holds an earlier run's result, old.json."""
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    results = tmp_path / "repo" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "old.json").write_text("{}")
    os.utime(results / "old.json", (0, 0))
    script = results.parent / "gpu_check.sh"
    script.write_text((ROOT / "benchmarks" / "gpu_check.sh").read_text())
    out = tmp_path / "out"
    return ["bash", str(script), str(out), *stages], {**os.environ, "PYTHON": str(python), "BUDGET_S": "100"}, out


def run_gpu_check(tmp_path, *stages: str) -> tuple[subprocess.CompletedProcess, Path]:
    """gpu_check.sh's ``stages`` run against FAKE_PYTHON (gpu_check_command); returns the run and OUT_DIR."""
    argv, env, out = gpu_check_command(tmp_path, *stages)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env), out


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


def test_gpu_check_runs_its_default_stages_most_wanted_first(tmp_path):
    """Without stage names every default stage runs (or is reported) in the header's order: the correctness
    checks (issue 9's >2^31-element tests included) before the benchmarks, which the time budget cuts
    short first, and the sanitizers last."""
    result, out = run_gpu_check(tmp_path)
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["build", "cuda", "triton", "large", "auto", "linear", "bench",
                                                        "memcheck", "racecheck"], result.stdout + result.stderr


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


def test_gpu_check_killed_from_outside_keeps_the_finished_benchmark_results(tmp_path):
    """The archive rewritten after each stage holds the benchmark results written so far, not only at the
    end: a run killed from outside (the device tool's time limit) still brings back those of the stages it
    finished, and none of an earlier run."""
    argv, env, out = gpu_check_command(tmp_path, "auto", "bench")
    hanging = tmp_path / "hanging.pid"
    script = subprocess.Popen(argv, env={**env, "FAKE_HANG_PID_FILE": str(hanging)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (hanging.exists() and hanging.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        script.kill()
        script.wait()
        if hanging.exists() and hanging.read_text().strip():
            os.kill(int(hanging.read_text()), signal.SIGKILL)
    assert "auto: ok" in (out / "summary.txt").read_text()
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        results = [Path(name).name for name in archive.getnames() if "/results/" in name]
    assert len(results) == 1 and results[0].startswith("FAKE-GPU-"), results
