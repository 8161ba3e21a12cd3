"""Training pieces shared by the solvers: the checks of their settings, schedules, deterministic batches,
evaluation, batch-norm recalibration, atomic checkpoints and a progress line."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .. import distributed
from ..nn import SCOPES, check_module, convert, masked_layers, project, ranked_layers, unmasked_layers, warn_emptied
from ..ops import check_int, check_number, check_sparsity
from ..reference import IMPLICIT_FORMS
from ..structures import parse_structure

SCHEDULES = ("constant", "step", "cosine")
MODES = ("fused", "faithful")


def _choice(choices):
    def check(owner, name, value):
        if value not in choices:
            raise ValueError(f"{owner + ': ' if owner else ''}{name} must be one of {choices}, got {value!r}")
    return check


def _structure(owner, name, value):
    parse_structure(value, owner=owner)


def _optional_flag(owner, name, value):
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{owner + ': ' if owner else ''}{name} must be True, False or None, got {value!r}")


def _optional_callable(owner, name, value):
    if value is not None and not callable(value):
        raise TypeError(f"{owner + ': ' if owner else ''}{name} must be callable or None, got "
                        f"{type(value).__name__} {value!r}")


def _str(owner, name, value):
    if not isinstance(value, str):
        raise TypeError(f"{owner + ': ' if owner else ''}{name} must be a str, got {type(value).__name__} {value!r}")


def _int(minimum, maximum=None):
    return lambda owner, name, value: check_int(owner, name, value, minimum, maximum)


def _number(minimum=0.0, maximum=math.inf, open_low=False, open_high=False):
    return lambda owner, name, value: check_number(owner, name, value, minimum, maximum, open_low, open_high)


# Every setting a solver, prune or the command line takes, by name: one rule each, so that an argument
# means the same everywhere. Epoch counts may be 0 (nothing to do); a seed fits torch.Generator.
SETTINGS = {
    **dict.fromkeys(("epochs", "finetune_epochs", "score_epochs", "epochs_per_round", "pretrain_epochs",
                     "save_every"), _int(0)),
    "first_epoch": _int(0, 2**32 - 1),  # an epoch_batches index
    **dict.fromkeys(("batch_size", "lower_steps", "total_steps", "world_size"), _int(1)),
    "seed": _int(0, 2**32 - 1),
    **dict.fromkeys(("lr", "score_lr", "weight_decay", "inv_gamma"), _number()),
    **dict.fromkeys(("momentum", "score_momentum"), _number(0.0, 1.0, open_high=True)),
    "rate": _number(0.0, 1.0, open_low=True, open_high=True),
    "sparsity": lambda owner, name, value: check_sparsity(value, owner),
    "structure": _structure,
    "scope": _choice(SCOPES),
    "mode": _choice(MODES),
    "implicit": _choice(IMPLICIT_FORMS),
    **dict.fromkeys(("schedule", "score_schedule"), _choice(SCHEDULES)),
    "step_scores_in_backward": _optional_flag,
    "loss_fn": _optional_callable,  # loss_fn(outputs, targets) -> a scalar tensor; None: cross_entropy
    "label": _str,  # the progress line's name; not the targets, which the dataset's examples hold
}


def training_loss(loss_fn):
    """The loss that training calls as loss_fn(outputs, targets): ``loss_fn``, or cross_entropy (classes in
    dim 1 of the outputs) for None."""
    return nn.functional.cross_entropy if loss_fn is None else loss_fn


def check_settings(owner: str, **settings) -> None:
    """ValueError (TypeError for a structure of the wrong type) naming ``owner``, the setting and its value
    for the first of ``settings`` that breaks its rule in SETTINGS."""
    for name, value in settings.items():
        SETTINGS[name](owner, name, value)


def check_dataset(owner: str, name: str, dataset) -> None:
    """TypeError naming ``owner`` and ``name`` unless ``dataset`` is map-style: a length and examples by
    index (a torch Dataset, a TensorDataset, a list of (input, target) pairs). The solvers batch the
    examples themselves, so a DataLoader is not one: its .dataset is; nor is a dict of splits (data.load's
    {"train": ..., "test": ...}), whose examples by index 0, 1, ... do not exist: one of its splits is. (A
    dict keyed by the indices 0 to len - 1 is a map-style dataset.)"""
    splits = isinstance(dataset, dict) and any(not isinstance(key, int) for key in dataset)
    if splits or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        hint = ": pass its .dataset (the solvers batch the examples themselves)" if isinstance(dataset, DataLoader) \
            else f" with keys {sorted(dataset, key=repr)[:4]}: pass one split of it" if splits else ""
        raise TypeError(f"{owner}: {name} must be a map-style dataset (len() and examples by index), got "
                        f"{type(dataset).__name__}{hint}")


def check_data(owner: str, dataset, epochs: int) -> None:
    """check_dataset, and ValueError naming ``owner`` if ``epochs`` of training would run over an empty
    ``dataset`` (a solver calls it before it changes the model)."""
    check_dataset(owner, "the training data", dataset)
    if epochs and not len(dataset):
        raise ValueError(f"{owner}: the training data are empty: {epochs} epochs would train nothing")


def check_masked_structure(owner: str, model: nn.Module, structure) -> None:
    """ValueError if ``structure`` (None: any) is not that of every layer the model already masks: a
    solver prunes a masked model in its layers' own structures, so another one asked for would be ignored."""
    if structure is None:
        return
    wanted = parse_structure(structure, owner=owner)
    for name, layer in masked_layers(model):
        if layer.structure != wanted:
            raise ValueError(f"{owner}: structure {structure!r}, but the model is already masked and its layer "
                             f"{name!r} has structure {layer.structure}: pass structure=None to keep the "
                             "layers' own, or convert an unmasked model")


