"""The `bipkernels` command.

    bipkernels info       the build facts: versions, CUDA archs, which backends run each op
    bipkernels prune      the main job: BiP on the built-in digits data (pretrains a small ResNet first);
                          --data cifar10:FOLDER or folder:FOLDER and --model resnet20 / resnet18 / ... for others
    bipkernels compare    BiP, IMP, OMP, HYDRA and random pruning over several sparsities, with plots
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import math
import os
import pickle
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from . import data, models, nn as masked_nn
from .info import build_info, format_info
from .structures import parse_structure
from .solvers import BiP, METHODS, prune as prune_with
from .solvers.bip import steps_per_epoch
from .solvers.training import (check_settings, evaluate, fetch, forked_random_state, recalibrate_batchnorm,
                                remove_temporaries, save_atomically, train_weights, write_text_atomically)

_BIP_OPTIONS = ("mode", "implicit", "inv_gamma", "lr", "score_lr", "score_momentum")  # the options BiP takes
_RESULTS = {"prune": ("pruned.pt", "results.json"), "compare": ("compare.json", "accuracy.png", "time.png")}


class OutputLock:
    """An exclusive lock on OUT/.lock (flock) held for the whole command, so that a second run of the same
    folder, or a --resume of it, while one is live stops at once instead of writing over its files and
    deleting the temporary file of a write in progress. The lock goes with the process (a killed run
    holds none and leaves the file); the file holds the owner's pid for the message and is removed when
    the command ends."""

    def __init__(self, args):
        self.args, self.file, self.path = args, None, None

    def take(self) -> None:
        """Lock OUT if it is a folder and not yet locked here; exit naming the live run if another holds it."""
        out = Path(self.args.out)
        if self.file is not None or not out.is_dir():
            return
        path = out / ".lock"
        while True:
            try:
                file = open(path, "a+")
            except OSError as error:  # a read-only folder: the run could not write anything there
                sys.exit(f"bipkernels {self.args.command}: --out {out}: {error}")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                owner = file.read().strip() or "unknown"
                file.close()
                sys.exit(f"bipkernels {self.args.command}: a live run (pid {owner}) is writing {out}: let it "
                         "finish, stop it (Ctrl-C saves its state), or choose another --out")
            # A run that ended between the open and the flock removed the file locked here: a lock on it
            # excludes no run that opens OUT/.lock afresh, so lock the file that is there now.
            if _still_at(path, file):
                break
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file, self.path = file, path

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.file is not None:
            # Removed while still locked: a run that opened it before and locks it after finds it gone (take).
            # Only if it is the file locked here: OUT may have been deleted under this run and made anew by
            # another, whose lock file that is.
            try:
                if _still_at(self.path, self.file):
                    self.path.unlink()
            finally:
                self.file.close()  # releases the lock
                self.file = None


def _still_at(path: Path, file) -> bool:
    """Whether ``path`` still names the open ``file`` (it was not removed, or removed and made anew)."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag that the training loop checks after every step. A second one
    stops at once (KeyboardInterrupt; the atomic writes leave no half-written file)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, _frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = number
        print(f"\n{signal.Signals(number).name}: stopping once the state is saved (a run past its last step "
              "finishes first); again to stop at once", file=sys.stderr)

    def __exit__(self, *_):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _load(what: str, path: Path, command: str):
    """torch.load of ``path`` (a file this command or an earlier run wrote), or exit naming ``what`` and
    the path when it cannot be read (garbage, a truncated file, another program's pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, AttributeError, ImportError) as error:
        sys.exit(f"bipkernels {command}: {what} {path} cannot be read ({type(error).__name__}: {error})")


def _position_text(position: tuple[int, int], epochs: int, per_epoch: int) -> str:
    """Where a resumed BiP run goes on, for people: ``position`` is (epochs done, steps done in the next)."""
    epoch, step = position
    if step >= per_epoch:  # a stop request at an epoch's last step saves (epoch, per_epoch): the next one's start
        epoch, step = epoch + 1, 0
    if epoch >= epochs:
        return "after the last epoch (saving the result)"
    return f"at epoch {epoch + 1} of {epochs}, step {step + 1} of {per_epoch}"


def _resumable(args, typed: set[str] | None, lock: OutputLock) -> tuple[argparse.Namespace, dict, dict]:
    """_resume_or_start, releasing ``lock`` if it stops (a refusal, a failed setup): the lock goes at once,
    not with a traceback that something may keep."""
    try:
        return _resume_or_start(args, typed, lock)
    except BaseException:
        lock.__exit__()
        raise


def _resume_or_start(args, typed: set[str] | None, lock: OutputLock) -> tuple[argparse.Namespace, dict, dict]:
    """The arguments, the state to start from and the data splits, with ``lock`` taken on OUT before
    anything there is read or written. With --resume: the arguments saved in OUT/resume.pt (--out as
    given) and its state; exits naming the file if there is none, it cannot be
    read or it is another command's; the options ``typed`` on the command line (argparse dests; None from
    Python, where typed and default values look alike: every option) that differ from the saved ones are
    named as ignored, and so is a torch thread count other than the saved one. Otherwise the arguments as
    given (--data's folder and --checkpoint made absolute), saved there as the state {"args": ...} (with the
    data's fingerprint and the thread count) once _setup has checked them; exits if OUT holds an interrupted
    run, which that
    would overwrite, and deletes the results of a finished run there (named), which the new run replaces.
    Either way it first deletes the temporary files that a killed write left in OUT."""
    out = Path(args.out)
    resume_path = out / "resume.pt"
    state = {}
    lock.take()
    if args.resume:
        if not resume_path.exists():
            sys.exit(f"bipkernels {args.command}: --resume but there is no {resume_path}")
        state = _load("--resume", resume_path, args.command)
        if not (isinstance(state, dict) and isinstance(state.get("args"), dict)):
            sys.exit(f"bipkernels {args.command}: {resume_path} is not the state of a bipkernels run (no saved "
                     "arguments): delete it, or choose another --out, to start afresh")
        saved_command = state["args"].get("command", "prune")
        if saved_command != args.command:
            sys.exit(f"bipkernels {args.command}: {resume_path} is the state of a `bipkernels {saved_command}` run")
        # An option newer than the saved run (e.g. --exclude) takes its default, which is how that run ran:
        # else a value typed now would apply unnamed, and go unsaved (a later --resume ran without it).
        defaults = vars(_parser().parse_args([args.command]))
        state["args"] = {**{key: value for key, value in defaults.items() if key not in ("out", "resume")},
                         **state["args"]}
        ignored = [f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()
                   if (typed is None or key in typed) and key in state["args"] and key != "out"
                   and _as_saved(key, value) != state["args"][key]]
        if ignored:
            print(f"bipkernels {args.command} --resume: ignored {', '.join(ignored)}: the interrupted run goes on with "
                  f"its own arguments", file=sys.stderr)
        args = argparse.Namespace(**{**vars(args), **state["args"], "resume": True, "out": args.out})
    elif resume_path.exists():
        sys.exit(f"bipkernels {args.command}: {resume_path} holds an interrupted run: continue it with --resume, "
                 "or delete it (or choose another --out) to start afresh")
    else:
        args.data, args.checkpoint = _as_saved("data", args.data), _as_saved("checkpoint", args.checkpoint)
        if args.command == "prune":
            args.sparsity = _prune_sparsity(args, typed)
    splits = _setup(args)
    digests = data.fingerprint(splits)
    if state.get("data") not in (None, digests):  # None: a state saved before fingerprints, not checked
        changed = [name for name, digest in digests.items() if state["data"].get(name) != digest]
        sys.exit(f"bipkernels {args.command} --resume: the data of {args.data} changed since the run started "
                 f"({', '.join(changed)} differ): the run would go on with other splits; start afresh (another "
                 "--out, or delete its resume.pt)")
    threads = torch.get_num_threads()
    if state.get("threads") not in (None, threads):  # None: a state saved before thread counts, not checked
        # torch's CPU convolutions, matmuls and batch norm split their sums by the thread count (bipkernels'
        # own kernels do not): the resumed weights would differ in their last bits from an uninterrupted run.
        print(f"bipkernels {args.command} --resume: the run started with {state['threads']} torch threads and "
              f"goes on with {threads}: its weights can differ in the last bits from an uninterrupted run's "
              f"(OMP_NUM_THREADS={state['threads']} repeats that one bit for bit)", file=sys.stderr)
    # compare loads the checkpoint again on every resume: another file there would give the remaining runs
    # another dense model (None: no --checkpoint, or a state saved before its digest was kept: not checked).
    checkpoint_digest = _file_digest(Path(args.checkpoint)) if args.checkpoint else None
    if state.get("checkpoint", checkpoint_digest) != checkpoint_digest:
        sys.exit(f"bipkernels {args.command} --resume: --checkpoint {args.checkpoint} changed since the run started: "
                 "the run would go on from another dense model; start afresh (another --out, or delete its "
                 "resume.pt)")
    lock.take()  # the folder exists now
    for leftover in remove_temporaries(out):
        print(f"removed {leftover}, the part of a write that a killed run left", file=sys.stderr)
    if not state:
        finished = [out / name for name in _RESULTS[args.command] if (out / name).exists()]
        if finished:  # else a run killed before its end would leave them beside its own files
            print(f"bipkernels {args.command}: removing the results of the run finished in {out} "
                  f"({', '.join(path.name for path in finished)}): this run writes its own", file=sys.stderr)
            for path in finished:
                path.unlink()
        state = {"args": {key: value for key, value in vars(args).items() if key != "resume"},
                 "data": digests, "threads": threads, "checkpoint": checkpoint_digest}
        save_atomically(state, resume_path)
    return args, state, splits


def _as_saved(key: str, value):
    """An argument as a run saves it: --data's folder and --checkpoint absolute (~ expanded), so that a resume
    from another folder reads the same files, not others of the same name, and a resume's typed relative path
    to the same file is not named as ignored; any other value (or one that is no data spec) as it is."""
    if key == "checkpoint" and value:
        return str(Path(value).expanduser().resolve())
    if key == "data":
        try:
            return data.absolute_spec(value)
        except (TypeError, ValueError):  # a bad spec typed with --resume: named as ignored, as typed
            return value
    return value


def _file_digest(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``, read in blocks (a checkpoint may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _setup(args) -> dict:
    """The data splits, once the output folder, the data, the model, a --checkpoint and the structure are
    known to go together: a mismatch stops the command with its error before any work and before any file
    is written (a resume.pt left by it would block the corrected command). The model is built, loaded,
    converted and run on two training images in training mode (it must return logits) as a throwaway,
    with the RNG state restored after."""
    if args.command == "compare":
        _check_nm_sparsities(args, "sparsities", args.sparsities)
    checkpoint = _checkpoint(args) if args.checkpoint else None
    try:
        splits = data.load(args.data)
        with forked_random_state(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convert's list of dense layers comes later, once
            model = _model(args, splits)
            if checkpoint is not None:
                model.load_state_dict(checkpoint["model"])
            masked_nn.convert(model, 0.0, args.structure, args.scope, exclude=args.exclude)
            if args.exclude and not masked_nn.masked_layers(model):  # BiP would convert the model whole
                raise ValueError(f"--exclude {' '.join(args.exclude)} leaves no layer to prune")
            # As many images as a batch holds, up to two: a batch of one fails here as it would in training
            # (batch norm over a 1×1 map).
            trial = min(2, args.batch_size, len(splits["train"]))
            inputs, _ = fetch(splits["train"], torch.arange(trial), "cpu")
            logits = model.train()(inputs)
    except (ValueError, TypeError, RuntimeError, OSError, KeyError, AssertionError, ImportError, EOFError,
            pickle.UnpicklingError) as error:
        hint = ""
        if isinstance(error, ValueError) and "layer '" in str(error) and parse_structure(args.structure).kind == "nm":
            hint = " (--exclude LAYER leaves a layer dense)"
        sys.exit(f"bipkernels {args.command}: {args.data} with --model {args.model}: {type(error).__name__}: {error}"
                 f"{hint}")
    classes = data.describe(splits)[1]
    if not (isinstance(logits, torch.Tensor) and logits.shape == (len(inputs), classes)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        sys.exit(f"bipkernels {args.command}: --model {args.model} returns {got} in training mode, not logits of "
                 f"shape ({len(inputs)}, {classes})")
    runs_bip = args.command == "prune" or "bip" in args.methods
    if runs_bip and args.epochs and steps_per_epoch(len(splits["train"]), args.batch_size, args.mode) == 0:
        sys.exit(f"bipkernels {args.command}: {len(splits['train'])} training images in batches of --batch-size "
                 f"{args.batch_size} leave no BiP step (--mode {args.mode} takes {1 if args.mode == 'fused' else 2} "
                 "a step)")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):  # the folder takes files (not a read-only mount)
            pass
    except OSError as error:
        sys.exit(f"bipkernels {args.command}: --out {args.out}: {error}")
    return splits


def _check_nm_sparsities(args, option: str, sparsities: list[float]) -> None:
    """Exit unless every value of ``option`` (--sparsities, --sparsity) is the one an N:M --structure gives
    (every masked layer is N:M): N of every M weights stay whatever the sparsity asked, so the other values
    would run at that sparsity and the results (the table and plots, results.json) would show them as asked.
    A --structure that does not parse is left to _setup's error."""
    try:
        structure = parse_structure(args.structure)
    except ValueError:
        return
    if structure.kind != "nm":
        return
    fixed = 1 - structure.a / structure.b
    other = [sparsity for sparsity in sparsities if not math.isclose(sparsity, fixed)]
    if other:
        sys.exit(f"bipkernels {args.command}: --structure {args.structure} keeps {structure.a} of every "
                 f"{structure.b} weights (sparsity {fixed:g}) whatever the sparsity asked: --{option} "
                 f"{' '.join(map(str, other))} would run at {fixed:g} and be shown as asked; give --{option} "
                 f"{fixed!r}")  # every digit: 1:3's 0.666667 is not 1 - 1/3, and would be refused again


def _prune_sparsity(args, typed: set[str] | None) -> float:
    """--sparsity of a fresh prune run: as typed (checked by _check_nm_sparsities), but one left at its
    default 0.9 takes an N:M --structure's own sparsity 1 − N/M, the one its layers keep (results.json
    recorded 0.9 as the target of a 0.5 run). ``typed`` None (a call from Python): every value counts as typed."""
    if typed is None or "sparsity" in typed:
        _check_nm_sparsities(args, "sparsity", [args.sparsity])
        return args.sparsity
    try:
        structure = parse_structure(args.structure)
    except ValueError:  # left to _setup's error
        return args.sparsity
    return 1 - structure.a / structure.b if structure.kind == "nm" else args.sparsity


def _checkpoint(args) -> dict:
    """The --checkpoint file's {"model": state_dict, "rewind": ...} (a dense.pt), or exit naming it. A
    pruned.pt has the same form, with the masked layers' scores and thresholds in its state_dict: it is
    named as such, not left to load_state_dict's list of unexpected keys."""
    checkpoint = _load("--checkpoint", Path(args.checkpoint), args.command)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
        sys.exit(f"bipkernels {args.command}: --checkpoint {args.checkpoint} is not a dense.pt (a dict with the "
                 f"model's state_dict under 'model'), got "
                 f"{sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__}")
    state = checkpoint["model"]
    masked = [key for key in state if isinstance(key, str) and (key == "scores" or key.endswith(".scores"))
              and key.removesuffix("scores") + "threshold" in state]
    if masked:
        sys.exit(f"bipkernels {args.command}: --checkpoint {args.checkpoint} holds a pruned (masked) model (scores "
                 f"and thresholds of {len(masked)} layers): --checkpoint takes the model's dense state_dict, such as "
                 "an earlier run's dense.pt, not its pruned.pt")
    return checkpoint


def _interrupted(args) -> None:
    """Exit 130 after a stop request, once the state is saved, saying how to continue."""
    print(f"\ninterrupted: state saved to {Path(args.out) / 'resume.pt'}; continue with "
          f"`bipkernels {args.command} --resume --out {args.out}`", file=sys.stderr)
    sys.exit(130)


def _pretrained(args, splits, state: dict, stop: StopRequest):
    """The dense model and a rewind point for IMP (its weights after the first epoch): from --checkpoint,
    else pretrained here and saved as OUT/dense.pt.

    Pretraining is resumable per epoch: it continues from state["pretraining"] if there is one, and after
    every epoch stores its state there and saves ``state`` atomically to OUT/resume.pt. After a stop
    request it exits 130 at the end of the epoch, once that is saved. A resumed pretraining ends with
    exactly the model of one never stopped (batches and RNG state are restored per epoch)."""
    torch.manual_seed(args.seed)
    model = _model(args, splits)
    if args.checkpoint:
        checkpoint = _checkpoint(args)
        model.load_state_dict(checkpoint["model"])
        return model, checkpoint.get("rewind", checkpoint["model"])
    out = Path(args.out)
    pretraining = state.get("pretraining", {"training": None, "rewind": {}})
    rewind = pretraining["rewind"]
    if args.resume:
        done = pretraining["training"]["epoch"] if pretraining["training"] else 0
        print(f"resuming pretraining after epoch {done} of {args.pretrain_epochs}", file=sys.stderr)

    def save(training) -> bool:
        if training["epoch"] == 1:
            rewind.update({key: value.clone() for key, value in training["model"].items()})
        state["pretraining"] = {"training": training, "rewind": rewind}
        save_atomically(state, out / "resume.pt")
        return stop.signal is not None

    train_weights(model, splits["train"], args.pretrain_epochs, lr=0.1, batch_size=args.batch_size, seed=args.seed,
                  label="pretrain", start=pretraining["training"], on_epoch=save)
    if stop.signal is not None:
        _interrupted(args)
    save_atomically({"model": model.state_dict(), "rewind": rewind}, out / "dense.pt")
    return model, rewind


def _model(args, splits):
    return models.build(args.model, *reversed(data.describe(splits)))


def _bip_options(args) -> dict:
    return {key: vars(args)[key] for key in _BIP_OPTIONS}


def prune(args, typed: set[str] | None = None) -> dict:
    """The main job: BiP to --sparsity, resumable; prints the per-layer table and writes the results.

    OUT/resume.pt, written atomically, holds the arguments from the start, then the pretraining state after
    every pretraining epoch, then the BiP state: once pretraining is done, every --save-every BiP steps, at
    the end of every epoch and on SIGINT / SIGTERM (during pretraining: at the end of the epoch). It is
    deleted once pruned.pt and results.json are written. ``--resume`` continues bit-exactly from the last
    state saved (from the start if none was), with the saved arguments. A run killed outright (SIGKILL,
    power loss) thus loses at most the work since the last save, and the temporary files its last write
    left are deleted on resume. ``typed``: the options given on the command line (see _resumable; None
    when called from Python: every option that differs from the saved run's is named as ignored).
    """
    lock = OutputLock(args)
    args, state, splits = _resumable(args, typed, lock)
    out = Path(args.out)
    resume_path = out / "resume.pt"
    with lock, StopRequest() as stop:
        if "solver" in state:
            model, dense_accuracy = _model(args, splits), state["dense_accuracy"]
        else:
            model, _ = _pretrained(args, splits, state, stop)
            dense_accuracy = evaluate(model, splits["test"])
        per_epoch = steps_per_epoch(len(splits["train"]), args.batch_size, args.mode)
        with warnings.catch_warnings():
            if "solver" in state:  # the projection of a model about to be replaced by the saved state
                warnings.filterwarnings("ignore", message="bipkernels.convert: the global projection keeps no block")
            if args.exclude:  # BiP converts a model with no masked layer, all of it
                masked_nn.convert(model, 0.0, args.structure, args.scope, exclude=args.exclude)
            solver = BiP(model, args.sparsity, args.structure, args.scope,
                         total_steps=max(args.epochs * per_epoch, 1), **_bip_options(args))

        def checkpoint(position):
            save_atomically({"solver": solver.state_dict(), "position": position, "args": state["args"],
                             **{key: state.get(key) for key in ("data", "threads", "checkpoint")},
                             "dense_accuracy": dense_accuracy}, resume_path)

        start = tuple(state.get("position", (0, 0)))
        if "solver" in state:
            try:
                solver.load_state_dict(state["solver"])
            except ValueError as error:  # e.g. a folder: data set that gained images since (other total steps)
                sys.exit(f"bipkernels prune --resume: {error}")
            print(f"resuming {_position_text(start, args.epochs, per_epoch)}", file=sys.stderr)
        else:
            checkpoint(start)  # from here on a resumed run skips pretraining

        def on_step(epoch, step):
            # A stop request that came during the last step lets the run finish, as one after it does:
            # what is left is evaluation and the files (stopping would leave them to a --resume).
            last = epoch == args.epochs - 1 and step == per_epoch
            if stop.signal is not None and not last:
                checkpoint((epoch, step))
                return True
            if step == per_epoch:
                checkpoint((epoch + 1, 0))
            elif args.save_every and solver.iteration % args.save_every == 0:
                checkpoint((epoch, step))
            return False

        reached = solver.fit(splits["train"], args.epochs, args.batch_size, args.seed, start=start, on_step=on_step)
        if reached[0] < args.epochs:
            _interrupted(args)
        # Still under the stop request: a SIGINT from here on lets the last seconds of work finish.
        return _finish_prune(args, model, solver, splits, dense_accuracy)


def _finish_prune(args, model, solver: BiP, splits: dict, dense_accuracy: float) -> dict:
    """After the last BiP step: batch norms recalibrated, the results evaluated and written (pruned.pt,
    results.json), resume.pt deleted, the per-layer table printed; returns the results."""
    out = Path(args.out)
    recalibrate_batchnorm(model, splits["train"])
    result = {
        "method": "bip", **_bip_options(args), "structure": args.structure, "scope": args.scope,
        "exclude": args.exclude, "target_sparsity": args.sparsity,
        "sparsity": masked_nn.sparsity(model),
        "dense_test_accuracy": dense_accuracy,
        "val_accuracy": evaluate(model, splits["val"]),
        "test_accuracy": evaluate(model, splits["test"]),
        "epochs": args.epochs,
        "passes": solver.passes,
        "layers": {name: {"shape": list(layer.weight.shape), "sparsity": 1.0 - float(layer.mask().float().mean())}
                   for name, layer in masked_nn.masked_layers(model)},
    }
    save_atomically({"model": model.state_dict(), "result": result}, out / "pruned.pt")
    write_text_atomically(json.dumps(result, indent=2), out / "results.json")
    (out / "resume.pt").unlink(missing_ok=True)
    print(f"\n{'layer':<24} {'shape':<18} {'sparsity':>8}")
    for name, layer in result["layers"].items():
        print(f"{name:<24} {tuple(layer['shape'])!s:<18} {layer['sparsity']:>8.3f}")
    print(f"\nBiP ({args.mode}, implicit={args.implicit}, 1/γ={args.inv_gamma:g}) to {result['sparsity']:.4f} "
          f"sparsity: test accuracy {result['test_accuracy']:.4f} (dense {dense_accuracy:.4f}), "
          f"{solver.passes} passes\n"
          f"wrote {out / 'pruned.pt'} and {out / 'results.json'}")
    return result


def compare(args, typed: set[str] | None = None) -> list[dict]:
    """Every method at every sparsity from the same pretrained model: a table, a JSON file and plots.

    Resumable per (sparsity, method) run: OUT/resume.pt, written atomically, holds the arguments, then the
    pretraining state after every pretraining epoch, then every finished result (each run seeds its own
    generators: bipkernels.prune). ``--resume`` continues pretraining from its last saved epoch and skips
    the finished runs; a run cut short starts again, so the final compare.json has the results of a run
    never stopped (wall times aside). SIGINT / SIGTERM stop at the end of the current pretraining epoch or
    run, with the state saved.
    """
    lock = OutputLock(args)
    args, state, splits = _resumable(args, typed, lock)
    out = Path(args.out)
    with lock, StopRequest() as stop:
        dense, rewind = _pretrained(args, splits, state, stop)
        dense_accuracy = evaluate(dense, splits["test"])
        runs = [(sparsity, method) for sparsity in args.sparsities for method in args.methods]
        results = state.setdefault("results", [])
        if results:
            print(f"resuming after {len(results)} of {len(runs)} (sparsity, method) runs", file=sys.stderr)
        for sparsity, method in runs[len(results):]:
            if stop.signal is not None:
                _interrupted(args)
            options = _bip_options(args) if method == "bip" else {}
            _, result = prune_with(copy.deepcopy(dense), splits["train"], method, sparsity, structure=args.structure,
                                   scope=args.scope, val_data=splits["val"], test_data=splits["test"],
                                   epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                   batch_size=args.batch_size, seed=args.seed,
                                   rewind_state=rewind if method == "imp" else None, exclude=args.exclude, **options)
            results.append(result)
            # compare.json first: a run killed between the two writes redoes this result rather than lose it.
            write_text_atomically(json.dumps({"dense_test_accuracy": dense_accuracy, "results": results}, indent=2),
                                  out / "compare.json")
            save_atomically(state, out / "resume.pt")
        # Still under the stop request: a SIGINT from here on lets the table and plots finish.
        # Every digit the sparsity has: rounded to whole percents, 0.98 and 0.985 were both "98%", 0.999 "100%".
        labels = [f"{100 * sparsity:.15g}% acc" for sparsity in args.sparsities]  # .15g: 0.29 is not 28.99...
        widths = [max(10, len(label) + 1) for label in labels]
        header = f"{'method':<8}" + "".join(f"{label:>{width}}{'time':>7}" for label, width in zip(labels, widths))
        print(f"\ntest accuracy and wall time (s) on {args.data}; dense {dense_accuracy:.4f}\n{header}")
        for method in args.methods:
            row = [r for r in results if r["method"] == method]
            print(f"{method:<8}" + "".join(f"{r['test_accuracy']:>{width}.4f}{r['wall_time_s']:>7.1f}"
                                           for r, width in zip(row, widths)))
        _plot(results, args, out)
        (out / "resume.pt").unlink()
    return results


def _plot(results, args, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return
    plots = (("test_accuracy", "test accuracy", "accuracy.png"), ("wall_time_s", "wall time (s)", "time.png"))
    for key, label, name in plots:
        figure, axes = pyplot.subplots(figsize=(6, 4))
        for method in args.methods:
            row = [r for r in results if r["method"] == method]
            axes.plot([100 * r["target_sparsity"] for r in row], [r[key] for r in row], marker="o", label=method)
        axes.set_xlabel("sparsity (%)")
        axes.set_ylabel(label)
        axes.set_title(f"{args.data}, {args.model}, {args.structure}")
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=120)
        pyplot.close(figure)
    print(f"wrote {out / 'accuracy.png'}, {out / 'time.png'} and {out / 'compare.json'}")


def _setting(name: str, parse=float):
    """An argparse type: the text read by ``parse`` (int or float), then held to the rule of the solvers'
    setting ``name`` (solvers.training.SETTINGS), so that a bad value stops the command before any work,
    with a message that names the option and the value."""
    def convert(text: str):
        value = parse(text)  # a ValueError here: argparse says "invalid float value: 'text'"
        try:
            check_settings("", **{name: value})
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    convert.__name__ = parse.__name__
    return convert


def _checked(check):
    """An argparse type that passes the text through ``check`` (which raises ValueError for a bad one)."""
    def convert(text: str) -> str:
        try:
            check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    convert.__name__ = check.__name__
    return convert


def _existing_file(path: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"checkpoint: no file {path!r}")


def _add_common(parser, out: str) -> None:
    parser.add_argument("--data", type=_checked(data.parse_spec), default="digits",
                        help="digits (built in), cifar10:FOLDER or folder:FOLDER")
    parser.add_argument("--model", type=_checked(models.check_name), default="small-resnet",
                        help="small-resnet, resnet20 or a torchvision model name")
    parser.add_argument("--structure", type=_setting("structure", str), default="unstructured",
                        help="unstructured, filter, channel, 2:4, tile4x4")
    parser.add_argument("--scope", default="global", choices=["global", "layer"],
                        help="global: the sparsity over all layers together; layer: in every layer")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="LAYER",
                        help="layers (module names, e.g. stem.0) to leave dense, each with everything inside it: "
                             "for N:M, the first convolution of an image model, whose 1 or 3 channels M does not "
                             "divide")
    parser.add_argument("--mode", default="fused", choices=["fused", "faithful"], help="BiP mode")
    parser.add_argument("--implicit", default="paper", choices=["paper", "released"], help="BiP implicit term")
    parser.add_argument("--inv-gamma", type=_setting("inv_gamma"), default=1e-4, help="1/γ, the implicit term's scale")
    parser.add_argument("--lr", type=_setting("lr"), default=0.1, help="BiP lower-level (weight) learning rate")
    parser.add_argument("--score-lr", type=_setting("score_lr"), default=0.01,
                        help="BiP upper-level (score) learning rate")
    parser.add_argument("--score-momentum", type=_setting("score_momentum"), default=0.9,
                        help="BiP score SGD momentum: 0.9 as released, 0 the paper's plain SGD step")
    parser.add_argument("--epochs", type=_setting("epochs", int), default=20,
                        help="epochs of BiP, and of HYDRA's scores")
    parser.add_argument("--pretrain-epochs", type=_setting("pretrain_epochs", int), default=15,
                        help="epochs of dense training before pruning; none with --checkpoint")
    parser.add_argument("--checkpoint", type=_checked(_existing_file),
                        help="a dense.pt written by an earlier run: skip pretraining")
    parser.add_argument("--batch-size", type=_setting("batch_size", int), default=64,
                        help="training batch size, of every phase")
    parser.add_argument("--seed", type=_setting("seed", int), default=0,
                        help="seed of the initial weights and the batch order")
    parser.add_argument("--out", default=out, help="output folder")


