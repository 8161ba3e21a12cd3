"""`prune`: any method end to end, with one result record."""

from __future__ import annotations

import functools
import inspect
import re
import time
import warnings

import torch
from torch import nn

from .. import nn as masked_nn
from ..structures import parse_structure
from .bip import BiP, check_levels, steps_per_epoch
from .hydra import hydra
from .imp import check_rewind_state, imp, imp_rounds
from .omp import omp, random_prune
from .training import (SETTINGS, check_dataset, check_examples, check_forward, check_masked_structure, check_settings,
                       checked_together, data_shard, evaluate, forked_random_state, mean_loss, recalibrate_batchnorm)

METHODS = ("bip", "omp", "imp", "hydra", "random")
# What each method runs: prune's options go to it as keyword arguments.
_RUNS = {"bip": BiP, "omp": omp, "imp": imp, "hydra": hydra, "random": random_prune}
# Its arguments that prune computes from its own, under other names.
_COMPUTED = {"bip": {"total_steps": "computes it from epochs and the data (build a bipkernels.BiP to set it)"},
             "hydra": {"score_epochs": "sets it to epochs"}, "imp": {"epochs_per_round": "sets it to finetune_epochs"}}


def _method_options(method: str) -> list[str]:
    """The options that ``prune`` passes on to ``method``, in the order of its signature: the arguments with a
    default of what the method runs, less those that prune sets (its own arguments, and _COMPUTED)."""
    own = inspect.signature(prune).parameters
    return [name for name, parameter in inspect.signature(_RUNS[method]).parameters.items()
            if parameter.default is not parameter.empty and name not in own and name not in _COMPUTED.get(method, {})]


