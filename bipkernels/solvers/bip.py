"""BiP: pruning as bi-level optimisation (Zhang et al., NeurIPS 2022), over a model with masked layers.

    upper:  min over m in S_k of l(m ⊙ θ*(m))     (scores s, m = Proj_k(s), straight-through)
    lower:  θ*(m) = argmin_θ l(m ⊙ θ) + (γ/2)‖θ‖²

One backward of the masked layers gives both gradients (bipkernels.ops.hypergrad):
weight.grad = m ⊙ g and scores.grad = θ ⊙ g − inv_gamma · I, with I = m ⊙ g ⊙ g (``implicit="paper"``)
or (θ ⊙ g)² (``"released"``, the official code's G1 ⊙ G2). After every score step the scores are
projected back to exactly k kept blocks.

Modes: ``"faithful"`` alternates as the paper does: ``lower_steps`` SGD steps on the weights, each on its
own batch, then one score step on the next batch. ``"fused"`` takes both steps from one forward and one
backward, so an iteration costs about one dense training step.

Memory: with ``step_scores_in_backward`` (the default) each layer's scores take their optimiser step as
soon as their gradient is complete, inside the backward, and the gradient is dropped at once, so a step
holds the scores and their momentum over a dense step but no score gradient (2·W instead of 3·W for W the
bytes of the masked weights; benchmarks/test_memory.py). The result is the same as stepping after the
backward. It is off under torch.distributed, whose gradient all-reduce finishes after the backward.

The lower level's (γ/2)‖θ‖² is ordinary weight decay (``weight_decay``, 1e-4 in the released configs);
``inv_gamma`` (1e-4 there) only scales the implicit term: they are separate settings, as the released
code has them.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .. import nn as masked_nn
from .training import MODES, Progress, check_settings, epoch_batches, fetch, model_device, scheduler


def steps_per_epoch(dataset_size: int, batch_size: int, mode: str = "fused", lower_steps: int = 1) -> int:
    """Iterations in one epoch of BiP.fit: the epoch's batches (the last may be short) in groups of one
    (fused) or lower_steps + 1 (faithful), a trailing remainder skipped. Use it for ``total_steps``."""
    check_settings("steps_per_epoch", batch_size=batch_size, mode=mode, lower_steps=lower_steps)
    batches = -(-dataset_size // batch_size)
    return batches // (1 if mode == "fused" else lower_steps + 1)


class BiP:
    """The BiP solver. Converts ``model`` (in place) if it has no masked layers yet.

    ``step(closure)`` (fused) or ``step(lower_closure, upper_closure)`` (faithful) follow torch.optim:
    a closure zeroes nothing, runs forward and backward, and returns the loss. ``fit`` runs whole epochs.
    ``state_dict`` holds everything a resumed run needs (model, both optimisers and schedules, iteration,
    RNG state).

    ``group`` (a torch.distributed process group, e.g. torch.distributed.group.WORLD): ``model`` is this
    rank's shard of the masked layers and the projection keeps the top blocks of all ranks together
    (bipkernels.distributed.project; every rank steps together). Under DistributedDataParallel leave it
    None: every rank holds every layer and the same scores, so the local projection is already global.
    """

    def __init__(self, model: nn.Module, sparsity: float, structure="unstructured", scope: str = "global", *,
                 mode: str = "fused", lr: float = 0.01, score_lr: float = 0.05, momentum: float = 0.9,
                 score_momentum: float = 0.9, weight_decay: float = 1e-4, inv_gamma: float = 1e-4,
                 implicit: str = "paper", lower_steps: int = 1, schedule: str = "cosine",
                 score_schedule: str = "cosine", total_steps: int = 1000, step_scores_in_backward: bool = True,
                 group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"BiP: model must be a torch.nn.Module, got {type(model).__name__} {model!r}")
        check_settings("BiP", sparsity=sparsity, structure=structure, scope=scope, mode=mode, lr=lr,
                       score_lr=score_lr, momentum=momentum, score_momentum=score_momentum,
                       weight_decay=weight_decay, inv_gamma=inv_gamma, implicit=implicit, lower_steps=lower_steps,
                       schedule=schedule, score_schedule=score_schedule, total_steps=total_steps,
                       step_scores_in_backward=step_scores_in_backward)
        self.model, self.sparsity, self.scope = model, sparsity, scope
        self.mode, self.lower_steps = mode, lower_steps
        self.step_scores_in_backward = step_scores_in_backward
        self.group = group
        converted = not masked_nn.masked_layers(model)
        if converted:
            masked_nn.convert(model, sparsity, structure, scope)
        if not converted or self.group is not None:  # convert projected this rank's layers alone
            self._project()
        layers = [layer for _, layer in masked_nn.masked_layers(model)]
        for layer in layers:
            layer.inv_gamma, layer.implicit = float(inv_gamma), implicit
        score_ids = {id(layer.scores) for layer in layers}
        scores = [layer.scores for layer in layers]
        weights = [p for p in model.parameters() if id(p) not in score_ids]
        self.weight_optimizer = torch.optim.SGD(weights, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.score_optimizer = torch.optim.SGD(scores, lr=score_lr, momentum=score_momentum)
        self.weight_schedule = scheduler(self.weight_optimizer, schedule, total_steps)
        self.score_schedule = scheduler(self.score_optimizer, score_schedule, total_steps)
        self.iteration = 0
        self.passes = 0  # forward+backward passes spent

    def _project(self) -> None:
        if self.group is None:
            masked_nn.project(self.model, self.sparsity, self.scope)
        else:
            distributed.project(self.model, self.sparsity, self.scope, self.group)

    def zero_grad(self) -> None:
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.score_optimizer.zero_grad(set_to_none=True)

    def _in_backward(self) -> bool:
        # DDP (or any all-reduce of the gradients) writes the averaged gradient after the backward.
        distributed_run = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.step_scores_in_backward and not distributed_run

    def _backward(self, closure, score_step: bool) -> torch.Tensor:
        """Zero the gradients and run ``closure`` (forward and backward); returns its loss.

        With _in_backward(), the score gradients never stay in ``.grad``: each score takes its optimiser
        step as its gradient completes (``score_step``) or the gradient is dropped (a lower-level pass, which
        does not use it). Without, they stay in ``.grad`` as torch.optim has them.
        """
        self.zero_grad()
        hooks, seen = [], set()

        def on_score_gradient(score):
            if score_step and id(score) in seen:
                raise RuntimeError("BiP.step: the closure ran backward twice through the same scores; with "
                                   "step_scores_in_backward=True every score steps as soon as its gradient is "
                                   "complete, so gradients cannot accumulate over several backward calls: "
                                   "pass step_scores_in_backward=False to BiP")
            seen.add(id(score))
            if score_step:  # every other score's .grad is None here: the step moves this one alone
                self.score_optimizer.step()
            score.grad = None

        if self._in_backward():
            hooks = [score.register_post_accumulate_grad_hook(on_score_gradient)
                     for group in self.score_optimizer.param_groups for score in group["params"]]
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for hook in hooks:
                hook.remove()
        self.passes += 1
        return loss

    def _score_step(self) -> None:
        if not self._in_backward():
            self.score_optimizer.step()

    def step(self, closure, upper_closure=None) -> torch.Tensor:
        """One BiP iteration; returns the (upper-level) loss."""
        for name, value in (("closure", closure), ("upper_closure", upper_closure)):
            if value is not None and not callable(value):
                raise TypeError(f"BiP.step: {name} must be callable, got {type(value).__name__} {value!r}")
        if self.mode == "fused":
            if upper_closure is not None:
                raise ValueError("BiP.step: fused mode takes one closure (both levels from one backward)")
            loss = self._backward(closure, score_step=True)
            self.weight_optimizer.step()
            self._score_step()
        else:
            if upper_closure is None:
                raise ValueError("BiP.step: faithful mode takes a lower-level and an upper-level closure")
            for _ in range(self.lower_steps):
                self._backward(closure, score_step=False)
                self.weight_optimizer.step()
            loss = self._backward(upper_closure, score_step=True)
            self._score_step()
        self._project()
        self.weight_schedule.step()
        self.score_schedule.step()
        self.iteration += 1
        return loss

    def batches_per_step(self) -> int:
        return 1 if self.mode == "fused" else self.lower_steps + 1

    def steps_per_epoch(self, dataset_size: int, batch_size: int) -> int:
        return steps_per_epoch(dataset_size, batch_size, self.mode, self.lower_steps)

    def fit(self, dataset, epochs: int, batch_size: int = 64, seed: int = 0, loss_fn=nn.functional.cross_entropy,
            start=(0, 0), on_step=None, label: str = "bip"):
        """Train for ``epochs`` over ``dataset`` from ``start`` = (epoch, step within it).

        Batches follow epoch_batches(seed, epoch); a step consumes batches_per_step() of them (a trailing
        remainder is skipped). ``on_step(epoch, step)`` is called after every step (checkpoints, a stop
        request: return True to stop there). Returns the (epoch, step) reached.
        """
        check_settings("BiP.fit", epochs=epochs, batch_size=batch_size, seed=seed)
        if not (isinstance(start, (tuple, list)) and len(start) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in start)):
            raise ValueError(f"BiP.fit: start must be (epoch, step), two ints >= 0, got {start!r}")
        device = model_device(self.model)
        progress = Progress(epochs, label)
        per_step = self.batches_per_step()
        epoch, first = start
        for epoch in range(start[0], epochs):
            batches = epoch_batches(dataset, batch_size, seed, epoch)
            groups = [batches[i:i + per_step] for i in range(0, self.steps_per_epoch(len(dataset), batch_size) * per_step,
                                                             per_step)]
            self.model.train()
            total = 0.0
            for index in range(first if epoch == start[0] else 0, len(groups)):
                closures = [self._closure(dataset, indices, device, loss_fn) for indices in groups[index]]
                if self.mode == "fused":
                    loss = self.step(closures[0])
                else:  # every lower step on its own batch, then the upper step on the next one
                    lower = iter(closures[:-1])
                    loss = self.step(lambda: next(lower)(), closures[-1])
                total += float(loss.detach())
                if on_step is not None and on_step(epoch, index + 1):
                    return epoch, index + 1
            progress.update(epoch + 1, loss=total / max(len(groups), 1), sparsity=masked_nn.sparsity(self.model))
        return epochs, 0

    def _closure(self, dataset, indices, device, loss_fn):
        def closure():
            inputs, targets = fetch(dataset, indices, device)
            loss = loss_fn(self.model(inputs), targets)
            loss.backward()
            return loss
        return closure

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "score_optimizer": self.score_optimizer.state_dict(),
            "weight_schedule": self.weight_schedule.state_dict(),
            "score_schedule": self.score_schedule.state_dict(),
            "iteration": self.iteration,
            "passes": self.passes,
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.score_optimizer.load_state_dict(state["score_optimizer"])
        self.weight_schedule.load_state_dict(state["weight_schedule"])
        self.score_schedule.load_state_dict(state["score_schedule"])
        self.iteration, self.passes = state["iteration"], state["passes"]
        torch.set_rng_state(state["rng"])
