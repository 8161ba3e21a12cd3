"""Every Triton kernel compiles for sm_90 (the H100) and fits its shared memory, checked without a GPU by
tests/triton/gpu_compile.py in a process of its own (the interpreter must be off there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_every_kernel_compiles_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("gpu_compile.py")
    result = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