def nothing_to_mask(owner: str, model: nn.Module, where: str = "inside it") -> ValueError:
    """The error, naming ``owner``, for a solver whose convert of ``model`` masked nothing: it holds no
    nn.Conv2d or nn.Linear ``where``, or is one itself (convert cannot swap the model in place), so nothing
    would be pruned; convert changed nothing of it."""
    return ValueError(f"{owner}: the model has no nn.Conv2d or nn.Linear layer {where} to mask (convert swaps a "
                      "model's layers, not the model itself; left dense here: "
                      f"{unmasked_layers(model) or 'no layer with a weight'})")


def convert_masking_something(owner: str, model: nn.Module, sparsity: float, structure, scope: str) -> None:
    """bipkernels.convert(model, sparsity, structure, scope) of a model without masked layers, for a solver
    that prunes it; nothing_to_mask, for ``owner``, where the convert masks nothing (the solver would train
    the model unpruned)."""
    convert(model, sparsity, structure, scope)
    if not masked_layers(model):
        raise nothing_to_mask(owner, model)


def convert_to_reset(owner: str, model: nn.Module, structure, scope: str) -> None:
    """Prepares ``model`` for a solver that sets every mask itself next: a model without masked layers is
    converted at sparsity 0 (structure ``structure``); one with masked layers is pruned in those alone, as BiP
    and HYDRA prune it (its plain layers stay dense: those a convert(..., exclude=) left out), and they are
    projected to keep everything. nothing_to_mask, for ``owner``, where the convert masks nothing."""
    if masked_layers(model):
        project(model, 0.0, scope)
    else:
        convert_masking_something(owner, model, 0.0, structure, scope)


def project_naming_emptied(owner: str, model: nn.Module, sparsity: float, scope: str,
                           named=frozenset()) -> set[str]:
    """bipkernels.project(model, sparsity, scope) for a solver that set the masked layers' scores itself
    (IMP, random pruning, OMP on a masked model), with convert's warning, for ``owner``, naming the layers
    that a global projection keeps no block of (converting at the solver's sparsity gives it; converting at
    0 and projecting would not).

    Returns the names of the ranked layers (ranked_layers) left without a kept weight (under a global
    projection; ``named`` otherwise): a run that projects again (IMP's rounds) passes them as ``named``,
    so that it warns only when more layers empty.
    """
    project(model, sparsity, scope)
    if scope != "global" or sparsity >= 1:  # every layer keeps its fraction: no mask to read
        return set(named)
    emptied = [name for name, layer in ranked_layers(model) if not layer.mask().any()]
    if set(emptied) - set(named):
        warn_emptied(owner, emptied)
    return set(emptied)


