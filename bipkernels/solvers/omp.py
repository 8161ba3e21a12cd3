"""One-shot baselines: OMP (global magnitude pruning of the trained model) and random pruning, each
followed by fine-tuning of the surviving weights."""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as masked_nn
from .. import ops
from .training import (check_data, check_settings, check_training_data, checked_together, convert_masking_something,
                       convert_to_reset, project_naming_emptied, train_weights)


def omp(model: nn.Module, dataset, sparsity: float, structure="unstructured", scope: str = "global",
        finetune_epochs: int = 10, lr: float = 0.1, batch_size: int = 64, seed: int = 0, loss_fn=None) -> int:
    """Prune ``model`` once by |θ| (global top-k of block magnitudes), then fine-tune on ``loss_fn`` (None:
    cross_entropy); returns passes."""
    masked_nn.check_module("omp", model)
    with checked_together("omp", model):  # a DDP rank's share of the data may fail alone
        check_settings("omp", sparsity=sparsity, structure=structure, scope=scope, finetune_epochs=finetune_epochs,
                       lr=lr, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
        check_data("omp", dataset, finetune_epochs)
        check_training_data("omp", model, dataset, finetune_epochs, batch_size, seed, loss_fn)
    if not masked_nn.masked_layers(model):
        convert_masking_something("omp", model, sparsity, structure, scope)  # scores |θ| (and convert's warnings)
    else:  # its masked layers alone, by today's |θ|: layers masked before hold scores of another time
        with torch.no_grad():
            for _, layer in masked_nn.masked_layers(model):
                layer.scores.copy_(layer.weight.abs())
        project_naming_emptied("omp", model, sparsity, scope)
    return train_weights(model, dataset, finetune_epochs, lr, batch_size, seed, label="omp finetune", loss_fn=loss_fn)


def _random_scores(scores: torch.Tensor, structure, generator: torch.Generator) -> torch.Tensor:
    """Scores (like ``scores``) whose block scores are uniform draws, one per block: each element of a
    block of n holds draw / n (p = 1: the block's Σ|s| is the draw) or √(draw / n) (p = 2: its Σs² is).
    Uniform scores per element would rank a block by the sum of its n draws, so the biggest blocks (a wide
    layer's filters, whole tiles against edge tiles) would always stay. The block's value reaches its
    elements through the block scores' derivative at all-ones scores: 1 (p = 1) or 2 (p = 2) each."""
    if structure.kind in ("unstructured", "nm"):  # a block is an element, its score |s|
        return torch.rand(scores.shape, generator=generator).to(scores)
    structure = structure.fitted(scores.shape)
    draws = torch.rand(structure.block_scores_shape(scores.shape), generator=generator).double()
    ones = torch.ones(scores.shape, requires_grad=True)  # float32: the derivative (1 or 2) is exact
    with torch.enable_grad():
        sizes = ops.block_scores(ones, structure)  # n per block
        sizes_of_blocks = sizes.detach().double()
        values = draws / sizes_of_blocks if structure.p == 1 else (draws / sizes_of_blocks).sqrt() / 2
        (spread,) = torch.autograd.grad((sizes * values.float()).sum(), ones)
    return spread.to(scores)


@torch.no_grad()
def random_prune(model: nn.Module, dataset, sparsity: float, structure="unstructured", scope: str = "global",
                 finetune_epochs: int = 10, lr: float = 0.1, batch_size: int = 64, seed: int = 0,
                 loss_fn=None) -> int:
    """The floor: a uniformly random mask with exactly k kept blocks, then fine-tuning on ``loss_fn`` (None:
    cross_entropy); returns passes.
    One uniform draw per block (_random_scores), so blocks of every size are equally likely to stay."""
    masked_nn.check_module("random_prune", model)
    with checked_together("random_prune", model):  # a DDP rank's share of the data may fail alone
        check_settings("random_prune", sparsity=sparsity, structure=structure, scope=scope,
                       finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
        check_data("random_prune", dataset, finetune_epochs)
        check_training_data("random_prune", model, dataset, finetune_epochs, batch_size, seed, loss_fn)
    convert_to_reset("random_prune", model, structure, scope)
    generator = torch.Generator().manual_seed(seed)
    for _, layer in masked_nn.masked_layers(model):
        layer.scores.copy_(_random_scores(layer.scores, layer.structure, generator))
    project_naming_emptied("random_prune", model, sparsity, scope)
    with torch.enable_grad():
        return train_weights(model, dataset, finetune_epochs, lr, batch_size, seed, label="random finetune",
                             loss_fn=loss_fn)
