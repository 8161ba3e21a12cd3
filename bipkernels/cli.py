"""The `bipkernels` command.

    bipkernels info       the build facts: versions, CUDA archs, which backends run each op
    bipkernels prune      the main job: BiP on the built-in digits data (pretrains a small ResNet first);
                          --data cifar10:FOLDER or folder:FOLDER and --model resnet20 / resnet18 / ... for others
    bipkernels compare    BiP, IMP, OMP, HYDRA and random pruning over several sparsities, with plots
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
from pathlib import Path

import torch

from . import data, models, nn as masked_nn
from .info import build_info, format_info
from .solvers import BiP, METHODS, prune as prune_with
from .solvers.bip import steps_per_epoch
from .solvers.training import evaluate, recalibrate_batchnorm, save_atomically, train_weights


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag that the training loop checks after every step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, _frame):
        self.signal = number

    def __exit__(self, *_):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _pretrained(args, splits, out: Path):
    """The dense model: from --checkpoint, else pretrained here (and saved as dense.pt), plus a rewind
    point (the weights after the first epoch) for IMP."""
    torch.manual_seed(args.seed)
    model = _model(args, splits)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu")
        model.load_state_dict(state["model"])
        return model, state.get("rewind", state["model"])
    rewind = {}

    def keep_rewind(epoch):
        if epoch == 0:
            rewind.update({key: value.clone() for key, value in model.state_dict().items()})

    train_weights(model, splits["train"], args.pretrain_epochs, lr=0.1, seed=args.seed, label="pretrain",
                  after_epoch=keep_rewind)
    save_atomically({"model": model.state_dict(), "rewind": rewind}, out / "dense.pt")
    return model, rewind


def _model(args, splits):
    return models.build(args.model, *reversed(data.describe(splits)))


def _bip_options(args) -> dict:
    return dict(mode=args.mode, implicit=args.implicit, inv_gamma=args.inv_gamma, lr=args.lr, score_lr=args.score_lr)


def prune(args) -> dict:
    """The main job: BiP to --sparsity, resumable; prints the per-layer table and writes the results."""
    out = Path(args.out)
    resume_path = out / "resume.pt"
    if args.resume:
        if not resume_path.exists():
            sys.exit(f"bipkernels prune: --resume but there is no {resume_path}")
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        args = argparse.Namespace(**{**vars(args), **state["args"], "resume": True})
    splits = data.load(args.data)
    if args.resume:
        model, dense_accuracy = _model(args, splits), state["dense_accuracy"]
    else:
        model, _ = _pretrained(args, splits, out)
        dense_accuracy = evaluate(model, splits["test"])
    per_epoch = steps_per_epoch(len(splits["train"]), args.batch_size, args.mode)
    solver = BiP(model, args.sparsity, args.structure, args.scope, total_steps=max(args.epochs * per_epoch, 1),
                 **_bip_options(args))
    start = (0, 0)
    if args.resume:
        solver.load_state_dict(state["solver"])
        start = state["position"]
        print(f"resuming at epoch {start[0] + 1}, step {start[1]}", file=sys.stderr)
    saved_args = {key: value for key, value in vars(args).items() if key not in ("resume", "command")}

    def checkpoint(position):
        save_atomically({"solver": solver.state_dict(), "position": position, "args": saved_args,
                         "dense_accuracy": dense_accuracy}, resume_path)

    with StopRequest() as stop:
        def on_step(epoch, step):
            if stop.signal is not None:
                checkpoint((epoch, step))
                return True
            if step == per_epoch:
                checkpoint((epoch + 1, 0))
            return False

        reached = solver.fit(splits["train"], args.epochs, args.batch_size, args.seed, start=start, on_step=on_step)
    if reached[0] < args.epochs:
        print(f"\ninterrupted: state saved to {resume_path}; continue with `bipkernels prune --resume --out {out}`",
              file=sys.stderr)
        sys.exit(130)
    recalibrate_batchnorm(model, splits["train"])
    result = {
        "method": "bip", **{key: saved_args[key] for key in ("mode", "implicit", "inv_gamma", "structure", "scope")},
        "target_sparsity": args.sparsity,
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
    (out / "results.json").write_text(json.dumps(result, indent=2))
    resume_path.unlink(missing_ok=True)
    print(f"\n{'layer':<24} {'shape':<18} {'sparsity':>8}")
    for name, layer in result["layers"].items():
        print(f"{name:<24} {str(tuple(layer['shape'])):<18} {layer['sparsity']:>8.3f}")
    print(f"\nBiP ({args.mode}, implicit={args.implicit}, 1/γ={args.inv_gamma:g}) to {result['sparsity']:.4f} sparsity: "
          f"test accuracy {result['test_accuracy']:.4f} (dense {dense_accuracy:.4f}), {solver.passes} passes\n"
          f"wrote {out / 'pruned.pt'} and {out / 'results.json'}")
    return result


def compare(args) -> list[dict]:
    """Every method at every sparsity from the same pretrained model: a table, a JSON file and plots."""
    out = Path(args.out)
    splits = data.load(args.data)
    dense, rewind = _pretrained(args, splits, out)
    dense_accuracy = evaluate(dense, splits["test"])
    results = []
    for sparsity in args.sparsities:
        for method in args.methods:
            options = _bip_options(args) if method == "bip" else {}
            _, result = prune_with(copy.deepcopy(dense), splits["train"], method, sparsity, structure=args.structure,
                                   scope=args.scope, val_data=splits["val"], test_data=splits["test"],
                                   epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=args.seed,
                                   rewind_state=rewind, **options)
            results.append(result)
            (out / "compare.json").write_text(json.dumps({"dense_test_accuracy": dense_accuracy, "results": results},
                                                         indent=2))
    header = f"{'method':<8}" + "".join(f"{f'{s:.0%} acc':>10}{'time':>7}" for s in args.sparsities)
    print(f"\ntest accuracy and wall time (s) on {args.data}; dense {dense_accuracy:.4f}\n{header}")
    for method in args.methods:
        row = [r for r in results if r["method"] == method]
        print(f"{method:<8}" + "".join(f"{r['test_accuracy']:>10.4f}{r['wall_time_s']:>7.1f}" for r in row))
    _plot(results, args, out)
    return results


def _plot(results, args, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return
    for key, label, name in (("test_accuracy", "test accuracy", "accuracy.png"), ("wall_time_s", "wall time (s)", "time.png")):
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


def _add_common(parser, out: str) -> None:
    parser.add_argument("--data", default="digits", help="digits (built in), cifar10:FOLDER or folder:FOLDER")
    parser.add_argument("--model", default="small-resnet", help="small-resnet, resnet20 or a torchvision model name")
    parser.add_argument("--structure", default="unstructured", help="unstructured, filter, channel, 2:4, tile4x4")
    parser.add_argument("--scope", default="global", choices=["global", "layer"])
    parser.add_argument("--mode", default="fused", choices=["fused", "faithful"], help="BiP mode")
    parser.add_argument("--implicit", default="paper", choices=["paper", "released"], help="BiP implicit term")
    parser.add_argument("--inv-gamma", type=float, default=1e-4, help="1/γ, the implicit term's scale")
    parser.add_argument("--lr", type=float, default=0.01, help="BiP lower-level (weight) learning rate")
    parser.add_argument("--score-lr", type=float, default=0.05, help="BiP upper-level (score) learning rate")
    parser.add_argument("--epochs", type=int, default=20, help="BiP epochs (HYDRA: score epochs)")
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--checkpoint", help="a dense.pt written by an earlier run: skip pretraining")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out, help="output folder")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bipkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the build facts")
    run = commands.add_parser("prune", help="BiP on the built-in digits data (the main job)")
    _add_common(run, "runs/prune")
    run.add_argument("--sparsity", type=float, default=0.9, help="pruned fraction (default 0.9)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT/resume.pt")
    versus = commands.add_parser("compare", help="BiP against IMP, OMP, HYDRA and random pruning")
    _add_common(versus, "runs/compare")
    versus.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98])
    versus.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    versus.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (IMP: per round)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(format_info(build_info()))
    elif args.command == "prune":
        prune(args)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
