"""The `bipkernels` command: `info` prints the build facts, `prune` runs the main job."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import data, models, nn as masked_nn
from .info import build_info, format_info
from .solvers.training import Progress, evaluate, save_atomically, train_epoch


def _train(model, loaders, epochs: int, lr: float, label: str, parameters=None) -> None:
    parameters = list(parameters if parameters is not None else model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    progress = Progress(epochs, label)
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, loaders["train"], optimizer)
        schedule.step()
        progress.update(epoch, loss=loss, val_acc=evaluate(model, loaders["val"]),
                        sparsity=masked_nn.sparsity(model))


def prune(args) -> dict:
    """Pretrain a small ResNet on digits, prune it to ``args.sparsity`` by global magnitude, fine-tune."""
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    splits = data.digits()
    loaders = {name: DataLoader(split, batch_size=64, shuffle=name == "train",
                                generator=torch.Generator().manual_seed(args.seed))
               for name, split in splits.items()}
    model = models.SmallResNet()
    _train(model, loaders, args.pretrain_epochs, 0.1, "pretrain")
    dense_accuracy = evaluate(model, loaders["test"])
    masked_nn.convert(model, sparsity=args.sparsity, structure=args.structure)
    pruned_accuracy = evaluate(model, loaders["test"])
    weights = [p for name, p in model.named_parameters() if not name.endswith("scores")]
    _train(model, loaders, args.finetune_epochs, 0.02, "finetune", weights)
    result = {
        "method": "global magnitude (one shot) + fine-tune",
        "structure": args.structure,
        "target_sparsity": args.sparsity,
        "sparsity": masked_nn.sparsity(model),
        "dense_test_accuracy": dense_accuracy,
        "pruned_test_accuracy_before_finetune": pruned_accuracy,
        "test_accuracy": evaluate(model, loaders["test"]),
        "layers": {name: {"shape": list(layer.weight.shape), "sparsity": 1.0 - float(layer.mask().float().mean())}
                   for name, layer in masked_nn.masked_layers(model)},
        "wall_time_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    save_atomically({"model": model.state_dict(), "result": result}, out / "pruned.pt")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'layer':<28} {'shape':<18} {'sparsity':>8}")
    for name, layer in result["layers"].items():
        print(f"{name:<28} {str(tuple(layer['shape'])):<18} {layer['sparsity']:>8.3f}")
    print(f"\nglobal sparsity {result['sparsity']:.4f} | test accuracy: dense {dense_accuracy:.4f}, "
          f"pruned {pruned_accuracy:.4f}, fine-tuned {result['test_accuracy']:.4f} | "
          f"{result['wall_time_s']:.1f}s | wrote {out / 'pruned.pt'} and {out / 'results.json'}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bipkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the build facts: versions, CUDA archs, kernels per op")
    run = commands.add_parser("prune", help="prune a small ResNet on the built-in digits data")
    run.add_argument("--sparsity", type=float, default=0.9, help="pruned fraction (default 0.9)")
    run.add_argument("--structure", default="unstructured", help="unstructured, filter, channel, 2:4, tile4x4")
    run.add_argument("--pretrain-epochs", type=int, default=15)
    run.add_argument("--finetune-epochs", type=int, default=10)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="runs/prune", help="folder for pruned.pt and results.json")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(format_info(build_info()))
    else:
        prune(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
