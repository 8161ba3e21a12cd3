"""The command line end to end at tiny sizes: the main job, interruption and resume, compare."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import bipkernels
from bipkernels import data, models
from bipkernels.cli import main
from bipkernels.solvers.training import save_atomically

from conftest import needs_torchvision

TINY = ["--pretrain-epochs", "2", "--epochs", "4"]


def test_digits_split_is_fixed_and_disjoint():
    first, second = data.digits(), data.digits()
    assert {name: len(split) for name, split in first.items()} == {"train": 1078, "val": 269, "test": 450}
    assert torch.equal(first["test"].tensors[0], second["test"].tensors[0])
    assert first["train"].tensors[0].shape[1:] == (1, 8, 8)


def _masked_state(path):
    model = bipkernels.convert(models.SmallResNet())
    model.load_state_dict(torch.load(path)["model"])
    return model


@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_prune_writes_checkpoint_and_results(tmp_path, structure):
    main(["prune", *TINY, "--structure", structure, "--score-momentum", "0.5", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["score_momentum"] == 0.5 and result["score_lr"] == 0.01 and result["lr"] == 0.1
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["passes"] == 4 * 17  # 1078 images in batches of 64
    if structure == "unstructured":
        assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    model = _masked_state(tmp_path / "pruned.pt")
    assert bipkernels.sparsity(model) == pytest.approx(result["sparsity"])
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "resume.pt").exists()


def _run(*args):
    return [sys.executable, "-m", "bipkernels", "prune", *TINY, "--mode", "faithful", *args]


def test_interrupted_prune_resumes_to_the_same_masks(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    subprocess.run(_run("--out", str(straight)), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(_run("--out", str(interrupted)), stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # SIGTERM once the first BiP epoch has ended
        if line.startswith("bip ["):
            process.send_signal(signal.SIGTERM)
            break
    process.stderr.read()
    assert process.wait(timeout=600) == 130
    assert (interrupted / "resume.pt").exists() and not (interrupted / "pruned.pt").exists()
    subprocess.run([sys.executable, "-m", "bipkernels", "prune", "--resume", "--out", str(interrupted)], check=True,
                   capture_output=True, timeout=600)

    expected, resumed = _masked_state(straight / "pruned.pt"), _masked_state(interrupted / "pruned.pt")
    for key, value in expected.state_dict().items():
        other = resumed.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_compare_writes_table_json_and_plots(tmp_path, capsys):
    main(["compare", "--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--sparsities", "0.5",
          "0.8", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert {(r["method"], r["target_sparsity"]) for r in results} == {
        (m, s) for m in bipkernels.solvers.METHODS for s in (0.5, 0.8)}
    assert "test accuracy and wall time" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "time.png").stat().st_size > 0


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_resume_without_a_checkpoint_says_so(tmp_path, command):
    with pytest.raises(SystemExit, match=re.escape(f"bipkernels {command}: --resume but there is no {tmp_path}")):
        main([command, "--resume", "--out", str(tmp_path)])


def test_resume_of_another_commands_state_says_so(tmp_path):
    save_atomically({"args": {"command": "prune"}}, tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match="bipkernels compare: .*resume.pt is the state of a `bipkernels prune` run"):
        main(["compare", "--resume", "--out", str(tmp_path)])


def test_resume_names_the_options_it_ignores(tmp_path, capsys):
    save_atomically({"args": {"command": "prune", "epochs": 0, "pretrain_epochs": 0, "sparsity": 0.5}},
                    tmp_path / "resume.pt")
    main(["prune", "--resume", "--epochs", "3", "--sparsity", "0.5", "--lr", "0.1", "--out", str(tmp_path)])
    assert "bipkernels prune --resume: ignored --epochs 3: the interrupted run goes on" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 0


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_a_fresh_start_does_not_overwrite_an_interrupted_run(tmp_path, command):
    save_atomically({"args": {"command": command}}, tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match=f"bipkernels {command}: .*resume.pt holds an interrupted run: continue it "
                                         "with --resume"):
        main([command, "--out", str(tmp_path)])
    assert torch.load(tmp_path / "resume.pt", weights_only=False) == {"args": {"command": command}}


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--model", "resnet18"], "takes 3-channel images", marks=needs_torchvision),  # digits: 1 channel
    (["--structure", "2:4"], "layer 'stem.0' (Conv2d): structure 2:4"),
    (["--data", "folder:/no/such/folder"], "needs train/ and test/"),
    (["--mode", "faithful", "--batch-size", "2000"], "leave no BiP step"),
])
def test_a_setup_that_cannot_run_stops_before_any_file(tmp_path, capsys, argv, message):
    """The data, model and structure are tried together first: a resume.pt written before the error would
    refuse the corrected command."""
    with pytest.raises(SystemExit) as raised:
        main(["prune", *TINY, *argv, "--out", str(tmp_path / "out")])
    assert message in str(raised.value.code)
    assert not (tmp_path / "out").exists()
    main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path / "out")])  # the corrected run


def test_output_files_follow_the_umask(tmp_path):
    main(["prune", "--pretrain-epochs", "1", "--epochs", "0", "--out", str(tmp_path)])
    umask = os.umask(0)
    os.umask(umask)
    for name in ("dense.pt", "pruned.pt", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_compare_uses_its_batch_size_and_checks_bip_steps_only_for_bip(tmp_path):
    main(["compare", "--methods", "omp", "--mode", "faithful", "--batch-size", "2000", "--sparsities", "0.5",
          "--pretrain-epochs", "1", "--finetune-epochs", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "compare.json").read_text())["results"][0]
    assert result["passes"] == 2  # one batch of all 1078 training images per fine-tuning epoch

