"""The command line end to end at tiny sizes: the main job, interruption and resume, compare."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import bipkernels
from bipkernels import cli, data, models
from bipkernels.cli import main
from bipkernels.solvers.training import save_atomically, train_weights

from conftest import needs_torchvision, resuming_text

TINY = ["--pretrain-epochs", "2", "--epochs", "4"]


def test_every_option_of_every_subcommand_has_help_that_shows_its_default(capsys):
    """`bipkernels COMMAND --help` says what each option does and its default, a list as it is typed; a flag
    or an option without a default shows none ("(default: False)" would say nothing)."""
    parser = cli._parser()
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for command, subcommand in subcommands.choices.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())  # unwrapped
        for action in subcommand._actions:
            assert action.help, f"bipkernels {command} {action.option_strings[-1]}: no help text"
            default = action.default
            if default is None or default is False or default is argparse.SUPPRESS:
                expected = action.help
            else:
                typed = (" ".join(map(str, default)) or "none") if isinstance(default, list) else default
                expected = f"{action.help} (default: {typed})"
            assert " ".join(expected.split()) in shown, f"bipkernels {command} {action.option_strings[-1]}"
        assert "(default: None)" not in shown and "(default: False)" not in shown


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
    saved = torch.load(interrupted / "resume.pt", weights_only=False)
    assert tuple(saved["position"]) != (0, 0), "stopped before any BiP step: nothing to resume"
    resumed = subprocess.run([sys.executable, "-m", "bipkernels", "prune", "--resume", "--out", str(interrupted)],
                             check=True, capture_output=True, text=True, timeout=600)
    # From the saved position on, not from the start (which would also end with the same masks).
    assert resuming_text(saved) in resumed.stderr, resumed.stderr[-2000:]

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


def _fake_prune(model, train_data, method, sparsity, **_):
    """A stand-in for bipkernels.prune in compare: the record of a run, without the run."""
    return model, {"method": method, "target_sparsity": sparsity, "sparsity": sparsity, "test_accuracy": sparsity / 2,
                   "wall_time_s": 0.0}


def test_compare_table_names_each_sparsity_with_all_its_digits(tmp_path, capsys, monkeypatch):
    """Rounded to whole percents, the columns of 0.98 and 0.985 were both "98% acc" and 0.999 "100% acc"."""
    monkeypatch.setattr(cli, "prune_with", _fake_prune)
    main(["compare", "--pretrain-epochs", "0", "--methods", "omp", "--sparsities", "0.98", "0.985", "0.999",
          "--out", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    header = table.index(next(line for line in table if line.startswith("method")))
    assert table[header].split() == ["method", "98%", "acc", "time", "98.5%", "acc", "time", "99.9%", "acc", "time"]
    assert table[header + 1].split() == ["omp", "0.4900", "0.0", "0.4925", "0.0", "0.4995", "0.0"]


def test_compare_with_an_nm_structure_takes_only_its_sparsity(tmp_path, capsys, monkeypatch):
    """2:4 keeps half of every layer whatever the sparsity asked: --sparsities 0.9 ran again at 0.5 and the
    table and plots showed it as 90%."""
    monkeypatch.setattr(cli, "prune_with", _fake_prune)
    arguments = ["compare", "--structure", "2:4", "--exclude", "stem.0", "--pretrain-epochs", "0", "--methods", "omp"]
    with pytest.raises(SystemExit) as stopped:
        main(arguments + ["--sparsities", "0.5", "0.9", "0", "--out", str(tmp_path / "refused")])
    assert str(stopped.value) == ("bipkernels compare: --structure 2:4 keeps 2 of every 4 weights (sparsity 0.5) "
                                  "whatever the sparsity asked: --sparsities 0.9 0.0 would run at 0.5 and be shown "
                                  "as asked; give --sparsities 0.5")
    assert not (tmp_path / "refused").exists()
    main(arguments + ["--sparsities", "0.5", "--out", str(tmp_path / "run")])
    assert [r["target_sparsity"] for r in json.loads((tmp_path / "run" / "compare.json").read_text())["results"]] \
        == [0.5]


def _dense_checkpoint(tmp_path, path, seed: int = 0) -> None:
    """A dense.pt of an untrained digits model (prune with no epochs writes it) at ``path``."""
    out = tmp_path / f"dense-{seed}"
    main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--sparsity", "0.5", "--seed", str(seed),
          "--out", str(out)])
    os.replace(out / "dense.pt", path)


def _compare_stopped_after_one_run(monkeypatch, *arguments) -> None:
    """compare (omp and random at 0.5, runs faked) stopped as by Ctrl-C once its first run is saved; leaves
    prune_with faked for a resume."""
    calls = []

    def stopping_after_one_run(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_prune(model, *args, **kwargs)

    monkeypatch.setattr(cli, "prune_with", stopping_after_one_run)
    assert main(["compare", "--methods", "omp", "random", "--sparsities", "0.5", *arguments]) == 130
    monkeypatch.setattr(cli, "prune_with", _fake_prune)


def test_compare_resumed_from_another_folder_reads_the_same_checkpoint(tmp_path, monkeypatch):
    """--checkpoint is saved as an absolute path, as --data is: saved as typed (relative), a resume from
    another folder could not read it, or read another file of the same name there."""
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _dense_checkpoint(tmp_path, tmp_path / "start" / "dense.pt")
    monkeypatch.chdir(tmp_path / "start")
    out = str(tmp_path / "compare")
    _compare_stopped_after_one_run(monkeypatch, "--checkpoint", "dense.pt", "--out", out)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["compare", "--resume", "--out", out]) == 0
    results = json.loads((tmp_path / "compare" / "compare.json").read_text())["results"]
    assert [r["method"] for r in results] == ["omp", "random"]


def test_a_resume_typed_with_the_same_relative_checkpoint_names_nothing_ignored(tmp_path, monkeypatch, capsys):
    """The saved --checkpoint is absolute: the same relative path typed again with --resume is the same
    file, not an option to name as ignored (it was: 'ignored --checkpoint dense.pt'); another file is."""
    _dense_checkpoint(tmp_path, tmp_path / "dense.pt")
    monkeypatch.chdir(tmp_path)
    _compare_stopped_after_one_run(monkeypatch, "--checkpoint", "dense.pt", "--out", "compare")
    capsys.readouterr()
    assert main(["compare", "--resume", "--out", "compare", "--checkpoint", "./dense.pt", "--data", "digits"]) == 0
    assert "ignored" not in capsys.readouterr().err
    assert len(json.loads((tmp_path / "compare" / "compare.json").read_text())["results"]) == 2


def test_compare_resumed_with_another_checkpoint_at_its_path_stops(tmp_path, monkeypatch):
    """compare loads --checkpoint again on every resume: a file replaced since (another run's dense.pt
    written there) gave the remaining runs another dense model than the finished ones, in one compare.json."""
    checkpoint, out = tmp_path / "dense.pt", tmp_path / "compare"
    _dense_checkpoint(tmp_path, checkpoint)
    _compare_stopped_after_one_run(monkeypatch, "--checkpoint", str(checkpoint), "--out", str(out))
    _dense_checkpoint(tmp_path, checkpoint, seed=1)
    with pytest.raises(SystemExit, match=re.escape(
            f"bipkernels compare --resume: --checkpoint {checkpoint} changed since the run started: the run would "
            "go on from another dense model; start afresh (another --out, or delete its resume.pt)")):
        main(["compare", "--resume", "--out", str(out)])
    assert len(torch.load(out / "resume.pt", weights_only=False)["results"]) == 1


def test_compare_killed_between_its_two_writes_loses_no_result(tmp_path, monkeypatch):
    """After each run compare writes compare.json and resume.pt: a kill right after the first of the two
    (a stand-in exception on the second), after the last run, loses nothing on --resume. With resume.pt
    written first, the resumed run found nothing left to do and left compare.json one result short."""
    arguments = ["compare", "--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--sparsities",
                 "0.5", "--methods", "omp", "random", "--out", str(tmp_path)]
    killed = []

    def dying_after_the_last_result(write):
        def dying(content, path):
            if killed:
                raise KeyboardInterrupt
            write(content, path)
            results = content.get("results", []) if isinstance(content, dict) else json.loads(content)["results"]
            killed.extend([path.name] if path.name in ("resume.pt", "compare.json") and len(results) == 2 else [])
        return dying

    for name in ("save_atomically", "write_text_atomically"):
        monkeypatch.setattr(cli, name, dying_after_the_last_result(getattr(cli, name)))
    assert main(arguments) == 130  # KeyboardInterrupt: the exit status of a stop, with no traceback
    monkeypatch.undo()
    main(arguments[:1] + ["--resume", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert [r["method"] for r in results] == ["omp", "random"] and not (tmp_path / "resume.pt").exists()


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_resume_without_a_checkpoint_says_so(tmp_path, command):
    with pytest.raises(SystemExit, match=re.escape(f"bipkernels {command}: --resume but there is no {tmp_path}")):
        main([command, "--resume", "--out", str(tmp_path)])


def test_resume_of_another_commands_state_says_so(tmp_path):
    save_atomically({"args": {"command": "prune"}}, tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match="bipkernels compare: .*resume.pt is the state of a `bipkernels prune` run"):
        main(["compare", "--resume", "--out", str(tmp_path)])


def test_resume_names_the_options_it_ignores(tmp_path, capsys):
    """Every option typed that differs from the saved run's, also one typed at its default (--sparsity 0.9
    here, abbreviated) which comparing values with the defaults missed."""
    save_atomically({"args": {"command": "prune", "epochs": 0, "pretrain_epochs": 0, "sparsity": 0.5, "lr": 0.1}},
                    tmp_path / "resume.pt")
    main(["prune", "--resume", "--epochs", "3", "--spars=0.9", "--lr", "0.1", "--out", str(tmp_path)])
    assert "bipkernels prune --resume: ignored --epochs 3, --sparsity 0.9: the interrupted run goes on" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 0


def test_a_resume_on_data_that_changed_stops(tmp_path, capsys):
    """resume.pt holds a fingerprint of the data: a resumed run whose data changed since (an image folder
    that gained an image reshuffles its validation tenth, so validation images were trained on) stops,
    naming the splits; a state saved before fingerprints resumes unchecked; a new run saves its data
    folder as an absolute path, so a resume from elsewhere reads the same folder."""
    digits = data.fingerprint(data.digits())
    args = {"command": "prune", "epochs": 0, "pretrain_epochs": 0}
    save_atomically({"args": args, "data": {**digits, "train": "0" * 64}}, tmp_path / "resume.pt")
    with pytest.raises(SystemExit, match=r"bipkernels prune --resume: the data of digits changed since the run "
                                         r"started \(train differ\)"):
        main(["prune", "--resume", "--out", str(tmp_path)])
    save_atomically({"args": args}, tmp_path / "resume.pt")
    main(["prune", "--resume", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 0
    assert cli.data.absolute_spec("cifar10:here") == f"cifar10:{os.path.abspath('here')}"


def test_a_resume_with_another_thread_count_says_so(tmp_path, capsys, monkeypatch):
    """torch's CPU convolutions and batch norm split their sums by the thread count, so a resume with
    another count than the run started with cannot end bit for bit as the uninterrupted run: resume.pt
    keeps the count (every save of it) and a resume with another names both; with the same count, or a
    state saved before counts, it says nothing."""
    saves = []
    monkeypatch.setattr(cli, "save_atomically", lambda state, path: (saves.append((path.name, state)),
                                                                     save_atomically(state, path)))
    main(["prune", "--epochs", "1", "--pretrain-epochs", "0", "--out", str(tmp_path / "fresh")])
    threads = torch.get_num_threads()
    resume_states = [state for name, state in saves if name == "resume.pt"]
    assert len(resume_states) >= 2 and all(state["threads"] == threads for state in resume_states)
    args = {"command": "prune", "epochs": 0, "pretrain_epochs": 0}
    for saved, named in ((threads + 2, True), (threads, False), (None, False)):
        save_atomically({"args": args, **({} if saved is None else {"threads": saved})}, tmp_path / "resume.pt")
        capsys.readouterr()
        main(["prune", "--resume", "--out", str(tmp_path)])
        notice = (f"bipkernels prune --resume: the run started with {saved} torch threads and goes on with "
                  f"{threads}: its weights can differ in the last bits")
        assert (notice in capsys.readouterr().err) == named, saved


def test_resume_from_python_names_every_option_that_differs(tmp_path, capsys):
    """cli.prune(args) from Python cannot tell typed values from defaults: every difference is named."""
    save_atomically({"args": {"command": "prune", "epochs": 0, "pretrain_epochs": 0, "sparsity": 0.5, "lr": 0.1}},
                    tmp_path / "resume.pt")
    args = cli._parser().parse_args(["prune", "--resume", "--epochs", "3", "--out", str(tmp_path)])
    cli.prune(args)  # sparsity 0.9 and pretrain_epochs 15 are the parser's defaults here, not typed
    assert "ignored --epochs 3, --pretrain-epochs 15, --sparsity 0.9: the interrupted run goes on" in \
        capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"not a pickle", "--resume .*resume.pt cannot be read"),
    (b"", "--resume .*resume.pt cannot be read"),
    (None, ".*resume.pt is not the state of a bipkernels run"),
])
def test_an_unreadable_resume_file_is_named(tmp_path, content, message):
    if content is None:
        torch.save(torch.zeros(3), tmp_path / "resume.pt")  # a file of another program, such as a tensor
    else:
        (tmp_path / "resume.pt").write_bytes(content)
    with pytest.raises(SystemExit, match=f"bipkernels prune: {message}"):
        main(["prune", "--resume", "--out", str(tmp_path)])


def test_a_checkpoint_that_is_not_a_dense_file_is_named(tmp_path):
    garbage, tensor = tmp_path / "garbage.pt", tmp_path / "tensor.pt"
    garbage.write_bytes(b"\x80\x04not a pickle")
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(SystemExit, match=r"bipkernels prune: --checkpoint .*garbage.pt cannot be read"):
        main(["prune", "--checkpoint", str(garbage), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"bipkernels prune: --checkpoint .*tensor.pt is not a dense.pt .* got Tensor"):
        main(["prune", "--checkpoint", str(tensor), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_pruned_checkpoint_is_named_in_one_line(tmp_path):
    """A run's pruned.pt given as --checkpoint (for its dense.pt) stops before any work with one line, not
    load_state_dict's list of the masked layers' unexpected keys."""
    main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path / "run")])
    pruned = tmp_path / "run" / "pruned.pt"
    with pytest.raises(SystemExit) as refused:
        main(["prune", "--checkpoint", str(pruned), "--out", str(tmp_path / "again")])
    assert refused.value.code == (f"bipkernels prune: --checkpoint {pruned} holds a pruned (masked) model (scores "
                                  "and thresholds of 7 layers): --checkpoint takes the model's dense state_dict, "
                                  "such as an earlier run's dense.pt, not its pruned.pt")
    assert not (tmp_path / "again").exists()


def test_an_output_folder_that_takes_no_files_stops_the_setup(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(SystemExit, match=r"bipkernels prune: --out .*: \[Errno 30\] Read-only file system"):
        main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "resume.pt").exists()


def test_missing_torchvision_for_image_folders_is_a_message(tmp_path, monkeypatch):
    def load(spec):
        raise ImportError("image_folder: reading image folders needs torchvision")

    monkeypatch.setattr(data, "load", load)
    with pytest.raises(SystemExit, match=r"bipkernels prune: folder:.* ImportError: image_folder: .* torchvision"):
        main(["prune", "--data", f"folder:{tmp_path}", "--out", str(tmp_path / "out")])


def test_a_stop_request_after_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    """SIGINT while the batch norms recalibrate (after the last BiP step): no KeyboardInterrupt, the
    results are written and resume.pt is gone. So does a SIGTERM during the last step itself (it used to
    exit 130, leaving the evaluation to a --resume)."""

    recalibrate = cli.recalibrate_batchnorm

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return recalibrate(*args, **kwargs)

    monkeypatch.setattr(cli, "recalibrate_batchnorm", interrupted)
    main(["prune", "--pretrain-epochs", "0", "--epochs", "1", "--out", str(tmp_path / "after")])
    assert (tmp_path / "after" / "results.json").exists() and not (tmp_path / "after" / "resume.pt").exists()
    monkeypatch.setattr(cli, "recalibrate_batchnorm", recalibrate)
    steps = cli.steps_per_epoch(len(data.digits()["train"]), 64)
    iterate = bipkernels.BiP._iterate
    sent = []

    def stepped(solver, *args, **kwargs):
        if solver.iteration == steps - 1:  # the last step of the run
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(solver.iteration)
        return iterate(solver, *args, **kwargs)

    monkeypatch.setattr(bipkernels.BiP, "_iterate", stepped)
    main(["prune", "--pretrain-epochs", "0", "--epochs", "1", "--out", str(tmp_path / "during")])
    assert sent and (tmp_path / "during" / "results.json").exists()
    assert not (tmp_path / "during" / "resume.pt").exists()


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
    (["--structure", "2:4"], "(--exclude LAYER leaves a layer dense)"),
    (["--exclude", "nosuch"], "exclude names no module of the model: ['nosuch']"),
    (["--data", "folder:/no/such/folder"], "image_folder: no folder /no/such/folder"),
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


def test_compare_without_pretraining_runs_imp_from_the_model_itself(tmp_path):
    """No pretraining epoch leaves no rewind point: IMP rewinds to the weights it starts from."""
    main(["compare", "--pretrain-epochs", "0", "--methods", "imp", "--sparsities", "0.5", "--finetune-epochs", "1",
          "--epochs", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "compare.json").read_text())["results"][0]["method"] == "imp"


def test_compare_uses_its_batch_size_and_checks_bip_steps_only_for_bip(tmp_path):
    main(["compare", "--methods", "omp", "--mode", "faithful", "--batch-size", "2000", "--sparsities", "0.5",
          "--pretrain-epochs", "1", "--finetune-epochs", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "compare.json").read_text())["results"][0]
    assert result["passes"] == 2  # one batch of all 1078 training images per fine-tuning epoch



def test_a_live_run_locks_its_output_folder(tmp_path):
    """A second run of the folder, or a --resume of it, while one is live stops before touching it."""
    with open(tmp_path / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the live run holds it
        held.write("4242\n")
        held.flush()
        for argv in (["prune", "--pretrain-epochs", "0", "--epochs", "0"], ["prune", "--resume"]):
            save_atomically({"args": {"command": "prune"}}, tmp_path / "resume.pt")
            with pytest.raises(SystemExit, match=r"bipkernels prune: a live run \(pid 4242\) is writing"):
                main([*argv, "--out", str(tmp_path)])
    (tmp_path / "resume.pt").unlink()
    main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)])  # released: it runs


def test_a_run_removes_its_lock_file_when_it_ends(tmp_path):
    main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)])
    assert not (tmp_path / ".lock").exists()


def test_a_lock_file_removed_before_the_flock_is_not_a_lock(tmp_path, monkeypatch):
    """A run that opens OUT/.lock just before the live run ends (and removes it) locks that file just after:
    a lock on a removed file, which a third run, making OUT/.lock anew and locking that, never sees. The
    second run must take the lock on the file that is there now, which the third holds."""
    (tmp_path / ".lock").write_text("4242\n")  # the run about to end
    flock, third = fcntl.flock, []

    def ended_and_third_started(file, operation):
        if not third:
            (tmp_path / ".lock").unlink()
            third.append(open(tmp_path / ".lock", "a+"))
            flock(third[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            third[0].write("4243\n")
            third[0].flush()
        flock(file, operation)

    monkeypatch.setattr(fcntl, "flock", ended_and_third_started)
    with pytest.raises(SystemExit, match=r"bipkernels prune: a live run \(pid 4243\) is writing"):
        main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)])
    third[0].close()
    assert not (tmp_path / "resume.pt").exists()


def test_a_new_run_removes_the_results_of_a_finished_one_and_names_them(tmp_path, capsys, monkeypatch):
    for name in ("pruned.pt", "results.json"):
        (tmp_path / name).write_text("the earlier run's")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train_weights", killed)
    assert main(["prune", "--pretrain-epochs", "1", "--out", str(tmp_path)]) == 130
    assert "removing the results of the run finished in" in capsys.readouterr().err
    assert not (tmp_path / "pruned.pt").exists() and not (tmp_path / "results.json").exists()


def test_a_failed_write_exits_with_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_text_atomically", full)
    with pytest.raises(SystemExit, match=r"bipkernels prune: OSError: \[Errno 28\] No space left on device; .*"
                                         r"resume.pt holds the last state saved"):
        main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)])


def test_a_refused_run_releases_the_lock_at_once(tmp_path):
    """The refusal's traceback stays alive here (``refused``): the lock must not go with it only."""
    save_atomically({"args": {"command": "prune"}}, tmp_path / "resume.pt")
    argv = ["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="holds an interrupted run") as refused:
        main(argv)
    (tmp_path / "resume.pt").unlink()
    main(argv)
    assert refused.value.code and (tmp_path / "results.json").exists()


def test_n_m_runs_with_the_first_convolution_excluded(tmp_path):
    """2:4 needs input channels that 4 divides, which the digits' one channel is not: --exclude leaves the
    stem dense, in prune and in every method of compare."""
    main(["prune", "--pretrain-epochs", "1", "--epochs", "1", "--structure", "2:4", "--exclude", "stem.0",
          "--out", str(tmp_path / "prune")])
    result = json.loads((tmp_path / "prune" / "results.json").read_text())
    assert result["exclude"] == ["stem.0"] and "stem.0" not in result["layers"]
    assert {layer["sparsity"] for layer in result["layers"].values()} == {0.5}
    assert result["target_sparsity"] == 0.5  # --sparsity left at its default takes 2:4's (it recorded 0.9)
    main(["compare", "--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--sparsities", "0.5",
          "--methods", "bip", "omp", "imp", "random", "--structure", "2:4", "--exclude", "stem.0",
          "--out", str(tmp_path / "compare")])
    for result in json.loads((tmp_path / "compare" / "compare.json").read_text())["results"]:
        assert "stem.0" not in result["layers"] and set(result["layers"].values()) == {0.5}, result["method"]


def test_prune_with_an_nm_structure_refuses_another_sparsity_typed(tmp_path):
    """2:4 keeps half of every layer whatever the sparsity asked: --sparsity 0.9 ran at 0.5 without a word
    and results.json recorded 0.9 as its target. Refused before anything is written, as compare refuses
    --sparsities; the sparsity of 2:4 typed runs."""
    arguments = ["prune", "--pretrain-epochs", "0", "--epochs", "0", "--structure", "2:4", "--exclude", "stem.0"]
    with pytest.raises(SystemExit) as stopped:
        main(arguments + ["--sparsity", "0.9", "--out", str(tmp_path / "refused")])
    assert str(stopped.value) == ("bipkernels prune: --structure 2:4 keeps 2 of every 4 weights (sparsity 0.5) "
                                  "whatever the sparsity asked: --sparsity 0.9 would run at 0.5 and be shown as "
                                  "asked; give --sparsity 0.5")
    assert not (tmp_path / "refused").exists()
    main(arguments + ["--sparsity", "0.5", "--out", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["target_sparsity"] == 0.5


def test_an_exclude_of_every_layer_stops_the_setup(tmp_path):
    """BiP converts a model that --exclude left without a masked layer whole: the run must stop instead."""
    with pytest.raises(SystemExit, match=r"ValueError: --exclude stem layer1 layer2 head leaves no layer to prune"):
        main(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--exclude", "stem", "layer1", "layer2", "head",
              "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "resume.pt").exists()


def test_a_resumed_run_saved_before_an_option_existed_runs_with_its_default(tmp_path, capsys):
    """A resume.pt from a version without --exclude: an --exclude typed with --resume applied unnamed and
    went unsaved, so a second --resume of the same run failed (its masked layers differ)."""
    args = cli._parser().parse_args(["prune", "--pretrain-epochs", "0", "--epochs", "0", "--out", str(tmp_path)])
    save_atomically({"args": {key: value for key, value in vars(args).items() if key not in ("resume", "exclude")}},
                    tmp_path / "resume.pt")
    main(["prune", "--resume", "--exclude", "stem.0", "--out", str(tmp_path)])
    assert "ignored --exclude ['stem.0']" in capsys.readouterr().err
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["exclude"] == [] and "stem.0" in result["layers"]


def test_the_resume_message_of_a_stop_at_an_epochs_last_step_names_the_next_epoch():
    """A stop request at an epoch's last step saves (epoch, steps per epoch): 'step 18 of 17' was printed."""
    assert cli._position_text((0, 17), 5, 17) == "at epoch 2 of 5, step 1 of 17"
    assert cli._position_text((4, 17), 5, 17) == "after the last epoch (saving the result)"
    assert cli._position_text((1, 3), 5, 17) == "at epoch 2 of 5, step 4 of 17"


def test_the_rewind_point_is_the_model_after_the_first_pretraining_epoch(tmp_path):
    """dense.pt's "rewind" (the early-training weights IMP rewinds to) holds the model after pretraining
    epoch 1 of the run: the same pretraining (seed, model, lr 0.1, its schedule over all the epochs)
    stopped there by its on_epoch."""
    main(["prune", "--pretrain-epochs", "2", "--epochs", "0", "--out", str(tmp_path)])
    splits = data.load("digits")
    torch.manual_seed(0)
    model = models.build("small-resnet", *reversed(data.describe(splits)))
    train_weights(model, splits["train"], 2, lr=0.1, batch_size=64, seed=0, label="pretrain",
                  on_epoch=lambda state: True)
    rewind = torch.load(tmp_path / "dense.pt")["rewind"]
    assert rewind.keys() == model.state_dict().keys()
    assert all(torch.equal(rewind[key], value) for key, value in model.state_dict().items())


def test_compare_with_an_nm_structure_takes_the_sparsity_its_refusal_names(tmp_path):
    """1 - N/M has more digits than {:g} shows: for 1:3 the refusal said "give --sparsities 0.666667", a value
    that it refused again, so no sparsity that one could type from it got past the check. (The test model's
    32 channels take no M = 3: the run given the named value stops at the model, past the check.)"""
    arguments = ["compare", "--structure", "1:3", "--pretrain-epochs", "0", "--methods", "omp"]
    with pytest.raises(SystemExit) as stopped:
        main(arguments + ["--sparsities", "0.5", "--out", str(tmp_path / "refused")])
    named = str(stopped.value).rsplit("give --sparsities ", 1)[1]
    assert float(named) == 1 - 1 / 3
    with pytest.raises(SystemExit) as stopped:
        main(arguments + ["--sparsities", named, "--out", str(tmp_path / "run")])
    assert "whatever the sparsity asked" not in str(stopped.value)
    assert "not a multiple of M = 3" in str(stopped.value)


def test_compare_table_tells_apart_sparsities_with_seven_digits(tmp_path, capsys, monkeypatch):
    """{:g} keeps six digits: 0.9999991 and 0.9999999 were the columns "99.9999% acc" and "100% acc", one of them
    a sparsity no run had (and 0.12345671, 0.12345679 were one label twice)."""
    monkeypatch.setattr(cli, "prune_with", _fake_prune)
    main(["compare", "--pretrain-epochs", "0", "--methods", "omp", "--sparsities", "0.9999991", "0.9999999",
          "0.12345671", "0.12345679", "0.29", "--out", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.startswith("method"))
    assert header.split()[1::3] == ["99.99991%", "99.99999%", "12.345671%", "12.345679%", "29%"]
