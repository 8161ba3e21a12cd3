"""`bipkernels prune` killed outright (SIGKILL) at random moments of BiP or of pretraining and in the middle
of a checkpoint write, or stopped by SIGINT during pretraining, then resumed: it finishes with exactly the
model (masks, weights, statistics) of a run never stopped, and no checkpoint is ever left half-written.
`bipkernels compare` killed after its first result and resumed gives the same results. The kill times
follow the test's seed (printed; replay with BIPKERNELS_TEST_SEED)."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import bipkernels
from bipkernels import data, models
from bipkernels.solvers.training import train_weights

from conftest import resuming_text

RUN = ["--pretrain-epochs", "1", "--epochs", "2", "--save-every", "3"]  # 17 steps per epoch on digits
PRETRAIN = ["--pretrain-epochs", "6", "--epochs", "1"]  # resume.pt: 1 the arguments, 2 to 7 after each epoch
COMPARE = ["--pretrain-epochs", "2", "--epochs", "1", "--finetune-epochs", "1", "--sparsities", "0.5", "0.8",
           "--methods", "bip", "omp", "imp"]
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
        resuming = (out / "resume.pt").exists()
        saved = torch.load(out / "resume.pt", weights_only=False) if resuming else {}
        done = subprocess.run(_prune(out, *(["--resume"] if resuming else fresh)), capture_output=True, text=True,
                              timeout=TIMEOUT)
        if done.returncode == 0:
            if "position" in saved:  # a BiP state: the run goes on from there (starting over ends the same)
                assert resuming_text(saved) in done.stderr, done.stderr[-2000:]
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


@pytest.fixture(scope="module")
def uninterrupted_pretraining(tmp_path_factory):
    """A reference run that pretrains for several epochs: its pruned model and its dense.pt."""
    out = tmp_path_factory.mktemp("uninterrupted_pretraining")
    subprocess.run(_prune(out, *PRETRAIN), check=True, capture_output=True, timeout=TIMEOUT)
    return {**_pruned_state(out), "dense": torch.load(out / "dense.pt")}


def _assert_pretraining_was_stopped(out) -> None:
    state = torch.load(out / "resume.pt", weights_only=False)
    assert "solver" not in state and 1 <= state["pretraining"]["training"]["epoch"] <= 6, "not stopped in pretraining"


def _resume_and_assert_same_as(expected: dict, out) -> None:
    done = torch.load(out / "resume.pt", weights_only=False)["pretraining"]["training"]["epoch"]
    resumed = subprocess.run(_prune(out, "--resume"), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming pretraining after epoch {done} of " in resumed.stderr  # not from the start
    _assert_same_as(expected, out)
    dense = torch.load(out / "dense.pt")
    for part in ("model", "rewind"):
        assert dense[part].keys() == expected["dense"][part].keys()
        assert all(torch.equal(value, dense[part][key]) for key, value in expected["dense"][part].items()), part


def test_sigkill_during_pretraining_then_resume_gives_the_same_model(tmp_path, seed, uninterrupted_pretraining):
    out = tmp_path / "killed"
    process = subprocess.Popen(_prune(out, *PRETRAIN), stderr=subprocess.DEVNULL)
    rng = random.Random(seed)
    _wait_for_writes(out / "resume.pt", rng.randint(2, 4), process)  # 1 to 3 of its 6 epochs done
    time.sleep(rng.uniform(0.0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    _assert_no_half_written_checkpoint(out)
    _assert_pretraining_was_stopped(out)
    _resume_and_assert_same_as(uninterrupted_pretraining, out)


def test_sigint_during_pretraining_saves_and_exits_130(tmp_path, uninterrupted_pretraining):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(_prune(out, *PRETRAIN), stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # SIGINT once the first pretraining epoch has ended
        if line.startswith("pretrain ["):
            process.send_signal(signal.SIGINT)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=TIMEOUT) == 130, rest[-2000:]
    assert f"interrupted: state saved to {out / 'resume.pt'}; continue with `bipkernels prune --resume" in rest
    assert not (out / "dense.pt").exists()
    _assert_pretraining_was_stopped(out)
    _resume_and_assert_same_as(uninterrupted_pretraining, out)


def _compare(out, *extra):
    return [sys.executable, "-m", "bipkernels", "compare", *COMPARE, "--out", str(out), *extra]


def _compare_results(out) -> dict:
    """compare.json without the wall times."""
    saved = json.loads((out / "compare.json").read_text())
    return {**saved, "results": [{k: v for k, v in r.items() if k != "wall_time_s"} for r in saved["results"]]}


def test_compare_killed_after_its_first_result_then_resumed_gives_the_same_results(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_compare(straight), check=True, capture_output=True, timeout=TIMEOUT)
    process = subprocess.Popen(_compare(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_writes(killed / "compare.json", 1, process)
    # resume.pt holds the result once it is newer than compare.json, which is written first (a kill between
    # the two redoes the result: under load this test killed there, and resume.pt held no results yet).
    while process.poll() is None and \
            os.stat(killed / "resume.pt").st_mtime_ns < os.stat(killed / "compare.json").st_mtime_ns:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    finished = len(torch.load(killed / "resume.pt", weights_only=False)["results"])
    assert 1 <= finished < 6, "the run was not killed between its results"
    resumed = subprocess.run(_compare(killed, "--resume"), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after {finished} of 6 (sparsity, method) runs" in resumed.stderr
    assert _compare_results(killed) == _compare_results(straight)
    assert not (killed / "resume.pt").exists() and not list(killed.glob("*.tmp"))


def test_train_weights_stopped_and_started_again_gives_the_same_model():
    dataset = torch.utils.data.TensorDataset(*(t[:200] for t in data.digits()["train"].tensors))  # 7 batches of 32

    def fresh_model():
        torch.manual_seed(0)
        # Dropout: its draws continue only if the state restores the generator.
        return torch.nn.Sequential(torch.nn.Dropout(0.1), models.SmallResNet())

    straight = fresh_model()
    assert train_weights(straight, dataset, 3, batch_size=32) == 3 * 7
    saved = []

    def stop_after_the_first_epoch(state) -> bool:
        saved.append(copy.deepcopy(state))
        return True

    assert train_weights(fresh_model(), dataset, 3, batch_size=32, on_epoch=stop_after_the_first_epoch) == 7
    assert [state["epoch"] for state in saved] == [1]
    resumed = fresh_model()
    assert train_weights(resumed, dataset, 3, batch_size=32, start=saved[0]) == 3 * 7
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_train_weights_rejects_a_bad_start_or_hook():
    model, dataset = models.SmallResNet(), data.digits()["val"]
    with pytest.raises(ValueError, match=r"train_weights: start must be a state given to on_epoch .*keys \['epoch'\]"):
        train_weights(model, dataset, 1, start={"epoch": 0})
    with pytest.raises(ValueError, match="train_weights: start must be .*got 3"):
        train_weights(model, dataset, 1, start=3)
    with pytest.raises(TypeError, match="train_weights: on_epoch must be callable or None, got 'save'"):
        train_weights(model, dataset, 1, on_epoch="save")
