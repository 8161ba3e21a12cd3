"""`bipkernels prune` killed outright (SIGKILL) at random moments and in the middle of a checkpoint write,
then resumed: it finishes with exactly the model (masks, weights, statistics) of a run never stopped, and
no checkpoint is ever left half-written. The kill times follow the test's seed (printed; replay with
BIPKERNELS_TEST_SEED)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import bipkernels
from bipkernels import models

RUN = ["--pretrain-epochs", "1", "--epochs", "2", "--save-every", "3"]  # 17 steps per epoch on digits
TIMEOUT = 300

# Runs the command in this process with torch.save cut short on its Nth call: half the bytes reach the
# file, then the process kills itself (SIGKILL), as a kill at the worst moment of a write would.
KILL_IN_WRITE = """
import io, os, signal, sys, torch
from bipkernels.cli import main
stop_at, calls, save = int(sys.argv[1]), [], torch.save
def cut_short(obj, file, *args, **kwargs):
    calls.append(1)
    if len(calls) < stop_at:
        return save(obj, file, *args, **kwargs)
    data = io.BytesIO()
    save(obj, data)
    file.write(data.getvalue()[:len(data.getvalue()) // 2])
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = cut_short
sys.exit(main(sys.argv[2:]))
"""


def _prune(out, *extra):
    return [sys.executable, "-m", "bipkernels", "prune", *RUN, "--out", str(out), *extra]


def _wait_for_writes(path, count: int, process) -> None:
    """Until ``path`` has been written ``count`` times (seen as new (inode, mtime) pairs; the writes are
    steps apart, the polls 5 ms) or ``process`` ended."""
    seen = set()
    while len(seen) < count and process.poll() is None:
        try:
            stat = os.stat(path)
            seen.add((stat.st_ino, stat.st_mtime_ns))
        except FileNotFoundError:
            pass
        time.sleep(0.005)


def _pruned_state(out) -> dict:
    model = bipkernels.convert(models.SmallResNet())
    model.load_state_dict(torch.load(out / "pruned.pt")["model"])
    return {"masks": bipkernels.masks(model), "state": model.state_dict()}


def _assert_no_half_written_checkpoint(out) -> None:
    for path in out.glob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=False)  # raises on a truncated file


def _finish(out, fresh: list[str]) -> int:
    """Resume until the run completes (a fresh run, with ``fresh`` options, if it was killed before its
    first save); returns the number of runs it took."""
    for attempt in range(1, 4):
        extra = ["--resume"] if (out / "resume.pt").exists() else fresh
        done = subprocess.run(_prune(out, *extra), capture_output=True, text=True, timeout=TIMEOUT)
        if done.returncode == 0:
            return attempt
    raise AssertionError(f"the run did not finish: {done.stderr[-2000:]}")


def _assert_same_as(expected: dict, out) -> None:
    assert (out / "pruned.pt").exists() and not (out / "resume.pt").exists()
    assert not list(out.glob("*.tmp")), "temporary files were left behind"
    got = _pruned_state(out)
    for name, mask in expected["masks"].items():
        assert torch.equal(got["masks"][name], mask), f"mask of {name} differs"
    for key, value in expected["state"].items():
        other = got["state"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, and its dense.pt: the interrupted runs start from it (--checkpoint) to skip the
    pretraining, which also checks that a loaded dense model continues exactly as the pretrained one."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_prune(out), check=True, capture_output=True, timeout=TIMEOUT)
    return {**_pruned_state(out), "dense": ["--checkpoint", str(out / "dense.pt")]}


def test_sigkill_at_random_moments_then_resume_gives_the_same_model(tmp_path, seed, uninterrupted):
    rng = random.Random(seed)
    out = tmp_path / "killed"
    # First kill: during BiP, whatever the machine's speed: after a random number of its saves (the
    # second write of resume.pt is its start, then one every 3 steps), a random part of a step later.
    process = subprocess.Popen(_prune(out, *uninterrupted["dense"]), stderr=subprocess.DEVNULL)
    _wait_for_writes(out / "resume.pt", rng.randint(2, 10), process)
    time.sleep(rng.uniform(0.0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    assert not (out / "pruned.pt").exists(), "the run ended before the kill"
    _assert_no_half_written_checkpoint(out)
    # Second kill: the resumed run, at a random moment of its start (imports, loading the checkpoint).
    process = subprocess.Popen(_prune(out, "--resume"), stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.0, 3.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    _assert_no_half_written_checkpoint(out)
    _finish(out, uninterrupted["dense"])
    _assert_same_as(uninterrupted, out)


def test_sigkill_in_the_middle_of_a_checkpoint_write_then_resume_gives_the_same_model(tmp_path, seed, uninterrupted):
    # torch.save calls: 1 resume.pt (the arguments), 2 resume.pt (BiP's start), 3 to 15 resume.pt (every
    # 3 steps and at each epoch's end), 16 pruned.pt.
    stop_at = random.Random(seed).randint(1, 16)
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, str(stop_at), "prune", *RUN, "--out", str(out),
                             *uninterrupted["dense"]], capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = list(out.glob("*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0, "the cut write left no partial file"
    _assert_no_half_written_checkpoint(out)
    assert (out / "resume.pt").exists() == (stop_at > 1)
    _finish(out, uninterrupted["dense"])
    _assert_same_as(uninterrupted, out)
