"""HYDRA (Sehwag et al., 2020): optimise the scores with the weights frozen and no implicit term, then
fine-tune the surviving weights. Runs on the BiP solver with zero weight learning rate and inv_gamma = 0."""

from __future__ import annotations

from torch import nn

from ..nn import check_module
from .bip import BiP, steps_per_epoch
from .training import check_data, check_settings, check_training_data, checked_together, data_shard, train_weights


def hydra(model: nn.Module, dataset, sparsity: float, structure=None, scope: str = "global",
          score_epochs: int = 10, finetune_epochs: int = 10, score_lr: float = 0.01, lr: float = 0.1,
          batch_size: int = 64, seed: int = 0, loss_fn=None) -> int:
    """Returns the forward/backward passes spent. ``structure`` as BiP's (None: the masked layers' own).
    Both phases train on ``loss_fn(outputs, targets)`` (None: cross_entropy)."""
    check_module("hydra", model)
    with checked_together("hydra", model):  # a DDP rank's share of the data may fail alone
        check_settings("hydra", sparsity=sparsity, structure="unstructured" if structure is None else structure,
                       scope=scope, score_epochs=score_epochs, finetune_epochs=finetune_epochs, score_lr=score_lr,
                       lr=lr, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
        check_data("hydra", dataset, score_epochs + finetune_epochs)  # before len(dataset)
        check_training_data("hydra", model, dataset, score_epochs + finetune_epochs, batch_size, seed, loss_fn)
    steps = score_epochs * steps_per_epoch(len(dataset), batch_size, world_size=data_shard(model)[1])
    solver = BiP(model, sparsity, structure, scope, mode="fused", lr=0.0, weight_decay=0.0, momentum=0.0,
                 inv_gamma=0.0, score_lr=score_lr, total_steps=max(steps, 1))
    solver.fit(dataset, score_epochs, batch_size, seed, loss_fn=loss_fn, label="hydra scores")
    return solver.passes + train_weights(model, dataset, finetune_epochs, lr, batch_size, seed,
                                         label="hydra finetune", loss_fn=loss_fn)
