"""Build facts, import behaviour, and the command line's `info`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import bipkernels
from bipkernels import ops
from bipkernels.info import build_info


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


ROOT = Path(__file__).resolve().parents[1]


def _nvcc_present() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists() or shutil.which("nvcc") is not None


def test_extension_is_present_where_required():
    if os.environ.get("BIPKERNELS_REQUIRE_EXTENSION") == "1":
        assert ops._C is not None, "BIPKERNELS_REQUIRE_EXTENSION=1 but bipkernels._C did not import"
    if ops._C is None:
        pytest.skip("the compiled extension is not built")
    info = build_info()
    assert info["extension_version"] == bipkernels.__version__
    assert info["built_against_torch"] == torch.__version__
    for op in ops.OP_NAMES:
        assert "cpu" in info["ops"][op], f"{op} has no CPU kernel"


def test_cuda_kernels_compiled_when_nvcc_was_present():
    """setup.py's automatic mode builds the CUDA kernels whenever torch has CUDA and nvcc is found."""
    if ops._C is None:
        pytest.skip("the compiled extension is not built")
    expected = os.environ.get("BIPKERNELS_CUDA", "auto") != "0" and torch.version.cuda is not None and _nvcc_present()
    if os.environ.get("BIPKERNELS_EXPECT_CUDA") == "1":
        expected = True
    if not expected:
        pytest.skip("no nvcc or no CUDA torch: CPU-only build expected")
    info = build_info()
    assert info["cuda_kernels_built"] and info["cuda_archs"]
    for op in ops.OP_NAMES:
        assert "cuda" in info["ops"][op], f"{op} has no CUDA kernel registered"


def test_import_never_initialises_cuda():
    result = _python("import torch, bipkernels; print(torch.cuda.is_initialized())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_missing_extension_warns_once_and_runs_the_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['bipkernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, bipkernels\n"
        "    scores = torch.rand(50)\n"
        "    masks = bipkernels.topk_masks([scores], 7)\n"
        "    bipkernels.topk_masks([scores], 7)\n"
        "print(int(masks[0].sum()), sum('compiled extension is not available' in str(w.message) for w in caught))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "1"]


def test_a_source_tree_without_a_build_says_the_extension_is_not_built(tmp_path):
    """The warning names the cause: `from . import _C` during the package's import called a missing _C a
    "partially initialized module ... (most likely due to a circular import)"."""
    shutil.copytree(ROOT / "bipkernels", tmp_path / "bipkernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import importlib.machinery, sys, warnings\n"
        # Only the standard finders: an editable install's finder would fetch the checkout's _C for the copy.
        "standard = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter,"
        " importlib.machinery.PathFinder)\n"
        "sys.meta_path[:] = [finder for finder in sys.meta_path if finder in standard]\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import bipkernels\n"
        "print(bipkernels.__file__, bipkernels.ops._C)\n"
        "print(*[str(w.message) for w in caught if 'compiled extension' in str(w.message)], sep='\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    where, *messages = result.stdout.strip().splitlines()
    assert where == f"{tmp_path / 'bipkernels' / '__init__.py'} None"
    assert messages == ["bipkernels: the compiled extension is not available (bipkernels._C is not built: "
                        "`pip install --no-build-isolation .` in the source tree builds it); every op runs the "
                        "pure-PyTorch reference"]


def test_cli_info_prints_the_build_facts():
    result = _python("from bipkernels.cli import main; main(['info'])")
    assert result.returncode == 0, result.stderr
    assert f"bipkernels {bipkernels.__version__}" in result.stdout
    for op in ops.OP_NAMES:
        assert op in result.stdout
    from importlib import metadata, util

    installed = util.find_spec("triton") is not None
    triton_line = f"triton: {metadata.version('triton')}" if installed else "triton: not installed"
    assert triton_line in result.stdout.splitlines()
    assert all(("triton" in backends) == installed for backends in build_info()["ops"].values())


def _cuda_home_seen_by_setup(tmp_path, **env) -> str:
    """cpp_extension.CUDA_HOME after setup.py's extensions() ran with ``env`` (CUDA_HOME and CUDA_PATH unset
    unless given) and, on PATH, an nvcc that is a wrapper (/usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc) of a toolkit at tmp_path/cuda-13.0."""
    real_bin = tmp_path / "cuda-13.0" / "bin"
    wrapper_bin = tmp_path / "local" / "bin"
    for folder, script in ((real_bin, 'echo "#\\$ _HERE_=$(cd "$(dirname "$0")" && pwd)" >&2\n'),
                           (wrapper_bin, f'exec {real_bin / "nvcc"} "$@"\n')):
        folder.mkdir(parents=True)
        (folder / "nvcc").write_text("#!/bin/sh\n" + script)
        (folder / "nvcc").chmod(0o755)
    code = ("import runpy\n"
            f"runpy.run_path({str(ROOT / 'setup.py')!r})['extensions']()\n"
            "from torch.utils import cpp_extension\n"
            "print(cpp_extension.CUDA_HOME)\n")
    outside = {name: value for name, value in os.environ.items() if name not in ("CUDA_HOME", "CUDA_PATH")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**outside, "PATH": f"{wrapper_bin}{os.pathsep}{outside['PATH']}",
                                 "BIPKERNELS_CUDA": "auto", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_setup_builds_with_the_toolkit_of_the_nvcc_on_path_not_the_folder_above_it(tmp_path):
    """torch guessed CUDA_HOME=/usr/local from a wrapper nvcc, and the build compiled every kernel, then
    failed to link -lcudart."""
    assert _cuda_home_seen_by_setup(tmp_path) == str(tmp_path / "cuda-13.0")


@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_setup_keeps_the_toolkit_the_environment_names(tmp_path, variable):
    """CUDA_HOME or CUDA_PATH set (torch reads either) is the toolkit, whatever nvcc PATH holds (setup.py's
    docstring): the nvcc probe must not override the one the user chose."""
    chosen = tmp_path / "chosen-cuda"
    chosen.mkdir()
    assert _cuda_home_seen_by_setup(tmp_path, **{variable: str(chosen)}) == str(chosen)


def test_sdist_holds_every_file_that_the_build_and_the_tests_read(tmp_path):
    """An sdist must build where the repository is not: setuptools alone packs the .cpp files setup.py lists
    but no header (csrc/include, csrc/cpu/*.h) and no .cu, so the build from it failed at the first #include.
    It holds README's CMake build (.ci/cmake_build.sh) and nothing built or recorded here."""
    if shutil.which("git") is None:
        pytest.skip("no git: no list of the sources to compare the sdist with")
    listed = subprocess.run(["git", "ls-files", "bipkernels", "csrc", "python", "tests", "README.md", "setup.py",
                             "pyproject.toml", "CMakeLists.txt", ".ci/cmake_build.sh"], cwd=ROOT, capture_output=True,
                            text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout: no list of the sources to compare the sdist with")
    build = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                            "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "BIPKERNELS_CUDA": "0"})
    assert build.returncode == 0, build.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        packed = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = sorted(set(listed.stdout.split()) - packed)
    assert not missing, f"the sdist lacks {missing}"
    # Nor what a checkout gathers beside its sources: recorded benchmark results (tens of MB of JSON), the
    # extension built in place and bytecode (tests/__pycache__ exists once pytest has imported the tests).
    extra = sorted(name for name in packed if name.startswith("benchmarks/results/") or "__pycache__" in name
                   or name.endswith((".so", ".pyc")))
    assert not extra, f"the sdist carries {extra[:5]}"
