"""IMP: iterative magnitude pruning with weight rewinding (the lottery-ticket procedure).

Each round prunes ``rate`` (20%) of the remaining blocks by magnitude, globally, rewinds the surviving
weights to ``rewind_state`` (an early-training checkpoint of the dense model) and retrains; the last round
lands exactly on the target sparsity. Pruned blocks stay pruned: their scores are set to NaN, which the
top-k never keeps, during the rounds; the model returns with finite scores (0 where pruned) and the same
masks, so that a later projection or BiP from it keeps its full count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import nn as masked_nn
from ..reference import score_dtype
from .training import (check_data, check_settings, check_training_data, checked_together, convert_to_reset,
                       project_naming_emptied, train_weights)


def imp_rounds(sparsity: float, rate: float = 0.2) -> list[float]:
    """The sparsity after each round: 1 − (1 − rate)^r, capped at the target (e.g. 11 rounds for 90%).
    No rounds for sparsity 0; one for sparsity 1."""
    check_settings("imp_rounds", sparsity=sparsity, rate=rate)
    if sparsity <= 0:
        return []
    rounds = max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - rate) - 1e-9)) if sparsity < 1 else 1
    return [min(1.0 - (1.0 - rate) ** r, sparsity) for r in range(1, rounds)] + [sparsity]


def imp(model: nn.Module, dataset, sparsity: float, structure="unstructured", scope: str = "global",
        rewind_state: dict | None = None, epochs_per_round: int = 5, lr: float = 0.05, rate: float = 0.2,
        batch_size: int = 64, seed: int = 0, loss_fn=None) -> int:
    """Prune ``model`` (trained) to ``sparsity`` in rounds, each retraining on ``loss_fn(outputs, targets)``
    (None: cross_entropy); returns the forward/backward passes spent.

    ``rewind_state``: a dense state_dict to rewind to (default: the weights ``model`` starts with).
    Warns, as convert does, in the round where a global projection first keeps no block of a layer.
    """
    masked_nn.check_module("imp", model)
    with checked_together("imp", model):  # a DDP rank's share of the data may fail alone
        check_settings("imp", sparsity=sparsity, structure=structure, scope=scope, epochs_per_round=epochs_per_round,
                       lr=lr, rate=rate, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
        check_data("imp", dataset, epochs_per_round)
        check_training_data("imp", model, dataset, epochs_per_round, batch_size, seed, loss_fn)
        check_rewind_state(model, rewind_state)
    rewind_state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                    for k, v in (rewind_state or model.state_dict()).items()}
    convert_to_reset("imp", model, structure, scope)
    passes, emptied = 0, set()
    for round_index, target in enumerate(imp_rounds(sparsity, rate)):
        with torch.no_grad():
            for _, layer in masked_nn.masked_layers(model):
                kept = layer.mask()
                layer.scores.copy_(torch.where(kept, layer.weight.abs(), torch.full_like(layer.weight, float("nan"))))
            # An emptied layer stays so (NaN scores): named in the round it empties, not in every later one.
            emptied = project_naming_emptied("imp", model, target, scope, emptied)
            model.load_state_dict({**model.state_dict(), **_masked_rewind(model, rewind_state)})
        # One seed, the rounds continuing its epochs: per-round seeds (seed + round) gave seed 1's rounds
        # the batches of seed 0's next ones.
        passes += train_weights(model, dataset, epochs_per_round, lr, batch_size, seed,
                                first_epoch=round_index * epochs_per_round,
                                label=f"imp round {round_index + 1} ({target:.3f})", loss_fn=loss_fn)
    if sparsity > 0:
        _finite_scores(model, sparsity, scope)
    return passes


@torch.no_grad()
def _finite_scores(model: nn.Module, sparsity: float, scope: str) -> None:
    """Scores 0 for the pruned weights and |θ| for the kept ones, then the projection again, which gives
    the same masks: each kept score is at least a floor whose square stays a positive normal number in the
    block scores' arithmetic, so every kept block outranks every pruned one (exactly the count kept). NaN
    scores left in the model would make a later projection keep fewer than it asks (top-k keeps no NaN)."""
    for _, layer in masked_nn.masked_layers(model):
        arithmetic = score_dtype(layer.scores.dtype)
        floor = max(torch.finfo(layer.scores.dtype).tiny, torch.finfo(arithmetic).tiny ** 0.5)
        # A kept weight that training made NaN keeps its block too (NaN scores are never kept).
        magnitude = torch.nan_to_num(layer.weight.abs(), nan=floor, posinf=math.inf)
        layer.scores.copy_(torch.where(layer.mask(), magnitude.clamp_min(floor), 0))
    masked_nn.project(model, sparsity, scope)


def check_rewind_state(model: nn.Module, rewind_state) -> None:
    """TypeError unless ``rewind_state`` is None or a dict; ValueError naming what is missing unless it is
    empty (None and {}: the model's own weights) or holds every parameter of ``model`` but the scores, under
    one of its names (a whole checkpoint, or keys with another prefix, would otherwise rewind nothing, in
    silence)."""
    if rewind_state is None:
        return
    if not isinstance(rewind_state, dict):
        raise TypeError(f"imp: rewind_state must be a state_dict (a dict) or None, got {type(rewind_state).__name__}")
    if not rewind_state:
        return
    score_ids = {id(layer.scores) for _, layer in masked_nn.masked_layers(model)}
    names: dict[int, list[str]] = {}  # a tied parameter goes by several names: any one will do
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) not in score_ids:
            names.setdefault(id(parameter), []).append(name)
    missing = [every[0] for every in names.values() if not any(name in rewind_state for name in every)]
    if missing:
        raise ValueError(f"imp: rewind_state lacks {len(missing)} of the model's {len(names)} parameters "
                         f"(first {missing[0]!r}; its keys begin {sorted(map(str, rewind_state))[:3]}): give a "
                         "state_dict of this model, such as the 'rewind' entry of the command line's dense.pt")
    own = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    masks = {f"{name}.threshold" for name, _ in masked_nn.masked_layers(model)}  # kept as they are on rewind
    for name, value in rewind_state.items():
        if name in own and id(own[name]) not in score_ids and name not in masks and (
                not isinstance(value, torch.Tensor) or value.shape != own[name].shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"imp: rewind_state[{name!r}] has shape {got} but the model's tensor has shape "
                             f"{tuple(own[name].shape)}")


def _masked_rewind(model: nn.Module, rewind_state: dict) -> dict:
    """The rewind weights keyed for the masked model (the masks' scores, thresholds and structures are kept
    as they are)."""
    own = model.state_dict()
    masks = {f"{name}.{part}" for name, _ in masked_nn.masked_layers(model)
             for part in ("scores", "threshold", "_extra_state")}
    return {key: value for key, value in rewind_state.items() if key in own and key not in masks}
