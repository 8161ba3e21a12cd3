"""BiP: pruning as bi-level optimisation (Zhang et al., NeurIPS 2022), over a model with masked layers.

    upper:  min over m in S_k of l(m ⊙ θ*(m))     (scores s, m = Proj_k(s), straight-through)
    lower:  θ*(m) = argmin_θ l(m ⊙ θ) + (γ/2)‖θ‖²

One backward of the masked layers gives both gradients (bipkernels.ops.hypergrad):
weight.grad = m ⊙ g and scores.grad = sign(s) ⊙ (θ ⊙ g − inv_gamma · I), with I = m ⊙ g ⊙ g
(``implicit="paper"``) or (θ ⊙ g)² (``"released"``, the official code's G1 ⊙ G2); sign(s) because the
mask ranks |s|. After every score step the scores are
projected back to exactly k kept blocks.

Modes: ``"faithful"`` alternates as the paper does: ``lower_steps`` SGD steps on the weights, each on its
own batch, then one score step on the next batch. ``"fused"`` takes both steps from one forward and one
backward, so an iteration costs about one dense training step.

Memory: stepping the scores inside the backward, each layer's as soon as its gradient is complete, and
dropping the gradient at once keeps no score gradient: a step holds the scores and their momentum over a
dense step (2·W instead of 3·W for W the bytes of the masked weights; benchmarks/test_memory.py), with the
same result as stepping after the backward. ``step_scores_in_backward``: None (default) does so in
``fit``, whose closures are the solver's own, and not in ``step``, whose closure may clip or unscale
gradients after its backward (the scores would have stepped already); True or False in both. It is off
under torch.distributed (the gradient all-reduce ends after the backward) and when the scores lie on
several devices (their hooks would run on several autograd threads at once).

The lower level's (γ/2)‖θ‖² is ordinary weight decay (``weight_decay``, 1e-4 in the released configs);
``inv_gamma`` (1e-4 there) only scales the implicit term: they are separate settings, as the released
code has them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import distributed
from .. import nn as masked_nn
from ..ops import check_int
from ..structures import Structure
from .training import (Progress, batch_count, check_dataset, check_masked_structure, check_settings,
                       check_training_data, checked_together, data_shard, ddp_wrapper, epoch_batches, fetch,
                       model_device, nothing_to_mask, random_state, scheduler, set_random_state, shard_size,
                       training_loss)


def steps_per_epoch(dataset_size: int, batch_size: int, mode: str = "fused", lower_steps: int = 1,
                    world_size: int = 1) -> int:
    """Iterations in one epoch of BiP.fit: the epoch's batches (epoch_batches: the last may be short) in
    groups of one (fused) or lower_steps + 1 (faithful), a trailing remainder skipped. Use it for
    ``total_steps``. ``world_size``: the ranks a DistributedDataParallel model splits each epoch over
    (``batch_size`` is then per rank)."""
    check_settings("steps_per_epoch", batch_size=batch_size, mode=mode, lower_steps=lower_steps,
                   world_size=world_size)
    check_int("steps_per_epoch", "dataset_size", dataset_size)
    return batch_count(shard_size(dataset_size, world_size), batch_size) // (1 if mode == "fused" else lower_steps + 1)


def check_levels(owner: str, mode: str, lower_steps: int) -> None:
    """ValueError naming ``owner`` for lower-level steps of their own in fused mode."""
    if mode == "fused" and lower_steps != 1:
        raise ValueError(f"{owner}: lower_steps={lower_steps} needs mode='faithful': fused mode takes both levels' "
                         "steps from one backward")


class BiP:
    """The BiP solver. Converts ``model`` (in place) if it has no masked layers yet.

    ``step(closure)`` (fused) or ``step(lower_closure, upper_closure)`` (faithful) follow torch.optim:
    a closure zeroes nothing, runs forward and backward, and returns the loss. ``fit`` runs whole epochs.
    ``state_dict`` holds everything a resumed run needs (model, both optimisers and schedules, iteration,
    RNG state).

    Learning rates: ``lr`` 0.1 for the weights, as the released configs (cosine); ``score_lr`` 0.01 for
    the scores (the released code ignores its own and steps scores at the weights' rate). On the digits
    job both matter most at high sparsity: lr 0.01 gave 68.8% at 98% (0.1: 81.4%), score lr 0.05 let the
    classifier lose all but one weight (see README, BiP against the baselines).

    ``structure``: what ``convert`` masks a model without masked layers with (None: unstructured). A model
    already masked keeps its layers' structures: None accepts them, any other value must equal them all.

    ``group`` (a torch.distributed process group, e.g. torch.distributed.group.WORLD): ``model`` is this
    rank's shard of the masked layers and the projection keeps the top blocks of all ranks together
    (bipkernels.distributed.project; every rank steps together). Under DistributedDataParallel leave it
    None: every rank holds every layer and the same scores, so the local projection is already global.
    """

    def __init__(self, model: nn.Module, sparsity: float, structure=None, scope: str = "global", *,
                 mode: str = "fused", lr: float = 0.1, score_lr: float = 0.01, momentum: float = 0.9,
                 score_momentum: float = 0.9, weight_decay: float = 1e-4, inv_gamma: float = 1e-4,
                 implicit: str = "paper", lower_steps: int = 1, schedule: str = "cosine",
                 score_schedule: str = "cosine", total_steps: int = 1000, step_scores_in_backward: bool | None = None,
                 group=None):
        to_convert = "unstructured" if structure is None else structure  # for a model without masked layers
        self.model, self.sparsity, self.scope = model, sparsity, scope
        self.mode, self.lower_steps = mode, lower_steps
        self.step_scores_in_backward = step_scores_in_backward
        self._failure = None  # why the state matches no run, after a step failed halfway
        self.group = group
        distributed.check_group("BiP", group)  # before the model changes, and before raise_together uses it
        # Under a group (or DistributedDataParallel) every check in here raises on every rank: a rank that raised
        # alone would leave the others waiting in the projection.
        with checked_together("BiP", model, group):
            check_settings("BiP", sparsity=sparsity, structure=to_convert, scope=scope, mode=mode, lr=lr,
                           score_lr=score_lr, momentum=momentum, score_momentum=score_momentum,
                           weight_decay=weight_decay, inv_gamma=inv_gamma, implicit=implicit,
                           lower_steps=lower_steps, schedule=schedule, score_schedule=score_schedule,
                           total_steps=total_steps, step_scores_in_backward=step_scores_in_backward)
            check_levels("BiP", mode, lower_steps)
            masked_nn.check_module("BiP", model)
            if group is not None and ddp_wrapper(model) is not None:
                raise ValueError("BiP: group= is for a model sharded over the ranks, but this one is (or holds) a "
                                 "DistributedDataParallel replica: every rank would count its copy of every block "
                                 "and the masks would differ; leave group=None under DistributedDataParallel")
            converted = self._mask_layers(structure, to_convert)
            if group is not None and scope == "global":  # before the projection's first collective
                distributed.check_devices("BiP", [layer.scores for _, layer in masked_nn.ranked_layers(model)],
                                          distributed.group_backend("BiP", group))
        # What a state of this run must have been saved with (load_state_dict): the optimisers' and
        # schedules' states carry some of these, and the projection and the steps read the others.
        # Plain Python values (a numpy scalar would need torch.load(weights_only=False)).
        self.settings = dict(sparsity=float(sparsity), scope=scope, mode=mode, lr=float(lr), score_lr=float(score_lr),
                             momentum=float(momentum), score_momentum=float(score_momentum),
                             weight_decay=float(weight_decay), inv_gamma=float(inv_gamma), implicit=implicit,
                             lower_steps=int(lower_steps), schedule=schedule, score_schedule=score_schedule,
                             total_steps=int(total_steps))
        self._check_something_to_mask()
        if not converted or self.group is not None:  # convert projected this rank's layers alone
            self._project()
        layers = [layer for _, layer in masked_nn.masked_layers(model)]
        for layer in layers:
            layer.inv_gamma, layer.implicit = float(inv_gamma), implicit
        score_ids = {id(layer.scores) for layer in layers}
        scores = [layer.scores for layer in layers]
        weights = [p for p in model.parameters() if id(p) not in score_ids]
        settings = self.settings  # Python numbers: the optimisers' and schedules' states hold them too
        # Parameter groups, which may be empty: a rank's shard may hold no scores, or nothing else.
        self.weight_optimizer = torch.optim.SGD([{"params": weights}], lr=settings["lr"],
                                                momentum=settings["momentum"], weight_decay=settings["weight_decay"])
        self.score_optimizer = torch.optim.SGD([{"params": scores}], lr=settings["score_lr"],
                                               momentum=settings["score_momentum"])
        self.total_steps, self._schedules = settings["total_steps"], {schedule, score_schedule}
        self.weight_schedule = scheduler(self.weight_optimizer, schedule, settings["total_steps"])
        self.score_schedule = scheduler(self.score_optimizer, score_schedule, settings["total_steps"])
        self.iteration = 0
        self.passes = 0  # forward+backward passes spent

    def _mask_layers(self, structure, to_convert) -> bool:
        """Converts the model if it has no masked layers yet (returns whether it did), or checks that its
        layers' structures are ``structure`` (None: any)."""
        model, group = self.model, self.group
        converted = not masked_nn.masked_layers(model)
        check_masked_structure("BiP", model, structure)
        if converted and ddp_wrapper(model) is not None:
            raise ValueError("BiP: the model is or holds a DistributedDataParallel wrapper of layers not yet masked: "
                             "converting inside it adds score parameters that DDP never synchronises, so the ranks' "
                             "masks would drift apart; bipkernels.convert the model first, then wrap it in DDP")
        if converted:
            # Under a group the projection over every rank's layers replaces convert's of this rank's.
            masked_nn.convert(model, 0.0 if group is not None else self.sparsity, to_convert, self.scope)
        return converted

    def _check_something_to_mask(self) -> None:
        """ValueError if the model holds no masked layer; under a group, on every rank if no rank's shard
        does (one shard may hold none, a stage of norms: it still takes part)."""
        count = len(masked_nn.masked_layers(self.model))
        if self.group is not None:
            count = torch.tensor(count, device=distributed.collective_device([], self.group, model_device(self.model)))
            torch.distributed.all_reduce(count, group=self.group)
        if not int(count):
            raise nothing_to_mask("BiP", self.model, "inside it" if self.group is None else "on any rank of the group")

    def _project(self) -> None:
        if self.group is None:
            masked_nn.project(self.model, self.sparsity, self.scope)
        else:
            distributed.project(self.model, self.sparsity, self.scope, self.group)

    def zero_grad(self) -> None:
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.score_optimizer.zero_grad(set_to_none=True)

    def _scores(self) -> list[torch.Tensor]:
        return [score for group in self.score_optimizer.param_groups for score in group["params"]]

    def _in_backward(self, own_closures: bool) -> bool:
        """Whether this iteration's scores step inside the backward (see the module docstring)."""
        wanted = own_closures if self.step_scores_in_backward is None else self.step_scores_in_backward
        distributed_run = torch.distributed.is_available() and torch.distributed.is_initialized()
        return wanted and not distributed_run and len({score.device for score in self._scores()}) <= 1

    def _backward(self, closure, score_step: bool, in_backward: bool) -> torch.Tensor:
        """Zero the gradients and run ``closure`` (forward and backward); returns its loss.

        ``in_backward``: the score gradients never stay in ``.grad``: each score takes its optimiser step as
        its gradient completes (``score_step``) or the gradient is dropped (a lower-level pass, which does
        not use it). Otherwise they stay in ``.grad`` as torch.optim has them.
        """
        self.zero_grad()
        stepped = set()

        def on_score_gradient(score):
            if score_step and id(score) in stepped:
                raise RuntimeError("BiP.step: the closure ran backward twice through the same scores; with "
                                   "step_scores_in_backward=True every score steps as soon as its gradient is "
                                   "complete, so gradients cannot accumulate over several backward calls: "
                                   "pass step_scores_in_backward=False to BiP (each backward then adds its own "
                                   "implicit term, the sum of m ⊙ g ⊙ g over the backward calls rather than that "
                                   "of their summed g, as under DistributedDataParallel)")
            if score_step:  # every other score's .grad is None here: the step moves this one alone
                self.score_optimizer.step()
                stepped.add(id(score))
            score.grad = None

        hooks = [score.register_post_accumulate_grad_hook(on_score_gradient)
                 for score in self._scores() if in_backward and score.requires_grad]
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            if stepped:
                self._failure = (f"a step failed after the scores of {len(stepped)} layers had taken their step "
                                 "inside the backward")
            raise
        finally:
            for hook in hooks:
                hook.remove()
        self.passes += 1
        return loss

    def _check_consistent(self, owner: str) -> None:
        if self._failure is not None:
            raise RuntimeError(f"{owner}: {self._failure}, so the solver's state matches no run: load a "
                               "checkpoint with load_state_dict before going on")

    def step(self, closure, upper_closure=None) -> torch.Tensor:
        """One BiP iteration; returns the loss that the closure (faithful mode: ``upper_closure``) returned,
        detached from its graph: its backward has run, and float(loss) of a tensor that requires grad
        warns. A closure that returns something other than a tensor (a float, None) gets it back as it is.
        A closure may call backward more than once (gradient accumulation) only with
        step_scores_in_backward=False; the implicit term is then the sum of each backward's own
        (m ⊙ g_i ⊙ g_i, not m ⊙ (Σ g_i)²)."""
        for name, value in (("closure", closure), ("upper_closure", upper_closure)):
            if (value is not None or name == "closure") and not callable(value):
                raise TypeError(f"BiP.step: {name} must be callable, got {type(value).__name__} {value!r}")
        return self._iterate(closure, upper_closure, own_closures=False)

    def _iterate(self, closure, upper_closure, own_closures: bool) -> torch.Tensor:
        self._check_consistent("BiP.step")
        in_backward = self._in_backward(own_closures)
        if self.mode == "fused":
            if upper_closure is not None:
                raise ValueError("BiP.step: fused mode takes one closure (both levels from one backward)")
            loss = self._backward(closure, score_step=True, in_backward=in_backward)
            self.weight_optimizer.step()
        else:
            if upper_closure is None:
                raise ValueError("BiP.step: faithful mode takes a lower-level and an upper-level closure")
            lower_done = 0
            try:
                for _ in range(self.lower_steps):
                    self._backward(closure, score_step=False, in_backward=in_backward)
                    self.weight_optimizer.step()
                    lower_done += 1
                loss = self._backward(upper_closure, score_step=True, in_backward=in_backward)
            except BaseException:
                if lower_done and self._failure is None:  # the weights moved: a resume would not be this run
                    self._failure = f"a faithful step failed after {lower_done} of its lower-level steps"
                raise
        if not in_backward:
            self.score_optimizer.step()
        self._project()
        self.weight_schedule.step()
        self.score_schedule.step()
        self.iteration += 1
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def batches_per_step(self) -> int:
        return 1 if self.mode == "fused" else self.lower_steps + 1

    def steps_per_epoch(self, dataset_size: int, batch_size: int) -> int:
        """steps_per_epoch for this solver's mode and its model's data shard (data_shard)."""
        return steps_per_epoch(dataset_size, batch_size, self.mode, self.lower_steps, data_shard(self.model)[1])

    def fit(self, dataset, epochs: int, batch_size: int = 64, seed: int = 0, loss_fn=None,
            start=(0, 0), on_step=None, label: str = "bip"):
        """Train for ``epochs`` over ``dataset`` from ``start`` = (epoch, step within it), on
        ``loss_fn(outputs, targets)`` (None: cross_entropy, training_loss).

        Batches follow epoch_batches(seed, epoch); a step consumes batches_per_step() of them (a trailing
        remainder is skipped). ``on_step(epoch, step)`` is called after every step (checkpoints, a stop
        request: return True to stop there); ``label`` (a str) names the progress line. Returns the position
        reached, a ``start`` for the next call: (epochs, 0) after the last epoch (fit(dataset, 1) returns
        (1, 0)), else the (epoch, step) that on_step stopped at (the arguments it was called with: epoch from
        0, the steps of that epoch done).
        A DistributedDataParallel model: every rank steps on its own share of each epoch, ``batch_size``
        examples per rank (data_shard), and the loss it reports is its own share's; ``on_step`` must answer
        alike on every rank (a rank that stops alone leaves the others waiting in the next gradient
        all-reduce). There, and under a ``group``, a check that fails on one rank (of its share of the data)
        raises on every rank: its own error there, a RuntimeError naming it on the others (checked_together).
        """
        # Under a group or DistributedDataParallel a check of this rank's data may fail here alone.
        with checked_together("BiP.fit", self.model, self.group):
            check_settings("BiP.fit", epochs=epochs, batch_size=batch_size, seed=seed, loss_fn=loss_fn, label=label)
            if not (isinstance(start, (tuple, list)) and len(start) == 2
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in start)):
                raise ValueError(f"BiP.fit: start must be (epoch, step), two ints >= 0, got {start!r}")
            if on_step is not None and not callable(on_step):
                raise TypeError(f"BiP.fit: on_step must be callable or None, got {type(on_step).__name__} "
                                f"{on_step!r}")
            check_dataset("BiP.fit", "dataset", dataset)
            shard = data_shard(self.model)
            per_step = self.batches_per_step()
            steps = steps_per_epoch(len(dataset), batch_size, self.mode, self.lower_steps, shard[1])
            if start[0] > epochs or start[1] > steps or (start[0] == epochs and start[1]):
                raise ValueError(f"BiP.fit: start {tuple(start)} lies past the run: {epochs} epochs of {steps} steps "
                                 "(a position fit returned, or one on_step was given)")
            planned = max(epochs - start[0], 0) * steps - start[1]
            if self.iteration + planned > self.total_steps and self._schedules != {"constant"}:
                warnings.warn(f"BiP.fit: {planned} steps from iteration {self.iteration} run past total_steps="
                              f"{self.total_steps}: the schedules stay at their last factor from there (cosine: "
                              "learning rate 0); build the solver with total_steps=epochs * steps_per_epoch(...)",
                              stacklevel=2)
            if epochs > start[0] and steps == 0:
                examples = shard_size(len(dataset), shard[1])
                batches = batch_count(examples, batch_size)
                folded = " (a lone last example joins the batch before it)" \
                    if batches < -(-examples // batch_size) else ""
                raise ValueError(f"BiP.fit: {len(dataset)} examples in batches of batch_size={batch_size}"
                                 f"{f' on each of {shard[1]} ranks' if shard[1] > 1 else ''} make {batches} "
                                 f"batch{'es' if batches != 1 else ''}{folded}, fewer than the {per_step} that one "
                                 f"{self.mode} step takes: nothing would train")
            # No step left (start (epochs, 0), or (epochs - 1, steps) as on_step was given it): nothing is read.
            check_training_data("BiP.fit", self.model, dataset, epochs - start[0] if planned else 0, batch_size, seed,
                                loss_fn)
        class_indices, loss_fn = loss_fn is None, training_loss(loss_fn)  # targets for cross_entropy, or as given
        device = model_device(self.model)
        progress = Progress(epochs, label)
        epoch, first = start
        for epoch in range(start[0], epochs):
            batches = epoch_batches(dataset, batch_size, seed, epoch, shard)
            groups = [batches[i:i + per_step] for i in range(0, steps * per_step, per_step)]
            self.model.train()
            total, first_step = 0.0, first if epoch == start[0] else 0
            for index in range(first_step, len(groups)):
                closures = [self._closure(dataset, indices, device, loss_fn, class_indices)
                            for indices in groups[index]]
                if self.mode == "fused":
                    loss = self._iterate(closures[0], None, own_closures=True)
                else:  # every lower step on its own batch, then the upper step on the next one
                    lower = iter(closures[:-1])
                    loss = self._iterate(lambda: next(lower)(), closures[-1], own_closures=True)
                total += float(loss)
                if on_step is not None and on_step(epoch, index + 1):
                    return epoch, index + 1
            # The mean over the steps this call ran (a resumed epoch's first ones ran before the stop).
            ran = len(groups) - first_step
            loss_field = {"loss": total / ran} if ran else {}
            progress.update(epoch + 1, **loss_field, sparsity=masked_nn.sparsity(self.model))
        return epochs, 0

    def _closure(self, dataset, indices, device, loss_fn, class_indices):
        def closure():
            inputs, targets = fetch(dataset, indices, device, class_indices)
            loss = loss_fn(self.model(inputs), targets)
            # Under a group, a shard without parameters has nothing to train but still steps with the others.
            if loss.requires_grad or any(p.requires_grad for p in self.model.parameters()):
                loss.backward()
            return loss
        return closure

    def state_dict(self) -> dict:
        self._check_consistent("BiP.state_dict")
        return {
            "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "score_optimizer": self.score_optimizer.state_dict(),
            "weight_schedule": self.weight_schedule.state_dict(),
            "score_schedule": self.score_schedule.state_dict(),
            "iteration": self.iteration,
            "passes": self.passes,
            "settings": dict(self.settings),
            **random_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Everything ``state_dict`` saved. The state is checked against the solver first (its keys, the
        model's keys, shapes and layer structures, and the settings it was saved with: sparsity, scope,
        mode, rates, momenta, weight decay, implicit term, lower steps, schedules, total steps), and the
        optimisers load before the model, so a state of another run raises with the solver as it was."""
        self._check_state(state)
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.score_optimizer.load_state_dict(state["score_optimizer"])
        self.model.load_state_dict(state["model"])
        self.weight_schedule.load_state_dict(state["weight_schedule"])
        self.score_schedule.load_state_dict(state["score_schedule"])
        self.iteration, self.passes = state["iteration"], state["passes"]
        self._failure = None
        set_random_state(state)

    def _check_state(self, state) -> None:
        owner = "BiP.load_state_dict"
        keys = ("model", "weight_optimizer", "score_optimizer", "weight_schedule", "score_schedule", "iteration",
                "passes", "rng")
        if not isinstance(state, dict) or any(key not in state for key in keys):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{owner}: not a BiP state (BiP.state_dict has {list(keys)}), got {got}")
        own, saved = self.model.state_dict(), state["model"]
        differ = [key for key in own.keys() | saved.keys() if key not in own or key not in saved
                  or (isinstance(own[key], torch.Tensor) and getattr(saved[key], "shape", None) != own[key].shape)]
        if differ:
            raise ValueError(f"{owner}: the state is of another model: {len(differ)} entries missing, extra or of "
                             f"another shape (first {sorted(differ)[0]!r})")
        saved_settings = state.get("settings", self.settings)  # a state saved before settings were kept: as here
        other = [f"{key} {saved_settings.get(key)!r} there, {value!r} here" for key, value in self.settings.items()
                 if saved_settings.get(key) != value]
        if other:
            raise ValueError(f"{owner}: the state is of a run with other settings ({'; '.join(other)}): build the "
                             "BiP with the settings of the run it continues")
        for name, layer in masked_nn.masked_layers(self.model):
            extra = saved.get(f"{name}._extra_state" if name else "_extra_state")
            if isinstance(extra, dict) and Structure(*extra["structure"]) != layer.structure:
                raise ValueError(f"{owner}: layer {name!r} is {layer.structure} here but "
                                 f"{Structure(*extra['structure'])} in the state")