def main(argv=None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    typed = _typed_options(argv)
    for option in ("sparsities", "methods"):
        values = getattr(args, option, [])
        if len(set(values)) < len(values):
            parser.error(f"argument --{option}: each value once, got {' '.join(map(str, values))}")
    if args.command == "info":
        print(format_info(build_info()))
        return 0
    resume_path = Path(args.out) / "resume.pt"
    try:
        prune(args, typed) if args.command == "prune" else compare(args, typed)
    except KeyboardInterrupt:  # before the stop request is in place, or a second Ctrl-C
        print(f"\nbipkernels {args.command}: interrupted; {resume_path} holds the last state saved, if any "
              "(continue with --resume)", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a folder removed under the run: no traceback for those
        sys.exit(f"bipkernels {args.command}: {type(error).__name__}: {error}; {resume_path} holds the last state "
                 "saved, if any (continue with --resume once that is mended)")
    return 0


def _typed_options(argv: list[str]) -> set[str]:
    """The options given in ``argv`` (argparse dests, abbreviations resolved): its parse by a parser whose
    defaults are all suppressed (argparse has no other way to tell a default from a value typed)."""
    parser = _parser()
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for subcommand in subcommands.choices.values():
        for action in subcommand._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help followed by its default, a list as typed (0.5 0.8, not [0.5, 0.8]); none for a
    flag or an option without one, where "(default: False)" or "(default: None)" would say nothing."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            return action.help
        shown = (" ".join(map(str, default)) or "none") if isinstance(default, list) else "%(default)s"
        return f"{action.help} (default: {shown})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bipkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the build facts", formatter_class=_DefaultsHelpFormatter)
    run = commands.add_parser("prune", help="BiP on the built-in digits data (the main job)",
                              formatter_class=_DefaultsHelpFormatter)
    _add_common(run, "runs/prune")
    run.add_argument("--sparsity", type=_setting("sparsity"), default=0.9,
                     help="pruned fraction (an N:M --structure prunes 1 - N/M, which it takes by default)")
    run.add_argument("--save-every", type=_setting("save_every", int), default=0, metavar="STEPS",
                     help="also save OUT/resume.pt every STEPS BiP steps (0: at the end of each epoch only); "
                          "a run killed outright loses at most the work since the last save")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from OUT/resume.pt, with the arguments saved there")
    versus = commands.add_parser("compare", help="BiP against IMP, OMP, HYDRA and random pruning",
                                 formatter_class=_DefaultsHelpFormatter)
    _add_common(versus, "runs/compare")
    versus.add_argument("--sparsities", type=_setting("sparsity"), nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98],
                        help="pruned fractions, each method runs at each")
    versus.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="pruning methods to run")
    versus.add_argument("--finetune-epochs", type=_setting("finetune_epochs", int), default=10,
                        help="fine-tuning epochs, per round for IMP")
    versus.add_argument("--resume", action="store_true",
                        help="continue an interrupted compare from OUT/resume.pt, with the arguments saved there: "
                             "pretraining from its last epoch, then the (sparsity, method) runs not yet finished "
                             "(a run cut short starts again)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