def _named_by(owner: str):
    """Decorator: a ValueError or TypeError (exactly those types: a subclass is the caller's to catch as it is)
    that escapes the function and does not name ``owner`` first ("owner:", or Python's "owner()" for
    arguments that do not bind) gets "``owner``: " before its message, the original chained. Errors from what
    the function runs (bipkernels.convert for its exclude, IMP's rewind_state check, the method's own checks,
    a loss_fn of the caller's) then name what the user called, and still say where they came from:
    "prune: bipkernels.convert: exclude names no module ..."."""
    def decorate(function):
        @functools.wraps(function)
        def named(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (ValueError, TypeError) as error:
                if type(error) not in (ValueError, TypeError) or str(error).startswith((f"{owner}:", f"{owner}(")):
                    raise
                raise type(error)(f"{owner}: {error}") from error
        return named
    return decorate


@_named_by("prune")
def prune(model: nn.Module, train_data, method: str = "bip", sparsity: float = 0.9, *, structure=None,
          scope: str = "global", val_data=None, test_data=None, epochs: int = 10, finetune_epochs: int = 10,
          batch_size: int = 64, seed: int = 0, rewind_state: dict | None = None, exclude=(), loss_fn=None,
          **options):
    """Prune a trained ``model`` (in place) with ``method`` and return (model, result).

    bip: ``epochs`` of BiP. omp, random: one shot, then ``finetune_epochs``. hydra: ``epochs`` of score search, then
    ``finetune_epochs``. imp: rounds of 20% with ``finetune_epochs`` each, rewinding to ``rewind_state``.
    Before evaluation the batch-norm statistics are recalibrated on ``train_data`` under the final masks.
    ``val_data`` / ``test_data``: None, or evaluated at the end; every split given must hold examples.
    ``seed`` fixes the batches and every draw from torch's generators (dropout): the run draws from
    generators of its own, seeded with it, so one call gives one model and the caller's stream is untouched.
    ``structure``: None is unstructured for a model without masked layers and the layers' own otherwise.
    Every method prunes a model that has masked layers in those alone (its plain layers stay dense) and
    converts every nn.Conv2d / nn.Linear of one that has none, but those in ``exclude`` (module names, as
    bipkernels.convert takes them: e.g. a first convolution that M does not divide the channels of, for N:M).
    ``options`` go to what the method runs (BiP, omp, random_prune, hydra, imp): its keyword arguments that
    prune does not set itself, e.g. bip's mode, lr, score_lr, inv_gamma; imp's lr, rate. One it does not
    take is a TypeError that lists those it does, raised before the model changes.
    ``loss_fn(outputs, targets)``: what every method trains on (BiP's and HYDRA's score search, every
    fine-tuning and retraining), a scalar tensor; None: cross_entropy, classes in dim 1. A language model's
    (batch, tokens, vocabulary) logits with next-token targets (batch, tokens) prune with e.g.
    ``lambda logits, targets: cross_entropy(logits.flatten(0, -2), targets.flatten())``. Before the model
    changes, loss_fn must run on two examples of each split and give one value (the targets' shapes are the
    loss's own business; the default checks the class indices against the outputs).

    result: method, target and reached global sparsity, per-layer sparsity, validation and test accuracy
    (when the data are given and loss_fn is None; else None: a loss of the caller's defines no accuracy),
    validation and test loss (when the data are given and loss_fn is not None: mean_loss, its mean per
    example in eval mode; else None), wall time, training epochs and forward/backward passes spent.
    """
    masked_nn.check_module("prune", model)
    # Under DistributedDataParallel a check of this rank's share of the data may fail here alone.
    with checked_together("prune", model):
        if method not in METHODS:
            raise ValueError(f"prune: method must be one of {METHODS}, got {method!r}")
        computed = next((name for name in options if name in _COMPUTED.get(method, {})), None)
        if computed is not None:
            raise ValueError(f"prune: {computed}={options[computed]!r}: prune {_COMPUTED[method][computed]}")
        accepted = _method_options(method)
        unknown = [name for name in options if name not in accepted]
        if unknown:
            raise TypeError(f"prune: method {method!r} takes no option {', '.join(map(repr, unknown))} (its options: "
                            f"{', '.join(accepted)}; besides prune's own arguments)")
        if rewind_state is not None and method != "imp":
            raise ValueError(f"prune: rewind_state is IMP's (the weights its rounds rewind to); method {method!r} "
                             "takes none")
        given = structure
        if structure is None:  # BiP and HYDRA take None as it is
            structure = "unstructured"
        if (isinstance(exclude, str) or exclude) and masked_nn.masked_layers(model):
            raise ValueError(f"prune: exclude={exclude!r}, but the model is already masked: its plain layers stay "
                             "dense as they are, and exclude names layers to leave out of converting an unmasked model")
        check_settings("prune", sparsity=sparsity, structure=structure, scope=scope, epochs=epochs,
                       finetune_epochs=finetune_epochs, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
        check_masked_structure("prune", model, given)
        for name, data in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
            if data is not None or name == "train_data":  # before the model changes, not after the run
                check_dataset("prune", name, data)
                if not len(data):  # fetch cannot stack no examples; an empty split would score 0.0 or train nothing
                    raise ValueError(f"prune: {name} holds no examples: " + (
                        "nothing would train" if name == "train_data" else f"give {name}=None to skip its evaluation"))
                check_examples(f"prune: {name}", model, data, evaluated=name != "train_data", loss_fn=loss_fn)
        # The method's own settings too, before a convert with exclude changes the model (the method checks
        # them again, as it runs: its bad setting would have left the model converted, and a retry refused).
        check_settings("prune", **{name: value for name, value in options.items() if name in SETTINGS})
        if method == "imp":
            check_rewind_state(model, rewind_state)
        if method == "bip":
            check_levels("prune", options.get("mode", "fused"), options.get("lower_steps", 1))
            steps = epochs * steps_per_epoch(len(train_data), batch_size, options.get("mode", "fused"),
                                             options.get("lower_steps", 1), data_shard(model)[1])
            if epochs and not steps:  # before BiP converts the model
                raise ValueError(f"prune: {len(train_data)} examples in batches of batch_size={batch_size} give no BiP "
                                 f"step ({options.get('mode', 'fused')} mode): nothing would train")
        check_forward("prune", model, train_data, batch_size, seed)  # the last check: it runs the model
    if isinstance(exclude, str) or exclude:  # checks its names before it changes the model
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="bipkernels.convert: nothing to mask")  # the error says it
            masked_nn.convert(model, 0.0, structure, scope, exclude=exclude)
        if not masked_nn.masked_layers(model):  # every method would convert the model whole: all of it pruned
            raise ValueError(f"prune: exclude={exclude!r} leaves no nn.Conv2d or nn.Linear to prune")
    # N:M layers keep N of every M whatever the sparsity: said once, by prune, whichever method converts (random
    # and imp convert at sparsity 0, as does a convert with exclude, and would say nothing).
    pruned_structures = {layer.structure for _, layer in masked_nn.masked_layers(model)} or \
        {parse_structure(structure, owner="prune")}
    for ignored in filter(None, (masked_nn.nm_sparsity_ignored("prune", kept, sparsity) for kept in pruned_structures)):
        warnings.warn(ignored, stacklevel=3)  # the caller's line: prune is wrapped by _named_by
    # Every initialised GPU's generator seeded too (dropout on a GPU draws from its own); an uninitialised
    # CUDA is left alone: torch.manual_seed would queue a seed for its first use.
    with forked_random_state(), warnings.catch_warnings():
        # convert's own words for what prune said above, those alone: a pattern of the structure's spelling
        # let 2:4 (p=2)'s through, and would hide a warning prune did not give.
        for duplicate in filter(None, (masked_nn.nm_sparsity_ignored("bipkernels.convert", kept, sparsity)
                                       for kept in pruned_structures)):
            warnings.filterwarnings("ignore", message=re.escape(duplicate))
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
        started = time.perf_counter()
        common = dict(structure=structure, scope=scope, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
        if method == "bip":
            solver = BiP(model, sparsity, given, scope, total_steps=max(steps, 1), **options)
            solver.fit(train_data, epochs, batch_size, seed, loss_fn)
            passes, spent = solver.passes, epochs
        elif method in ("omp", "random"):
            run = omp if method == "omp" else random_prune
            passes, spent = run(model, train_data, sparsity, finetune_epochs=finetune_epochs, **common, **options), \
                finetune_epochs
        elif method == "hydra":
            passes = hydra(model, train_data, sparsity, score_epochs=epochs, finetune_epochs=finetune_epochs,
                           **{**common, "structure": given}, **options)
            spent = epochs + finetune_epochs
        else:
            passes = imp(model, train_data, sparsity, rewind_state=rewind_state, epochs_per_round=finetune_epochs,
                         **common, **options)
            spent = len(imp_rounds(sparsity, options.get("rate", 0.2))) * finetune_epochs
        recalibrate_batchnorm(model, train_data)
    result = {
        "method": method,
        "structure": ", ".join(sorted({str(layer.structure) for _, layer in masked_nn.masked_layers(model)})),
        "target_sparsity": sparsity,
        "sparsity": masked_nn.sparsity(model),
        "layers": {name: 1.0 - float(layer.mask().float().mean()) for name, layer in masked_nn.masked_layers(model)},
        "val_accuracy": evaluate(model, val_data) if val_data is not None and loss_fn is None else None,
        "test_accuracy": evaluate(model, test_data) if test_data is not None and loss_fn is None else None,
        "val_loss": mean_loss(model, val_data, loss_fn) if val_data is not None and loss_fn is not None else None,
        "test_loss": mean_loss(model, test_data, loss_fn) if test_data is not None and loss_fn is not None else None,
        "wall_time_s": time.perf_counter() - started,
        "epochs": spent,
        "passes": passes,
    }
    return model, result