def schedule_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: constant 1; step ×0.1 at 50% and ×0.01 at 75%; cosine
    from 1 to 0."""
    check_settings("schedule_factor", schedule=schedule)
    progress = min(step / max(total, 1), 1.0)
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    schedule_factor(schedule, 0, total_steps)  # validates the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(schedule, step, total_steps))


def split_batches(indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``indices`` (1-D) in batches of ``batch_size``, the last one shorter; a last batch of a single
    example joins the one before it, because batch norm in training mode cannot normalise one value per
    channel (a 1×1 feature map, as CIFAR-size ResNets end with, raises). A lone example, or batch_size 1,
    stays batches of one."""
    batches = list(indices.split(batch_size)) if len(indices) else []
    if len(batches) > 1 and len(batches[-1]) == 1 < batch_size:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def batch_count(size: int, batch_size: int) -> int:
    """len(split_batches(indices, batch_size)) for ``size`` indices."""
    batches = -(-size // batch_size)
    return batches - 1 if batches > 1 and size % batch_size == 1 else batches


def ddp_wrapper(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel module that is ``model`` or lies inside it (torch.compile's wrapper
    holds it as a child), or None."""
    return next((module for module in model.modules() if isinstance(module, nn.parallel.DistributedDataParallel)),
                None)


def data_shard(model: nn.Module) -> tuple[int, int]:
    """(rank, world size) over which the training loops split each epoch's examples: those of the process
    group of a DistributedDataParallel ``model`` (ddp_wrapper: every rank its own examples, as
    DistributedSampler), else (0, 1). A model sharded by layers (BiP's ``group``) is not data-parallel:
    every rank sees every batch."""
    wrapper = ddp_wrapper(model)
    if wrapper is None:
        return 0, 1
    return torch.distributed.get_rank(wrapper.process_group), torch.distributed.get_world_size(wrapper.process_group)


def training_group(model: nn.Module, group=None):
    """The process group whose ranks train ``model`` together, in collectives that every rank must reach:
    ``group`` (BiP's, over a model sharded by layers), else that of a DistributedDataParallel ``model``
    (ddp_wrapper), else None (this process trains alone)."""
    if group is not None:
        return group
    wrapper = ddp_wrapper(model)
    return None if wrapper is None else wrapper.process_group


@contextlib.contextmanager
def checked_together(owner: str, model: nn.Module, group=None):
    """The checks inside the block, as a collective of training_group(model, group) (None: this process
    alone, and the block's errors raise as they are): an error on any rank raises on every rank, the failing
    rank's own there and a RuntimeError naming ``owner`` and that rank on the others
    (distributed.raise_together, on the model's device under NCCL). The checks of one rank's share of the
    data fail on that rank alone, and a rank that raised alone left the others waiting for ever in
    training's first collective (the gradient all-reduce, a projection over the group). Every rank of the
    group must run the block. ``model`` may be one the block refuses (not an nn.Module): then ``group``
    alone is the group, and the collective runs where the backend takes tensors."""
    is_module = isinstance(model, nn.Module)
    group = training_group(model, group) if is_module else group
    if group is None:
        yield
        return
    failure = None
    try:
        yield
    except Exception as error:
        failure = error
    distributed.raise_together(owner, failure, group, model_device(model) if is_module else None)


def shard_size(size: int, world_size: int) -> int:
    """Examples per rank in each epoch when ``size`` are split over ``world_size`` ranks (epoch_batches)."""
    return -(-size // world_size)


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, shard=(0, 1)) -> list[torch.Tensor]:
    """The index batches of one epoch (split_batches): a permutation fixed by (seed, epoch), so an
    interrupted run can resume in the middle of an epoch and see exactly the batches it would have seen.
    The order is the seed's permutation (a generator seeded with ``seed``) read in the epoch's order (one
    seeded with ``epoch``), so different (seed, epoch) pairs never share their generators: a torch.Generator
    keeps only the low 32 bits of its seed, and one keyed by a mix of the two, such as seed · 1000003 +
    epoch, gave seed 1000003⁻¹ mod 2^32 the batches of seed 0 one epoch later. ``epoch`` < 2^32.

    ``shard`` = (rank, world size): this rank's examples, every world-size-th of the permutation from
    ``rank`` on, after it is padded with its own first examples to a multiple of the world size (as
    DistributedSampler): every rank gets shard_size examples, so all take the same number of steps. When
    the size is a multiple of world size × batch size (no padding, no short batch), the ranks' batch i
    together are batch i of the unsharded epoch with world-size times the batch size.
    """
    rank, world_size = shard
    seed_order, epoch_order = (torch.randperm(len(dataset), generator=torch.Generator().manual_seed(key))
                               for key in (seed, epoch))
    order = seed_order[epoch_order]
    if world_size > 1 and len(order):
        padded = shard_size(len(order), world_size) * world_size
        order = order.repeat(shard_size(padded, len(order)))[:padded][rank::world_size]
    return split_batches(order, batch_size)


def fetch(dataset: Dataset, indices: torch.Tensor, device, class_indices: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (inputs, targets) of ``dataset`` at ``indices`` on ``device``: each example an (input, target)
    pair, stacked as they come. With ``class_indices`` (what the default cross_entropy and accuracy read)
    integer or bool targets become int64, one per example (an (N, 1) column squeezed to (N,)); float ones
    keep their dtype and shape. Without it (a loss of the caller's, whose targets are its own: a language
    model's one-token sequences stay (N, 1)) every target stays as stacked. A TensorDataset of two tensors
    whose examples are its own (not a subclass's) is sliced directly. ValueError for examples that are no
    pairs, whose inputs (or targets) differ in shape, or that lie on the meta device while ``device`` does
    not."""
    if type(dataset).__getitem__ is TensorDataset.__getitem__ and len(dataset.tensors) == 2:
        inputs, targets = (t[indices] for t in dataset.tensors)
    else:
        samples = [dataset[int(i)] for i in indices]
        odd = next((s for s in samples if not isinstance(s, (tuple, list)) or len(s) != 2), None)
        if odd is not None:
            got = f"{len(odd)} items" if isinstance(odd, (tuple, list)) else type(odd).__name__
            raise ValueError(f"the data's examples must be (input, target) pairs, got {got}")
        inputs, targets = (_stacked(part, indices, [torch.as_tensor(s[item]) for s in samples])
                           for item, part in enumerate(("inputs", "targets")))
    if (inputs.is_meta or targets.is_meta) and torch.device(device).type != "meta":  # .to would raise
        raise ValueError(f"the data's examples lie on the meta device, with no values to copy to {device}")
    if class_indices and not (targets.is_floating_point() or targets.is_complex()):  # as cross_entropy takes them
        targets = targets.long()
        if targets.dim() == 2 and targets.shape[1] == 1:
            targets = targets.squeeze(1)
    return inputs.to(device), targets.to(device)


def _stacked(part: str, indices: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of the examples' ``part`` (inputs or targets) read at ``indices``; ValueError naming the
    first two examples of different shapes, which do not stack (torch's RuntimeError named neither)."""
    other = next((i for i, tensor in enumerate(tensors) if tensor.shape != tensors[0].shape), None)
    if other is not None:
        raise ValueError(f"the data's examples must have {part} of one shape to batch, got {tuple(tensors[0].shape)} "
                         f"for example {int(indices[0])} and {tuple(tensors[other].shape)} for example "
                         f"{int(indices[other])}")
    return torch.stack(tensors)


def forked_random_state():
    """torch.random.fork_rng over the CPU's generator and every initialised GPU's (none while CUDA is not
    initialised: nothing there has drawn yet, and reading its state would initialise it)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def modes_kept(model: nn.Module):
    """Every module's train/eval mode as it was once the block ends, each its own (a Dropout left in eval
    inside a model in train mode stays so), also after an error."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def check_targets(owner: str, model: nn.Module, dataset: Dataset, inputs: torch.Tensor, targets: torch.Tensor,
                  evaluated: bool = False, loss_fn=None) -> None:
    """ValueError naming ``owner`` where the model's outputs for ``inputs`` (a few examples, run in eval
    mode without gradients; every module's mode and the random streams are restored after) and ``targets``
    cannot go together in ``loss_fn``. A loss of the caller's (not None): its shapes are its own (the
    outputs need not even be batch-first: (tokens, batch, vocabulary), or batch and tokens flattened), so
    loss_fn(outputs, targets) must just run and give a single value (a ValueError naming the error
    otherwise: a loss that fails on targets of another batch size says so). None, cross_entropy: class
    indices outside [0, classes) other than its ignore_index -100 (all of a TensorDataset's targets, else
    the examples'), class indices of another shape than the outputs less their class dim, or float targets
    (probabilities) of another shape than the outputs. Classes are
    dim 1 of the outputs ((N, C) or dense (N, C, ...)). A forward that fails on so few examples (a batch
    norm without running statistics) or outputs of fewer than 2 dims are left to training, unless the data
    are ``evaluated`` only (validation, test: run just so, after all the training), where a failing
    forward is a ValueError (TypeError for a TypeError) naming ``owner`` and the error."""
    try:
        with modes_kept(model), forked_random_state(), torch.no_grad():
            outputs = model.eval()(inputs)
    except torch.cuda.OutOfMemoryError:  # a resource, not a model that does not fit the data
        raise
    except Exception as error:  # training raises the real error, with its own trace
        if not evaluated:
            return
        kind = TypeError if isinstance(error, TypeError) else ValueError
        raise kind(f"{owner}: the model's forward (eval mode, no gradients) failed on its first examples, inputs "
                   f"of shape {tuple(inputs.shape)} and dtype {inputs.dtype}: {type(error).__name__}: {error}") \
            from error
    if loss_fn is not None:
        _check_loss(owner, loss_fn, outputs, targets)
        return
    if not (isinstance(outputs, torch.Tensor) and outputs.dim() >= 2 and len(outputs) == len(inputs)):
        return
    if targets.is_floating_point() or targets.is_complex():
        if targets.shape != outputs.shape:
            raise ValueError(f"{owner}: float targets (probabilities) of shape {tuple(targets.shape)} but the model's "
                             f"outputs have shape {tuple(outputs.shape)}")
        return
    indices_shape = outputs.shape[:1] + outputs.shape[2:]
    if targets.shape != indices_shape:
        # A language model's (batch, tokens, vocabulary) logits with next-token targets: say what trains it.
        last_dim = outputs.dim() > 2 and targets.shape == outputs.shape[:-1]
        hint = ("; these targets fit classes in the last dim (a sequence model's (batch, tokens, classes) "
                "logits), which the default cross_entropy and accuracy do not read: prune such a model with "
                "a loss of your own, prune(..., loss_fn=...), e.g. cross_entropy(logits.flatten(0, -2), "
                "targets.flatten())") if last_dim else ""
        raise ValueError(f"{owner}: class-index targets of shape {tuple(targets.shape)}, but the model's outputs of "
                         f"shape {tuple(outputs.shape)} take {tuple(indices_shape)} (one class index per output, "
                         f"classes in dim 1){hint}")
    if type(dataset) is TensorDataset and len(dataset.tensors) == 2 and not dataset.tensors[1].is_floating_point():
        targets = dataset.tensors[1]
    classes = outputs.shape[1]
    outside = targets[((targets < 0) & (targets != -100)) | (targets >= classes)]
    if outside.numel():
        raise ValueError(f"{owner}: target {int(outside[0])} is not a class index of the model's {classes} classes "
                         f"(0 to {classes - 1}, or cross_entropy's ignore_index -100)")


def _checked_read(owner: str, model: nn.Module, dataset: Dataset, indices: torch.Tensor,
                  class_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fetch of ``indices`` for a check, on the model's device, drawing nothing from the caller's random
    streams (a dataset that draws as it reads, random augmentation, would move the stream training draws
    from next, and a resumed run, whose state is restored before its checks, would differ). A read that fails
    (examples that are no (input, target) pairs, inputs that do not stack, examples on the meta device) is an
    error of its own type (ValueError for another) naming ``owner`` and the error."""
    try:
        with forked_random_state():
            return fetch(dataset, indices, model_device(model), class_indices)
    except (ValueError, TypeError, IndexError) as error:  # an exception's own type where it rebuilds so
        kind = type(error) if type(error) in (ValueError, TypeError, IndexError) else ValueError
        raise kind(f"{owner}: {type(error).__name__}: {error}") from error


def check_examples(owner: str, model: nn.Module, dataset: Dataset, evaluated: bool = False, loss_fn=None) -> None:
    """check_targets on the first two examples of ``dataset`` (nothing for empty data), read by
    _checked_read (an error naming ``owner`` where the read fails)."""
    if not len(dataset):
        return
    examples = _checked_read(owner, model, dataset, torch.arange(min(len(dataset), 2)), loss_fn is None)
    check_targets(owner, model, dataset, *examples, evaluated=evaluated, loss_fn=loss_fn)


def check_training_data(owner: str, model: nn.Module, dataset: Dataset, epochs: int, batch_size: int, seed: int,
                        loss_fn=None) -> None:
    """What a solver checks of its training data before it changes ``model`` (its settings and check_data
    checked first), unless ``epochs`` is 0 (the data are not read): check_examples, then check_forward.
    Training would raise the same errors from inside, with the model converted by then. prune runs them
    itself, on every split."""
    if not epochs:
        return
    check_examples(owner, model, dataset, loss_fn=loss_fn)
    check_forward(owner, model, dataset, batch_size, seed)


def _check_loss(owner: str, loss_fn, outputs, targets: torch.Tensor) -> None:
    """check_targets for a loss of the caller's: ``loss_fn`` runs on ``outputs`` and ``targets`` and gives
    one value."""
    described = f"outputs of shape {tuple(outputs.shape)}" if isinstance(outputs, torch.Tensor) else \
        f"outputs of type {type(outputs).__name__}"
    try:
        loss = loss_fn(outputs, targets)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        raise ValueError(f"{owner}: loss_fn failed on the model's {described} and targets of shape "
                         f"{tuple(targets.shape)}: {type(error).__name__}: {error}") from error
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{owner}: loss_fn must give one value (a tensor to call backward on), got {got} for the "
                         f"model's {described} and targets of shape {tuple(targets.shape)}")


@torch.no_grad()
def check_forward(owner: str, model: nn.Module, dataset: Dataset, batch_size: int, seed: int) -> None:
    """ValueError (TypeError for a TypeError) naming ``owner`` and the error where the forward of ``model``
    fails on the first batch that training takes (epoch_batches(seed, epoch 0), this rank's share of a
    DistributedDataParallel model's): inputs of a size or dtype the model does not take. A solver calls it
    before it converts the model, which an error in training would leave converted.

    The batch is read by _checked_read (an error naming ``owner`` where the read fails). The forward runs in
    eval mode without gradients, every module's mode and the random streams restored after, so batch-norm
    statistics, dropout and the caller's random stream stay as they were. A forward that fails only in
    training mode (a batch norm on one value per channel) is left to training. Empty data: nothing to run.
    Running out of memory is raised as it is.
    """
    batches = epoch_batches(dataset, batch_size, seed, 0, data_shard(model))
    if not batches:
        return
    inputs, _ = _checked_read(owner, model, dataset, batches[0])
    try:
        with modes_kept(model), forked_random_state():
            model.eval()(inputs)
    except torch.cuda.OutOfMemoryError:  # a resource, not a model that does not fit the data
        raise
    except Exception as error:
        kind = TypeError if isinstance(error, TypeError) else ValueError
        raise kind(f"{owner}: the model's forward (eval mode, no gradients) failed on the first training batch, "
                   f"inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype}: {type(error).__name__}: "
                   f"{error}") from error


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s data go: the device of its first parameter, else of its first buffer, else the
    CPU (a model or shard with neither, e.g. a stage of activations)."""
    tensor = next(model.parameters(), None)
    tensor = next(model.buffers(), None) if tensor is None else tensor
    return torch.device("cpu") if tensor is None else tensor.device


def _evaluated_batches(owner: str, model: nn.Module, dataset: Dataset, batch_size: int, loss_fn=None):
    """(outputs, targets) of ``model``, set to eval mode, for ``dataset`` in order, batches of ``batch_size``
    (the last one shorter; none for empty data), the targets as fetch gives them for ``loss_fn`` (None:
    class indices, for cross_entropy and the accuracy); TypeError or ValueError naming ``owner`` for a model
    that is no nn.Module, a dataset that is not map-style, a batch size that is no int >= 1, or first examples
    that the model or ``loss_fn`` cannot take (check_examples), before anything runs."""
    check_module(owner, model)
    check_settings(owner, batch_size=batch_size)
    check_dataset(owner, "dataset", dataset)
    check_examples(owner, model, dataset, evaluated=True, loss_fn=loss_fn)
    model.eval()
    device = model_device(model)
    # No batch at all for empty data: fetch cannot stack no examples.
    for indices in torch.arange(len(dataset)).split(batch_size) if len(dataset) else ():
        inputs, targets = fetch(dataset, indices, device, loss_fn is None)
        yield model(inputs), targets


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode): targets are class indices, one per example
    ((N,) or (N, 1)), or float targets (probabilities, one-hot rows) of the outputs' shape (N, C > 1),
    whose most likely class counts (the first of equals), as training takes both."""
    correct = 0
    for outputs, targets in _evaluated_batches("evaluate", model, dataset, batch_size):
        predicted = outputs.argmax(1)
        if targets.is_floating_point() and targets.shape == outputs.shape and outputs.shape[1] > 1:
            targets = targets.argmax(1)
        if targets.numel() != predicted.numel():
            raise ValueError(f"evaluate: the targets of a batch have shape {tuple(targets.shape)}, not one class "
                             f"index per example ({predicted.numel()})")
        correct += int((predicted == targets.reshape(predicted.shape)).sum())
    return correct / max(len(dataset), 1)


@torch.no_grad()
def mean_loss(model: nn.Module, dataset: Dataset, loss_fn=None, batch_size: int = 256) -> float:
    """``loss_fn(outputs, targets)`` of ``model`` (eval mode) over ``dataset`` in batches of ``batch_size``,
    each batch's value weighted by its examples: the mean per example of a loss that averages over its
    batch (as cross_entropy's default does; a token loss averages over tokens, so batches of unequal
    token counts weigh by examples, not tokens). The targets reach ``loss_fn`` as training gives them:
    stacked as they come, or as class indices for None (cross_entropy, training_loss). Empty data: nan."""
    total = 0.0
    batches = _evaluated_batches("mean_loss", model, dataset, batch_size, loss_fn)
    loss_fn = training_loss(loss_fn)
    for outputs, targets in batches:
        total += float(loss_fn(outputs, targets)) * len(targets)
    return total / len(dataset) if len(dataset) else math.nan


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> None:
    """Recompute every batch norm's running statistics under the current masks (a pass over ``dataset``
    in train mode, cumulative averages): without it a pruned network can fall to chance accuracy. Empty
    data leave the statistics as they are (reset, they would be 0 and 1: chance accuracy again)."""
    check_module("recalibrate_batchnorm", model)
    check_settings("recalibrate_batchnorm", batch_size=batch_size)
    check_dataset("recalibrate_batchnorm", "dataset", dataset)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(dataset):
        return
    check_forward("recalibrate_batchnorm", model, dataset, batch_size, 0)  # before the statistics are reset
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    with modes_kept(model):
        model.train()
        device = model_device(model)
        for indices in split_batches(torch.arange(len(dataset)), batch_size):
            model(fetch(dataset, indices, device)[0])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


class Progress:
    """A progress line: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.started = time.perf_counter()
        self.interactive = self.stream.isatty()
        # Under torch.distributed the ranks run the same loop: one line from rank 0 says it all.
        self.shown = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                          and torch.distributed.get_rank() != 0)

    def update(self, done: int, **fields) -> None:
        if not self.shown:
            return
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


_PARTIAL = ".partial-"  # temporary files are NAME.partial-RANDOM.tmp beside NAME


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_UMASK = _umask()  # read once: setting it to read it is not thread-safe


def _write_atomically(path: str | Path, write) -> None:
    """``write(file)`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``:
    ``path`` is always either the old file or the whole new one, even if the process is killed. A kill
    (SIGKILL) mid-write can leave the temporary file behind; remove_temporaries clears it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + _PARTIAL, suffix=".tmp")
    try:
        try:  # mkstemp makes it 0600; a file written plainly gets 0666 less the umask
            os.chmod(temporary, 0o666 & ~_UMASK)
        except OSError:  # a file system without modes: the save matters more
            pass
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a crash of the machine, not only of the process
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def save_atomically(obj, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically: never a half-written file (see _write_atomically)."""
    _write_atomically(path, lambda file: torch.save(obj, file))


def write_text_atomically(text: str, path: str | Path) -> None:
    """``text`` (UTF-8) to ``path`` atomically."""
    _write_atomically(path, lambda file: file.write(text.encode()))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that atomic writes into ``folder`` left when their process was killed;
    returns them. Call it only while no other process writes there."""
    leftovers = sorted(Path(folder).glob(f"*{_PARTIAL}*.tmp"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def random_state() -> dict:
    """The generators training draws from (dropout, shuffles): "rng", the CPU's, and "cuda_rng", every
    GPU's once CUDA is in use (None before: reading it would initialise CUDA)."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_random_state(state: dict) -> None:
    """Restore what random_state saved (a state without "cuda_rng", from an older save, sets the CPU's)."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


_TRAINING_STATE = {"model", "optimizer", "schedule", "epoch", "passes", "rng"}  # what on_epoch gets


def train_weights(model: nn.Module, dataset: Dataset, epochs: int, lr: float = 0.05, batch_size: int = 64,
                  seed: int = 0, weight_decay: float = 1e-4, schedule: str = "cosine", label: str = "train",
                  loss_fn=None, *, first_epoch: int = 0, start: dict | None = None,
                  on_epoch=None) -> int:
    """SGD (momentum 0.9) on every parameter but the mask scores, masks fixed, on ``loss_fn(outputs,
    targets)`` (None: cross_entropy, training_loss); returns the passes spent
    (those of the call that saved ``start`` included). A DistributedDataParallel ``model`` trains on its
    rank's share of each epoch (epoch_batches, data_shard), and a check that fails on one rank raises on
    every rank (checked_together). Epoch i takes the batches of epoch
    ``first_epoch`` + i of ``seed`` (epoch_batches): calls that continue one run (IMP's rounds) give it
    their epochs done so far, so that no two of them, nor two seeds' runs, see the same batches.

    ``on_epoch(state)`` runs after each epoch with the training state: the model, optimizer and schedule
    state_dicts, ``epoch`` (epochs done), ``passes`` and the RNG states (random_state), in live tensors that later
    epochs change (save or copy them); it returns True to stop there. ``start``: such a state, saved by a
    call with the same arguments; training continues after its epoch and ends with exactly the model of a
    call never stopped. ``label`` (a str) names the progress line.
    """
    check_module("train_weights", model)
    with checked_together("train_weights", model):
        check_settings("train_weights", epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                       weight_decay=weight_decay, schedule=schedule, first_epoch=first_epoch, loss_fn=loss_fn,
                       label=label)
        if first_epoch + epochs > 2**32:  # epoch_batches' generators keep 32 bits: epoch 2^32 would be epoch 0
            raise ValueError(f"train_weights: first_epoch + epochs must be at most 2^32, got {first_epoch} + "
                             f"{epochs}")
        if on_epoch is not None and not callable(on_epoch):
            raise TypeError(f"train_weights: on_epoch must be callable or None, got {on_epoch!r}")
        if start is not None and not (isinstance(start, dict) and _TRAINING_STATE <= start.keys()
                                      and isinstance(start["epoch"], int) and 0 <= start["epoch"] <= epochs):
            got = f"keys {sorted(start)}, epoch {start.get('epoch')!r}" if isinstance(start, dict) else repr(start)
            raise ValueError(f"train_weights: start must be a state given to on_epoch (keys "
                             f"{sorted(_TRAINING_STATE)}, epoch in [0, {epochs}]), got {got}")
        epochs_left = epochs - (start["epoch"] if start is not None else 0)  # a resumed run reads only those
        check_data("train_weights", dataset, epochs_left)
        check_training_data("train_weights", model, dataset, epochs_left, batch_size, seed, loss_fn)
    class_indices, loss_fn = loss_fn is None, training_loss(loss_fn)  # targets for cross_entropy, or as given
    score_ids = {id(layer.scores) for _, layer in masked_layers(model)}
    weights = [p for p in model.parameters() if id(p) not in score_ids]
    optimizer = torch.optim.SGD(weights, lr=lr, momentum=0.9, weight_decay=weight_decay)
    shard = data_shard(model)
    examples = shard_size(len(dataset), shard[1])  # per rank and epoch
    schedule_ = scheduler(optimizer, schedule, max(epochs * batch_count(examples, batch_size), 1))
    first, passes = 0, 0
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        schedule_.load_state_dict(start["schedule"])
        set_random_state(start)
        first, passes = start["epoch"], start["passes"]
    device = model_device(model)
    progress = Progress(epochs, label)
    for epoch in range(first, epochs):
        model.train()
        total = 0.0
        for indices in epoch_batches(dataset, batch_size, seed, first_epoch + epoch, shard):
            inputs, targets = fetch(dataset, indices, device, class_indices)
            model.zero_grad(set_to_none=True)  # the scores' gradients too: no optimiser here clears them
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            schedule_.step()
            total += float(loss.detach()) * len(indices)
            passes += 1
        progress.update(epoch + 1, loss=total / max(examples, 1))
        if on_epoch is not None and on_epoch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "schedule": schedule_.state_dict(), "epoch": epoch + 1,
                                              "passes": passes, **random_state()}):
            break
    for _, layer in masked_layers(model):  # no optimiser here reads them: nothing to keep after training
        layer.scores.grad = None
    return passes
