"""Training pieces shared by the solvers: schedules, deterministic batches, evaluation, batch-norm
recalibration, atomic checkpoints and a progress line."""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

SCHEDULES = ("constant", "step", "cosine")


def schedule_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: constant 1; step ×0.1 at 50% and ×0.01 at 75%; cosine
    from 1 to 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    progress = min(step / max(total, 1), 1.0)
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    schedule_factor(schedule, 0, total_steps)  # validates the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(schedule, step, total_steps))


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The index batches of one epoch: a permutation fixed by (seed, epoch), so an interrupted run can
    resume in the middle of an epoch and see exactly the batches it would have seen."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return list(order.split(batch_size))


def fetch(dataset: Dataset, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (inputs, targets) of ``dataset`` at ``indices`` on ``device``."""
    if hasattr(dataset, "tensors"):
        inputs, targets = (t[indices] for t in dataset.tensors)
    else:
        samples = [dataset[int(i)] for i in indices]
        inputs = torch.stack([torch.as_tensor(s[0]) for s in samples])
        targets = torch.as_tensor([int(s[1]) for s in samples])
    return inputs.to(device), targets.to(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode)."""
    model.eval()
    device = model_device(model)
    correct = 0
    for indices in torch.arange(len(dataset)).split(batch_size):
        inputs, targets = fetch(dataset, indices, device)
        correct += int((model(inputs).argmax(1) == targets).sum())
    return correct / max(len(dataset), 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> None:
    """Recompute every batch norm's running statistics under the current masks (a pass over ``dataset``
    in train mode, cumulative averages): without it a pruned network can fall to chance accuracy."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    training = model.training
    model.train()
    device = model_device(model)
    for indices in torch.arange(len(dataset)).split(batch_size):
        model(fetch(dataset, indices, device)[0])
    model.train(training)
    for norm, (momentum, was_training) in zip(norms, saved):
        norm.momentum = momentum
        norm.train(was_training)


class Progress:
    """A progress line: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.started = time.perf_counter()
        self.interactive = self.stream.isatty()

    def update(self, done: int, **fields) -> None:
        width = 24
        filled = int(width * done / max(self.total, 1))
        text = " ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in fields.items())
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text} "
                f"({time.perf_counter() - self.started:.1f}s)")
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def save_atomically(obj, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def train_weights(model: nn.Module, dataset: Dataset, epochs: int, lr: float = 0.05, batch_size: int = 64,
                  seed: int = 0, weight_decay: float = 1e-4, schedule: str = "cosine", label: str = "train",
                  loss_fn=nn.functional.cross_entropy, after_epoch=None) -> int:
    """SGD (momentum 0.9) on every parameter but the mask scores, masks fixed; returns the passes spent.

    ``after_epoch(epoch)`` runs after each epoch (e.g. to save a rewind point).
    """
    weights = [p for name, p in model.named_parameters() if not name.endswith("scores")]
    optimizer = torch.optim.SGD(weights, lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = -(-len(dataset) // batch_size)
    schedule_ = scheduler(optimizer, schedule, max(epochs * steps_per_epoch, 1))
    device = model_device(model)
    progress = Progress(epochs, label)
    passes = 0
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for indices in epoch_batches(dataset, batch_size, seed, epoch):
            inputs, targets = fetch(dataset, indices, device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            schedule_.step()
            total += float(loss.detach()) * len(indices)
            passes += 1
        progress.update(epoch + 1, loss=total / max(len(dataset), 1))
        if after_epoch is not None:
            after_epoch(epoch)
    return passes
