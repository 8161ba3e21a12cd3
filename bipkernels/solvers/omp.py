"""One-shot baselines: OMP (global magnitude pruning of the trained model) and random pruning, each
followed by fine-tuning of the surviving weights."""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as masked_nn
from .training import check_data, check_settings, convert_to_reset, train_weights


def omp(model: nn.Module, dataset, sparsity: float, structure="unstructured", scope: str = "global",
        finetune_epochs: int = 10, lr: float = 0.1, batch_size: int = 64, seed: int = 0) -> int:
    """Prune ``model`` once by |θ| (global top-k of block magnitudes), then fine-tune; returns passes."""
    check_settings("omp", sparsity=sparsity, structure=structure, scope=scope, finetune_epochs=finetune_epochs, lr=lr,
                   batch_size=batch_size, seed=seed)
    check_data("omp", dataset, finetune_epochs)
    if not masked_nn.masked_layers(model):
        masked_nn.convert(model, sparsity, structure, scope)  # scores |θ| (and convert's warnings)
    else:  # by today's |θ|: layers masked before hold scores of another time
        convert_to_reset(model, structure, scope)
        with torch.no_grad():
            for _, layer in masked_nn.masked_layers(model):
                layer.scores.copy_(layer.weight.abs())
        masked_nn.project(model, sparsity, scope)
    return train_weights(model, dataset, finetune_epochs, lr, batch_size, seed, label="omp finetune")


@torch.no_grad()
def random_prune(model: nn.Module, dataset, sparsity: float, structure="unstructured", scope: str = "global",
                 finetune_epochs: int = 10, lr: float = 0.1, batch_size: int = 64, seed: int = 0) -> int:
    """The floor: a uniformly random mask with exactly k kept blocks, then fine-tuning; returns passes."""
    check_settings("random_prune", sparsity=sparsity, structure=structure, scope=scope,
                   finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed)
    check_data("random_prune", dataset, finetune_epochs)
    convert_to_reset(model, structure, scope)
    generator = torch.Generator().manual_seed(seed)
    for _, layer in masked_nn.masked_layers(model):
        layer.scores.copy_(torch.rand(layer.scores.shape, generator=generator).to(layer.scores))
    masked_nn.project(model, sparsity, scope)
    with torch.enable_grad():
        return train_weights(model, dataset, finetune_epochs, lr, batch_size, seed, label="random finetune")
