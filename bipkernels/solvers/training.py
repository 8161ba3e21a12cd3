"""Training and evaluation loops shared by the solvers and the command line."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader


class Progress:
    """One line of progress per step on a terminal (redrawn in place), else one line per report."""

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


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                loss_fn=nn.functional.cross_entropy) -> float:
    """One pass over ``loader`` with ``optimizer``; returns the mean training loss."""
    model.train()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(targets)
        count += len(targets)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    correct = count = 0
    for inputs, targets in loader:
        predictions = model(inputs.to(device)).argmax(1)
        correct += int((predictions == targets.to(device)).sum())
        count += len(targets)
    return correct / max(count, 1)


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
