"""The BiP solver and the baselines: exact sparsity after every step, the gradients of both levels,
bit-exact resume, and `prune` end to end."""

from __future__ import annotations

import copy
import importlib
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import bipkernels
from bipkernels import reference
from bipkernels.structures import parse_structure
from bipkernels.solvers import METHODS, training
from bipkernels.solvers.bip import steps_per_epoch
from bipkernels.solvers.hydra import hydra
from bipkernels.solvers.imp import imp, imp_rounds
from bipkernels.solvers.omp import omp
from bipkernels.solvers.training import (batch_count, epoch_batches, evaluate, fetch, mean_loss, model_device,
                                         recalibrate_batchnorm, schedule_factor, shard_size, split_batches,
                                         train_weights)


def tiny_task(n: int = 96, seed: int = 0):
    """Linearly separable 3-class data in 12 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 12, generator=generator)
    targets = (inputs[:, :3] * torch.tensor([3.0, 2.0, 1.0])).argmax(1)
    return TensorDataset(inputs, targets)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def kept_blocks(model) -> int:
    return sum(int(reference.kept_blocks(layer.block_scores(), layer.threshold).sum())
               for _, layer in bipkernels.masked_layers(model))


def closure_on(model, inputs, targets):
    def closure():
        value = F.cross_entropy(model(inputs), targets)
        value.backward()
        return value
    return closure


@pytest.mark.parametrize("mode", ["fused", "faithful"])
@pytest.mark.parametrize("structure", ["unstructured", "filter", "tile2x3"])
def test_bip_keeps_exactly_k_and_lowers_the_loss(seed, mode, structure):
    data = tiny_task()
    model = tiny_model()
    solver = bipkernels.BiP(model, 0.7, structure, mode=mode, lr=0.05, score_lr=0.05,
                            lower_steps=2 if mode == "faithful" else 1, total_steps=200)
    blocks = sum(layer.block_scores().numel() for _, layer in bipkernels.masked_layers(model))
    inputs, targets = data.tensors

    def loss():
        return F.cross_entropy(model(inputs), targets)

    with torch.no_grad():
        before = float(loss())
    closure = closure_on(model, inputs, targets)
    for _ in range(30):
        solver.step(closure) if mode == "fused" else solver.step(closure, closure)
        assert kept_blocks(model) == bipkernels.keep_count(blocks, 0.7)
    with torch.no_grad():
        assert float(loss()) < before
    assert solver.passes == 30 * (1 if mode == "fused" else 3)


def effective_weight_gradient(model, weight, inputs, targets):
    """g = ∂l/∂z of the first layer at weights ``weight`` (under its current mask), by dense autograd."""
    effective = (weight * model[0].mask()).requires_grad_()
    hidden = F.relu(F.linear(inputs, effective, model[0].bias))
    F.cross_entropy(F.linear(hidden, model[2].masked_weight().detach(), model[2].bias), targets).backward()
    return effective.grad


@pytest.mark.parametrize("mode", ["fused", "faithful"])
@pytest.mark.parametrize("implicit", ["paper", "released"])
def test_step_follows_the_hypergradient(seed, mode, implicit):
    """One step against the formula: fused takes both levels from one backward at θ; faithful first steps
    θ on batch A, then the scores with the hypergradient at the new θ on batch B."""
    model = tiny_model()
    settings = dict(mode=mode, lr=0.1, momentum=0.0, score_momentum=0.0, weight_decay=0.0, schedule="constant",
                    score_schedule="constant")
    solver = bipkernels.BiP(model, 0.5, score_lr=0.3, inv_gamma=0.2, implicit=implicit, **settings)
    (inputs_a, targets_a), (inputs_b, targets_b) = tiny_task(seed=1).tensors, tiny_task(seed=2).tensors
    layer = model[0]
    weight, scores = layer.weight.detach().clone(), layer.scores.detach().clone()
    mask = layer.mask().to(weight.dtype)
    new_weight = weight - 0.1 * mask * effective_weight_gradient(model, weight, inputs_a, targets_a)
    if mode == "fused":
        weight_for_scores, g = weight, effective_weight_gradient(model, weight, inputs_a, targets_a)
        solver.step(closure_on(model, inputs_a, targets_a))
    else:
        # A twin with a frozen mask (score_lr 0) shows the whole network after the lower step.
        twin = copy.deepcopy(model)
        bipkernels.BiP(twin, 0.5, score_lr=0.0, **settings).step(closure_on(twin, inputs_a, targets_a),
                                                               closure_on(twin, inputs_b, targets_b))
        weight_for_scores, g = new_weight, effective_weight_gradient(twin, new_weight, inputs_b, targets_b)
        solver.step(closure_on(model, inputs_a, targets_a), closure_on(model, inputs_b, targets_b))
    implicit_term = (weight_for_scores * g) ** 2 if implicit == "released" else mask * g * g
    torch.testing.assert_close(layer.weight.detach(), new_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.scores.detach(), scores - 0.3 * (weight_for_scores * g - 0.2 * implicit_term),
                               rtol=1e-5, atol=1e-7)


class DrawingAsRead(torch.utils.data.Dataset):
    """``base``'s examples with noise from torch's generator added as each is read (random augmentation)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        inputs, target = self.base[index]
        return inputs + 0.1 * torch.randn(inputs.shape), target


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("mode", ["fused", "faithful"])
def test_resume_is_bit_exact(seed, mode, augmented):
    # Augmented: the data's draws continue only if fit's data checks, run again on resume after the
    # state is restored, draw nothing from the generator.
    data = DrawingAsRead(tiny_task(seed=seed)) if augmented else tiny_task(seed=seed)

    def make():
        model = tiny_model()
        model.insert(2, nn.Dropout(0.5))  # its draws continue only if the state restores the generator
        return model, bipkernels.BiP(model, 0.8, mode=mode, lr=0.05, score_lr=0.1, total_steps=40)

    straight_model, straight = make()
    straight.fit(data, 4, batch_size=16, seed=3)

    first_model, first = make()
    stopped = first.fit(data, 4, batch_size=16, seed=3, on_step=lambda epoch, step: (epoch, step) == (1, 2))
    assert stopped == (1, 2)
    state = copy.deepcopy(first.state_dict())
    resumed_model, resumed = make()
    resumed.load_state_dict(state)
    resumed.fit(data, 4, batch_size=16, seed=3, start=stopped)
    for key, value in straight_model.state_dict().items():
        other = resumed_model.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert torch.equal(straight_model[0].mask(), resumed_model[0].mask())
    assert resumed.iteration == straight.iteration and resumed.passes == straight.passes


@pytest.mark.parametrize("mode", ["fused", "faithful"])
@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_score_step_in_backward_equals_the_step_after_it(seed, mode, structure):
    """The default steps each layer's scores inside the backward and keeps no score gradient; the state
    after several iterations (momentum included) is bit-identical to stepping after the backward."""
    data = tiny_task(seed=seed)
    runs = []
    for in_backward in (True, False):
        model = tiny_model(seed)
        solver = bipkernels.BiP(model, 0.7, structure, mode=mode, score_lr=0.2, total_steps=20,
                                step_scores_in_backward=in_backward)
        batches = [tensor.split(32) for tensor in data.tensors]
        for inputs, targets in zip(*batches):
            closure = closure_on(model, inputs, targets)
            solver.step(closure) if mode == "fused" else solver.step(closure, closure)
        scores = [layer.scores for _, layer in bipkernels.masked_layers(model)]
        assert all((score.grad is None) == in_backward for score in scores)
        runs.append(solver.state_dict())
    in_backward, after = runs
    for key, value in after["model"].items():
        other = in_backward["model"][key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
    momentum, other_momentum = in_backward["score_optimizer"]["state"], after["score_optimizer"]["state"]
    assert momentum.keys() == other_momentum.keys()
    for index, state in other_momentum.items():
        assert torch.equal(momentum[index]["momentum_buffer"], state["momentum_buffer"])


def test_score_step_in_backward_refuses_accumulated_gradients(seed):
    data = tiny_task(seed=seed)
    inputs, targets = data.tensors

    def accumulating_closure(model):
        def closure():
            for part_inputs, part_targets in zip(inputs.split(48), targets.split(48)):
                F.cross_entropy(model(part_inputs), part_targets).backward()
        return closure

    model = tiny_model(seed)
    with pytest.raises(RuntimeError, match="BiP.step: the closure ran backward twice.*step_scores_in_backward=False"):
        bipkernels.BiP(model, 0.5, step_scores_in_backward=True).step(accumulating_closure(model))
    model = tiny_model(seed)
    bipkernels.BiP(model, 0.5, step_scores_in_backward=False).step(accumulating_closure(model))
    # A lower-level pass drops the score gradients, so accumulating there is fine.
    model = tiny_model(seed)
    bipkernels.BiP(model, 0.5, mode="faithful", step_scores_in_backward=True).step(accumulating_closure(model),
                                                                                 closure_on(model, inputs, targets))


@pytest.mark.parametrize("method", bipkernels.solvers.METHODS)
def test_prune_every_method_reaches_its_sparsity(seed, method):
    data = tiny_task()
    model = tiny_model()
    bipkernels.solvers.training.train_weights(model, data, 3, lr=0.1, label="pretrain")
    rewind = copy.deepcopy(model.state_dict())
    pruned, result = bipkernels.prune(model, data, method, 0.8, test_data=data, epochs=2, finetune_epochs=1,
                                      batch_size=16, rewind_state=rewind if method == "imp" else None)
    total = sum(layer.weight.numel() for _, layer in bipkernels.masked_layers(pruned))
    assert result["sparsity"] == pytest.approx(1 - bipkernels.keep_count(total, 0.8) / total)
    assert set(result) >= {"test_accuracy", "wall_time_s", "epochs", "passes", "layers"}
    assert result["passes"] > 0 and 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_prune_says_once_that_an_nm_structure_keeps_its_own_sparsity(seed, method):
    """2:4 layers keep half their weights whatever the sparsity asked. prune said so only where the method
    converted at that sparsity (bip, omp, hydra, through convert's warning), not for random and imp (which
    convert at 0) nor after a convert with exclude=. Now prune says it once, for every method, and nothing
    at 2:4's own sparsity."""
    rewind = copy.deepcopy(tiny_model().state_dict()) if method == "imp" else None
    for sparsity, exclude, said in ((0.9, (), 1), (0.9, ("2",), 1), (0.5, (), 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, result = bipkernels.prune(tiny_model(), tiny_task(), method, sparsity, structure="2:4", epochs=1,
                                         finetune_epochs=1, batch_size=32, rewind_state=rewind, exclude=exclude)
        about_nm = [str(warning.message) for warning in caught if "whatever the sparsity asked" in str(warning.message)]
        assert about_nm == [f"prune: structure 2:4 keeps 2 of every 4 weights (sparsity 0.5) whatever the sparsity "
                            f"asked ({sparsity:g}): the sparsity asked applies to the model's layers of other "
                            "structures only"] * said, (exclude, about_nm)
        assert caught[0].filename == __file__ if said else True  # the caller's line, not prune's
        assert result["sparsity"] == 0.5  # of the masked layers


@pytest.mark.parametrize("method", ["bip", "omp", "hydra"])
def test_prune_says_once_that_nm_keeps_its_own_sparsity_for_p_2_and_a_target_of_0(seed, method):
    """The warning of 2:4 layers pruned at another sparsity, once, for a 2:4 of p=2 too (prune filtered
    convert's repeat by a pattern of "2:4", which "2:4 (p=2)" slipped: said twice by the methods that
    convert at the sparsity) and at a target of 0 (said by nobody, though the layers keep half)."""
    for structure, sparsity in ((parse_structure("2:4", p=2), 0.9), ("2:4", 0.0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, result = bipkernels.prune(tiny_model(seed), tiny_task(seed=seed), method, sparsity,
                                         structure=structure, epochs=1, finetune_epochs=1, batch_size=32)
        about_nm = [str(warning.message) for warning in caught if "whatever the sparsity asked" in str(warning.message)]
        spelled = parse_structure(structure)
        assert about_nm == [f"prune: structure {spelled} keeps 2 of every 4 weights (sparsity 0.5) whatever the "
                            f"sparsity asked ({sparsity:g}): the sparsity asked applies to the model's layers of "
                            "other structures only"], (structure, about_nm)
        assert result["sparsity"] == 0.5 and result["target_sparsity"] == sparsity


def test_imp_rounds_and_schedules():
    rounds = imp_rounds(0.9)
    assert len(rounds) == 11 and rounds[0] == pytest.approx(0.2) and rounds[-1] == 0.9
    assert imp_rounds(0.2) == [0.2] and imp_rounds(0.0) == []
    assert schedule_factor("cosine", 0, 10) == 1.0 and schedule_factor("cosine", 10, 10) == pytest.approx(0.0)
    assert schedule_factor("step", 6, 10) == pytest.approx(0.1) and schedule_factor("constant", 9, 10) == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="both"), "mode must be one of"),
    (dict(implicit="neither"), "implicit must be one of"),
    (dict(lr=-1.0), "lr must be a number >= 0"),
    (dict(lower_steps=0), "lower_steps must be an int >= 1"),
    (dict(lower_steps=3), r"lower_steps=3 needs mode='faithful'"),
    (dict(schedule="linear"), "schedule must be one of"),
])
def test_bip_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bipkernels.BiP(tiny_model(), 0.5, **kwargs)


def test_score_step_in_backward_by_default_in_fit_only(seed):
    """None (default): fit steps the scores inside the backward (its closures are the solver's own);
    step with a user's closure keeps score gradients in .grad, so clipping them still works."""
    data = tiny_task(seed=seed)
    model = tiny_model(seed)
    solver = bipkernels.BiP(model, 0.5, total_steps=20)
    solver.step(closure_on(model, *data.tensors))
    scores = [layer.scores for _, layer in bipkernels.masked_layers(model)]
    assert all(score.grad is not None for score in scores)
    solver.fit(data, 1, batch_size=32, seed=seed)
    assert all(score.grad is None for score in scores)


def test_frozen_scores_stay_put_with_the_step_in_backward(seed):
    model = tiny_model(seed)
    solver = bipkernels.BiP(model, 0.5, step_scores_in_backward=True, total_steps=20)
    frozen = model[0].scores.requires_grad_(False)
    before = frozen.detach().clone()
    solver.step(closure_on(model, *tiny_task(seed=seed).tensors))
    assert torch.equal(frozen, before) and not torch.equal(model[2].scores, before)


def test_a_step_that_fails_after_scores_stepped_is_refused_until_reloaded(seed):
    data = tiny_task(seed=seed)
    model = tiny_model(seed)
    solver = bipkernels.BiP(model, 0.5, step_scores_in_backward=True, total_steps=20)
    checkpoint = copy.deepcopy(solver.state_dict())

    def failing_closure():
        closure_on(model, *data.tensors)()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        solver.step(failing_closure)
    for call in (lambda: solver.state_dict(), lambda: solver.step(closure_on(model, *data.tensors))):
        with pytest.raises(RuntimeError, match="a step failed after the scores of 2 layers had taken their step "
                                               "inside the backward.*load a checkpoint"):
            call()
    solver.load_state_dict(checkpoint)
    solver.step(closure_on(model, *data.tensors))


def test_bip_rejects_a_flag_that_is_not_a_bool():
    with pytest.raises(TypeError, match="BiP: step_scores_in_backward must be True, False or None, got 1"):
        bipkernels.BiP(tiny_model(), 0.5, step_scores_in_backward=1)


def test_prune_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        bipkernels.prune(tiny_model(), tiny_task(), "magic")


@pytest.mark.parametrize("size, batch_size", [(1, 4), (4, 4), (5, 4), (6, 4), (9, 4), (2, 1), (65, 64)])
def test_split_batches_folds_a_lone_last_example_into_the_batch_before(size, batch_size):
    order = torch.randperm(size)
    batches = split_batches(order, batch_size)
    assert torch.equal(torch.cat(batches), order)  # every index once, in order
    assert len(batches) == batch_count(size, batch_size)
    assert all(len(batch) > 1 for batch in batches) or size == 1 or batch_size == 1
    assert all(len(batch) == batch_size for batch in batches[:-1])


def test_no_two_seeds_or_epochs_share_their_batches():
    """Every (seed, epoch) its own order, also where one generator keyed by seed · 1000003 + epoch would
    repeat another's: its key is cut to 32 bits, so seed 1000003⁻¹ mod 2^32 was seed 0 one epoch later."""
    dataset = range(64)
    pairs = [(seed, epoch) for seed in (0, 1, 2, pow(1_000_003, -1, 2**32), 2**32 - 1) for epoch in range(4)]
    orders = {tuple(torch.cat(epoch_batches(dataset, 8, seed, epoch)).tolist()) for seed, epoch in pairs}
    assert len(orders) == len(pairs)


def test_no_two_imp_runs_or_rounds_share_their_batches(monkeypatch):
    """IMP's rounds continue their seed's epochs: per-round seeds (seed + round) gave seed 1's first round
    the batches of seed 0's second. (By (seed, epoch): imp's check of its data reads epoch 0's first batch.)"""
    orders = {}

    def recorded(dataset, batch_size, seed, epoch, shard=(0, 1)):
        batches = epoch_batches(dataset, batch_size, seed, epoch, shard)
        orders[seed, epoch] = tuple(torch.cat(batches).tolist())
        return batches

    monkeypatch.setattr(bipkernels.solvers.training, "epoch_batches", recorded)
    for seed in (0, 1, 2):
        imp(tiny_model(), tiny_task(), 0.5, epochs_per_round=2, batch_size=16, seed=seed)  # 4 rounds
    assert len(orders) == 3 * 4 * 2 and len(set(orders.values())) == len(orders)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [0, 1, 2, 7, 12, 13])
def test_epoch_batches_shard_an_epoch_like_distributed_sampler(size, world_size, seed):
    """DistributedDataParallel training splits each epoch: rank r takes every world-size-th example of
    the permutation, padded with its own first examples, so every rank takes the same number of steps and
    the ranks' batch i together are batch i of the unsharded epoch with world-size times the batch size."""
    dataset, batch_size = range(size), 2
    whole = epoch_batches(dataset, batch_size * world_size, seed, 3)
    shards = [epoch_batches(dataset, batch_size, seed, 3, (rank, world_size)) for rank in range(world_size)]
    assert {len(shard) for shard in shards} == {batch_count(shard_size(size, world_size), batch_size)}
    for rank, shard in enumerate(shards):
        assert sum(len(batch) for batch in shard) == shard_size(size, world_size)
    order = torch.cat(whole) if whole else torch.empty(0, dtype=torch.int64)
    padded = order.repeat(world_size)[:shard_size(size, world_size) * world_size]
    dealt = torch.stack([torch.cat(shard) for shard in shards], 1).reshape(-1) if size else order
    assert torch.equal(dealt, padded)  # dealt round the ranks in the permutation's order
    if size % (world_size * batch_size) == 0:  # no padding, no short batch
        for index, batch in enumerate(whole):
            together = torch.cat([shard[index] for shard in shards])
            assert torch.equal(together.sort().values, batch.sort().values)


def test_every_training_loop_survives_a_dataset_one_example_past_a_batch(seed):
    """65 examples in batches of 64 used to end each epoch on a batch of one, which BatchNorm1d in training
    mode (like a ResNet's 1×1 feature maps) rejects."""
    data = tiny_task(65)

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 3))

    for method in ("bip", "imp", "hydra"):
        bipkernels.prune(model(), data, method, 0.5, epochs=1, finetune_epochs=1, batch_size=64)
    solver = bipkernels.BiP(model(), 0.5, mode="faithful", lower_steps=1)
    solver.fit(data, 1, batch_size=32)
    assert solver.iteration == 1  # batches of 32 and 33: one faithful step
    recalibrate_batchnorm(solver.model, tiny_task(257), batch_size=256)
    with pytest.raises(ValueError, match=r"BiP.fit: 65 examples in batches of batch_size=64 make 1 batch \(a lone "
                                         r"last example joins the batch before it\), fewer than the 2 that one"):
        solver.fit(data, 1, batch_size=64)
    with pytest.raises(ValueError, match=r"BiP.fit: 10 examples in batches of batch_size=64 make 1 batch, fewer"):
        solver.fit(tiny_task(10), 1, batch_size=64)


def test_a_model_without_parameters_evaluates_on_the_cpu():
    """The training loops put the data where the model's first parameter lies, else its first buffer;
    a model with neither (a stage of activations) gets the CPU instead of a StopIteration."""
    data = tiny_task(10)
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(3, affine=False).to("meta")) == torch.device("meta")  # its buffers'
    assert model_device(nn.Sequential(nn.BatchNorm1d(3, affine=False), nn.Linear(3, 2).to("meta"))).type == "meta"
    constant = nn.Threshold(float("inf"), 0.0)  # every output 0: class 0 everywhere
    assert evaluate(constant, data) == int((data.tensors[1] == 0).sum()) / len(data)


def test_bip_refuses_to_convert_inside_a_ddp_wrapper(tmp_path):
    """DDP registers the parameters it synchronises when it is built: scores added inside it later would
    never be all-reduced, and the ranks' masks would drift apart."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(tiny_model())
        for model in (wrapped, nn.Sequential(wrapped)):  # bare, or inside another module (torch.compile's)
            with pytest.raises(ValueError, match="convert the model first, then wrap it in DDP"):
                bipkernels.BiP(model, 0.5)
            assert not bipkernels.masked_layers(model)
        converted = nn.parallel.DistributedDataParallel(bipkernels.convert(tiny_model(), 0.5))
        solver = bipkernels.BiP(nn.Sequential(converted), 0.5)  # the documented order
        assert solver.steps_per_epoch(10, 2) == 5  # a world of one: the whole epoch
    finally:
        dist.destroy_process_group()


def test_omp_prunes_by_the_current_magnitudes_of_an_already_masked_model(seed):
    model = bipkernels.convert(tiny_model(), 0.0)
    with torch.no_grad():  # trained since convert: the scores still hold the old |θ|
        for _, layer in bipkernels.masked_layers(model):
            layer.weight.normal_()
    magnitudes = [layer.weight.detach().abs() for _, layer in bipkernels.masked_layers(model)]
    want = reference.topk_threshold(magnitudes, bipkernels.keep_count(sum(m.numel() for m in magnitudes), 0.8))
    omp(model, tiny_task(), 0.8, finetune_epochs=0)
    for (_, layer), magnitude, threshold in zip(bipkernels.masked_layers(model), magnitudes, want):
        assert torch.equal(layer.mask(), reference.block_mask(magnitude, threshold, parse_structure("unstructured")))


def test_imp_and_train_weights_on_masked_models_and_parameters_named_scores(seed):
    """IMP from an already masked model (its state holds the structures, not only tensors), and a head
    parameter whose name happens to end in "scores" is trained like any other weight."""

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_model()
            self.class_scores = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.body(x) + self.class_scores

    model = bipkernels.convert(Named(), 0.0)
    rewind = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does convert advise the user about IMP's own reset of the masks
        imp(bipkernels.convert(tiny_model(), 0.5), tiny_task(), 0.5, epochs_per_round=0)
    # A whole checkpoint, or a DDP model's keys, used to rewind nothing without a word.
    for wrong in ({"model": rewind, "rewind": rewind}, {f"module.{key}": value for key, value in rewind.items()}):
        with pytest.raises(ValueError, match=r"imp: rewind_state lacks \d+ of the model's \d+ parameters"):
            imp(model, tiny_task(), 0.5, rewind_state=wrong, epochs_per_round=1, rate=0.5)
    with pytest.raises(TypeError, match=r"imp: rewind_state must be a state_dict \(a dict\) or None, got list"):
        imp(model, tiny_task(), 0.5, rewind_state=list(rewind.items()), epochs_per_round=1, rate=0.5)
    imp(model, tiny_task(), 0.5, rewind_state={}, epochs_per_round=1, rate=0.5)  # {}: the model's own weights
    imp(model, tiny_task(), 0.5, rewind_state=rewind, epochs_per_round=1, rate=0.5)
    assert bipkernels.sparsity(model) == pytest.approx(0.5, abs=1e-6)
    assert model.class_scores.detach().abs().sum() > 0
    _, result = bipkernels.prune(tiny_model(), tiny_task(), "imp", 0.75, finetune_epochs=1, rate=0.5)
    assert result["epochs"] == len(imp_rounds(0.75, 0.5)) == 2


@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_imp_returns_finite_scores_with_its_masks(monkeypatch, seed, structure):
    """IMP's NaN scores of the pruned blocks do not outlive it: the model comes back with the masks of its
    last round and finite scores, so that a later projection keeps its full count (with NaN scores,
    project(model, 0.3) after IMP to 0.8 kept 20%)."""
    import bipkernels.solvers.imp as imp_module

    trained = {}

    def train_recording(model, *args, **kwargs):
        trained.update(bipkernels.masks(model))  # the last round's masks, which it trains
        return train_weights(model, *args, **kwargs)

    monkeypatch.setattr(imp_module, "train_weights", train_recording)
    model = tiny_model()
    imp(model, tiny_task(), 0.8, structure, epochs_per_round=1, rate=0.5)
    assert all(torch.equal(mask, trained[name]) for name, mask in bipkernels.masks(model).items())
    assert all(layer.scores.isfinite().all() for _, layer in bipkernels.masked_layers(model))
    bipkernels.project(model, 0.3)
    assert kept_blocks(model) == bipkernels.keep_count(sum(layer.block_scores().numel() for _, layer in
                                                           bipkernels.masked_layers(model)), 0.3)
    # A kept weight that training made NaN (or inf) keeps its block.
    bipkernels.project(model, 0.8)
    masks = bipkernels.masks(model)
    with torch.no_grad():
        kept = masks["0"].nonzero()[:2]
        model[0].weight[kept[0, 0], kept[0, 1]] = float("nan")
        model[0].weight[kept[1, 0], kept[1, 1]] = float("inf")
    imp_module._finite_scores(model, 0.8, "global")
    assert all(torch.equal(mask, masks[name]) for name, mask in bipkernels.masks(model).items())


@pytest.mark.parametrize("method", ["bip", "omp", "imp", "hydra", "random"])
def test_prune_leaves_the_model_plain_when_the_data_cannot_train(seed, method):
    model = tiny_model()
    with pytest.raises(ValueError, match="would train nothing|nothing would train"):
        bipkernels.prune(model, tiny_task(0), method, 0.5, epochs=1, finetune_epochs=1)
    assert not bipkernels.masked_layers(model)
    if method == "bip":  # 6 examples in batches of 4: two batches, one faithful step needs three
        with pytest.raises(ValueError, match="nothing would train"):
            bipkernels.prune(model, tiny_task(6), "bip", 0.5, epochs=1, batch_size=4, mode="faithful",
                             lower_steps=2)
        assert not bipkernels.masked_layers(model)


def test_data_that_is_not_a_map_style_dataset_is_refused_before_the_model_changes(seed):
    loader = torch.utils.data.DataLoader(tiny_task(), batch_size=8)
    for method in ("bip", "omp", "imp", "hydra", "random"):
        model = tiny_model()
        with pytest.raises(TypeError, match=r"prune: train_data must be a map-style dataset .* got DataLoader: "
                                            r"pass its .dataset"):
            bipkernels.prune(model, loader, method, 0.5, epochs=1, finetune_epochs=1)
        assert not bipkernels.masked_layers(model)
    with pytest.raises(TypeError, match=r"prune: test_data must be a map-style dataset"):
        bipkernels.prune(tiny_model(), tiny_task(), "omp", 0.5, finetune_epochs=0, test_data=loader)
    with pytest.raises(TypeError, match=r"evaluate: dataset must be a map-style dataset"):
        evaluate(tiny_model(), loader)
    with pytest.raises(ValueError, match=r"prune: total_steps=3: prune computes it"):
        bipkernels.prune(tiny_model(), tiny_task(), "bip", 0.5, epochs=1, total_steps=3)
    with pytest.raises(ValueError, match=r"steps_per_epoch: dataset_size must be an int >= 0, got -5"):
        bipkernels.BiP(tiny_model(), 0.5).steps_per_epoch(-5, 16)


def test_examples_keep_their_targets_as_they_come(seed):
    """Float and vector targets are stacked as they are (int() truncated them), a TensorDataset subclass's
    own examples are used, and an example that is no (input, target) pair is named."""
    inputs = torch.randn(4, 3)
    floats = [(x, float(y)) for x, y in zip(inputs, [2.03, 2.10, 0.002, -1.5])]
    assert fetch(floats, torch.arange(4), "cpu")[1].tolist() == pytest.approx([2.03, 2.10, 0.002, -1.5])
    vectors = [(x, torch.tensor([i, 2.0 * i])) for i, x in enumerate(inputs)]
    assert fetch(vectors, torch.arange(4), "cpu")[1].shape == (4, 2)
    # Class indices of any integer kind come out as cross_entropy takes them: int64, one per example.
    labels = torch.tensor([2, 0, 1, 1])
    for indices in ([(x, np.int32(y)) for x, y in zip(inputs, labels)],
                    torch.utils.data.Subset(TensorDataset(inputs, labels.int()), range(4)),
                    [(x, y.reshape(1)) for x, y in zip(inputs, labels)], TensorDataset(inputs, labels[:, None])):
        targets = fetch(indices, torch.arange(4), "cpu")[1]
        assert targets.dtype == torch.int64 and torch.equal(targets, labels)

    class Doubled(TensorDataset):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return 2 * x, y

    batch = fetch(Doubled(inputs, torch.arange(4)), torch.tensor([1, 3]), "cpu")[0]
    assert torch.equal(batch, 2 * inputs[[1, 3]])
    with pytest.raises(ValueError, match=r"examples must be \(input, target\) pairs, got 3 items"):
        fetch(TensorDataset(inputs, inputs, inputs), torch.arange(2), "cpu")
    column = TensorDataset(tiny_task().tensors[0], tiny_task().tensors[1][:, None])  # (N, 1) class indices
    assert evaluate(tiny_model(), column) == evaluate(tiny_model(), tiny_task()) <= 1.0
    assert mean_loss(tiny_model(), column) == mean_loss(tiny_model(), tiny_task(), F.cross_entropy)
    # A loss of the caller's (class_indices=False) gets the targets as they are stacked.
    assert fetch(TensorDataset(inputs, labels.int()[:, None]), torch.arange(4), "cpu", False)[1].dtype == torch.int32


def test_float_targets_of_the_outputs_shape_count_their_most_likely_class(seed):
    """Training takes probabilities (one-hot, smoothed) of the outputs' shape, and so does evaluate: their
    most likely class counts, so prune with such validation data runs through instead of failing after it
    trained."""
    inputs, classes = tiny_task().tensors
    smoothed = TensorDataset(inputs, torch.nn.functional.one_hot(classes, 3) * 0.8 + 0.2 / 3)
    model = tiny_model()
    indices = evaluate(model, tiny_task())
    assert evaluate(model, smoothed) == indices and 0.0 < indices < 1.0
    _, result = bipkernels.prune(tiny_model(), smoothed, "bip", 0.5, epochs=1, val_data=smoothed, test_data=smoothed)
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_fit_checks_its_position_and_callback_and_warns_past_total_steps(seed):
    solver = bipkernels.BiP(tiny_model(), 0.5, total_steps=5)
    for start in ((0, 100), (5, 3), (2, 1)):
        with pytest.raises(ValueError, match=rf"BiP.fit: start {re.escape(str(start))} lies past the run: 2 epochs"):
            solver.fit(tiny_task(), 2, batch_size=32, start=start)
    with pytest.raises(TypeError, match=r"BiP.fit: on_step must be callable or None, got int 5"):
        solver.fit(tiny_task(), 1, batch_size=32, on_step=5)
    with pytest.raises(TypeError, match=r"BiP.step: closure must be callable, got NoneType None"):
        solver.step(None)
    assert solver.iteration == 0
    with pytest.warns(UserWarning, match=r"BiP.fit: 6 steps from iteration 0 run past total_steps=5"):
        solver.fit(tiny_task(), 2, batch_size=32)


def test_load_state_dict_checks_the_state_before_changing_anything(seed):
    solver = bipkernels.BiP(tiny_model(), 0.5, total_steps=10)
    solver.fit(tiny_task(), 1, batch_size=32)
    before = copy.deepcopy(solver.state_dict())
    wider = bipkernels.BiP(nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 3)), 0.8, total_steps=10)
    filters = bipkernels.BiP(tiny_model(), 0.5, "filter", total_steps=10)
    cases = [(wider.state_dict(), r"the state is of another model: \d+ entries"),
             (filters.state_dict(), r"layer '0' is unstructured here but filter in the state"),
             ({"model": before["model"]}, "not a BiP state"),
             ({**before, "settings": {**before["settings"], "sparsity": 0.7, "lr": 0.05}},
              r"the state is of a run with other settings \(sparsity 0.7 there, 0.5 here; lr 0.05 there, 0.1 here\)")]
    for state, message in cases:
        with pytest.raises(ValueError, match=rf"BiP.load_state_dict: {message}"):
            solver.load_state_dict(state)
        for key, value in solver.state_dict()["model"].items():
            assert torch.equal(value, before["model"][key]) if isinstance(value, torch.Tensor) else True, key


def test_a_faithful_step_cut_short_after_a_lower_step_is_refused_until_reloaded(seed):
    solver = bipkernels.BiP(tiny_model(), 0.5, mode="faithful", lower_steps=2, total_steps=10)
    inputs, targets = tiny_task().tensors
    lower = closure_on(solver.model, inputs, targets)
    calls = []

    def lower_then_fail():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return lower()

    saved = copy.deepcopy(solver.state_dict())
    with pytest.raises(KeyboardInterrupt):
        solver.step(lower_then_fail, closure_on(solver.model, inputs, targets))
    with pytest.raises(RuntimeError, match=r"BiP.state_dict: a faithful step failed after 1 of its lower-level steps"):
        solver.state_dict()
    solver.load_state_dict(saved)
    solver.step(lower, closure_on(solver.model, inputs, targets))


def test_recalibration_keeps_every_modules_mode_and_fine_tuning_keeps_no_score_gradient(seed):
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Dropout(0.5), nn.Linear(24, 3))
    model.train()
    model[2].eval()  # a user's choice inside a model in training mode
    recalibrate_batchnorm(model, tiny_task())
    assert model.training and model[1].training and not model[2].training
    bipkernels.prune(model, tiny_task(), "omp", 0.5, finetune_epochs=1)
    assert all(layer.scores.grad is None for _, layer in bipkernels.masked_layers(model))


def test_random_pruning_draws_one_number_per_block(seed):
    """Global structured random pruning keeps a wide layer's filters as often as a narrow layer's: with a
    uniform score per weight a block ranked by the sum of its draws, so every filter of the 100-input
    layer stayed and every filter of the 4-input one went."""
    from bipkernels.solvers.omp import random_prune

    kept = torch.zeros(2)
    for trial in range(40):
        model = nn.Sequential(nn.Linear(100, 10), nn.Linear(4, 10))
        random_prune(model, tiny_task(), 0.5, "filter", finetune_epochs=0, seed=trial)
        kept += torch.tensor([float(model[0].mask().any(1).sum()), float(model[1].mask().any(1).sum())])
        assert kept_blocks(model) == 10
    assert 3.5 < kept[0] / 40 < 6.5 and 3.5 < kept[1] / 40 < 6.5, kept / 40
    for structure in ("channel", "tile3x5", parse_structure("filter", p=2)):  # each block score one uniform draw
        model = nn.Sequential(nn.Linear(100, 10), nn.Linear(4, 10))
        random_prune(model, tiny_task(), 0.0, structure, finetune_epochs=0, seed=seed)
        for _, layer in bipkernels.masked_layers(model):
            block_scores = layer.block_scores()
            assert bool(((block_scores > 0) & (block_scores < 1)).all()), (structure, block_scores)


def test_imp_takes_the_largest_seed_and_checks_rewind_shapes(seed):
    model = tiny_model()
    rewind = {key: value.clone() for key, value in model.state_dict().items()}
    bipkernels.prune(copy.deepcopy(model), tiny_task(), "imp", 0.4, finetune_epochs=1, seed=2**32 - 1)  # 2 rounds
    rewind["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"imp: rewind_state\['0.weight'\] has shape \(3, 3\) but the model's "
                                         r"tensor has shape \(24, 12\)"):
        imp(model, tiny_task(), 0.4, rewind_state=rewind)
    assert not bipkernels.masked_layers(model)  # refused before converting
    normed = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Linear(24, 3))
    rewind = {**normed.state_dict(), "1.running_mean": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"imp: rewind_state\['1.running_mean'\] has shape \(5,\)"):
        imp(normed, tiny_task(), 0.4, rewind_state=rewind)


def test_recalibration_on_empty_data_keeps_the_statistics(seed):
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Linear(24, 3))
    model(torch.randn(32, 12))
    before = {key: value.clone() for key, value in model[1].state_dict().items()}
    recalibrate_batchnorm(model, TensorDataset(torch.empty(0, 12), torch.empty(0, dtype=torch.int64)))
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_prune_checks_every_split_and_the_mode_before_the_model_changes(seed):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"prune: val_data: ValueError: .*\(input, target\) pairs, got int"):
        bipkernels.prune(model, tiny_task(), "omp", 0.5, val_data=[1, 2, 3], finetune_epochs=0)

    class Undecodable(TensorDataset):
        def __getitem__(self, index):
            import json
            return json.loads("{")

    with pytest.raises(ValueError, match=r"prune: test_data: JSONDecodeError: Expecting property name"):
        bipkernels.prune(model, tiny_task(), "omp", 0.5, test_data=Undecodable(torch.zeros(2)), finetune_epochs=0)
    with pytest.raises(ValueError, match=r"prune: mode must be"):
        bipkernels.prune(model, tiny_task(), "bip", 0.5, epochs=1, mode="x")
    assert not bipkernels.masked_layers(model)


@pytest.mark.parametrize("method", ["bip", "hydra"])
def test_prune_seeds_dropout_on_generators_of_its_own(seed, method):
    data = tiny_task()
    dense = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 3))
    runs = []
    for caller_seed in (1, 2):  # the caller's stream differs between the two calls
        torch.manual_seed(caller_seed)
        caller_state = torch.get_rng_state()
        pruned, _ = bipkernels.prune(copy.deepcopy(dense), data, method, 0.7, epochs=2, finetune_epochs=1,
                                     batch_size=16, seed=5)
        assert torch.equal(torch.get_rng_state(), caller_state)
        runs.append(pruned.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]) if torch.is_tensor(value) else value == runs[1][key], key


@pytest.mark.parametrize("method", bipkernels.solvers.METHODS)
def test_prune_refuses_a_structure_other_than_the_masked_layers_own(seed, method):
    model = bipkernels.convert(tiny_model(), 0.5)  # unstructured
    masks = bipkernels.masks(model)
    with pytest.raises(ValueError, match=r"prune: structure 'filter', but the model is already masked and its "
                                         r"layer '0' has structure unstructured"):
        bipkernels.prune(model, tiny_task(), method, 0.7, structure="filter", epochs=1, finetune_epochs=1)
    assert all(torch.equal(mask, masks[name]) for name, mask in bipkernels.masks(model).items())
    bipkernels.prune(model, tiny_task(), method, 0.7, structure="unstructured", epochs=1, finetune_epochs=1)


def test_prune_checks_the_targets_against_the_logits_before_the_model_changes(seed):
    model = tiny_model()
    inputs, targets = tiny_task().tensors
    wrong = targets.clone()
    wrong[50] = 7  # the model has 3 classes; not the first example: a TensorDataset's targets are all checked
    with pytest.raises(ValueError, match=r"prune: train_data: target 7 is not a class index of the model's 3 classes "
                                         r"\(0 to 2, or cross_entropy's ignore_index -100\)"):
        bipkernels.prune(model, TensorDataset(inputs, wrong), "bip", 0.5, epochs=1)
    with pytest.raises(ValueError, match=r"prune: test_data: float targets \(probabilities\) of shape \(2, 5\) but "
                                         r"the model's outputs have shape \(2, 3\)"):
        bipkernels.prune(model, tiny_task(), "omp", 0.5, test_data=TensorDataset(inputs, torch.rand(96, 5)))
    assert not bipkernels.masked_layers(model) and model.training
    # What trains under cross_entropy passes: ignore_index, dense outputs, a forward that needs a batch.
    wrong[50] = -100
    bipkernels.prune(copy.deepcopy(model), TensorDataset(inputs, wrong), "omp", 0.5, finetune_epochs=1)
    dense = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    pixels = TensorDataset(torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8, 4, 4)))
    bipkernels.prune(dense, pixels, "omp", 0.5, finetune_epochs=1, batch_size=4)


def test_prune_runs_the_evaluated_splits_before_the_model_changes(seed):
    """Validation and test data that the model cannot run (another input size or dtype), or class indices
    of another shape than its outputs take, used to fail in evaluate after the whole run: now before it."""
    model = tiny_model()
    inputs, targets = tiny_task().tensors
    with pytest.raises(ValueError, match=r"prune: test_data: the model's forward \(eval mode, no gradients\) failed "
                                         r"on its first examples, inputs of shape \(2, 13\) and dtype torch.float32: "
                                         "RuntimeError"):
        bipkernels.prune(model, tiny_task(), "bip", 0.5, epochs=1, test_data=TensorDataset(torch.randn(4, 13),
                                                                                           targets[:4]))
    with pytest.raises(ValueError, match=r"prune: val_data: the model's forward .* dtype torch.float64"):
        bipkernels.prune(model, tiny_task(), "bip", 0.5, epochs=1, val_data=TensorDataset(inputs.double(), targets))
    columns = TensorDataset(inputs, targets[:, None].repeat(1, 3))
    for name, splits in (("train_data", (columns, None)), ("val_data", (tiny_task(), columns))):
        with pytest.raises(ValueError, match=rf"prune: {name}: class-index targets of shape \(2, 3\), but the "
                                             r"model's outputs of shape \(2, 3\) take \(2,\)"):
            bipkernels.prune(model, splits[0], "bip", 0.5, epochs=1, val_data=splits[1])
    assert not bipkernels.masked_layers(model)


def token_task(seed: int, vocabulary: int = 12, width: int = 8, sequences: int = 48, length: int = 5):
    """A GPT-like model (token embedding, a per-token MLP, logits over the vocabulary) and next-token data
    of a fixed random bigram map: (batch, tokens) inputs and targets, (batch, tokens, vocabulary) logits."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocabulary, generator=generator)
    tokens = [torch.randint(0, vocabulary, (sequences,), generator=generator)]
    for _ in range(length):
        tokens.append(successor[tokens[-1]])
    tokens = torch.stack(tokens, 1)
    model = nn.Sequential(nn.Embedding(vocabulary, width), nn.Linear(width, width), nn.GELU(),
                          nn.Linear(width, vocabulary))
    return model, TensorDataset(tokens[:, :-1], tokens[:, 1:])


def token_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def test_prune_points_a_language_model_to_its_loss_fn(seed):
    """A language model's (batch, tokens, vocabulary) logits with next-token targets: prune's default
    cross_entropy reads classes in dim 1, and its error said the targets should be (batch, vocabulary), with
    no word of the way that trains such a model. It names prune's loss_fn; BiP.fit's runs under autocast."""
    model, data = token_task(seed)
    with pytest.raises(ValueError, match=r"prune: train_data: class-index targets of shape \(2, 5\), but the model's "
                                         r"outputs of shape \(2, 5, 12\) take \(2, 12\) .* classes in the last dim .* "
                                         r"prune\(..., loss_fn=...\)"):
        bipkernels.prune(model, data, "bip", 0.5, epochs=1, batch_size=8)
    assert not bipkernels.masked_layers(model)
    solver = bipkernels.BiP(model, 0.5, total_steps=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        solver.fit(data, 1, batch_size=8, loss_fn=token_loss)
    assert len(bipkernels.masks(model)) == 2 and kept_blocks(model) == bipkernels.keep_count(8 * (8 + 12), 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_prune_trains_every_method_on_a_loss_of_its_own(seed, method):
    """prune trained every method on cross_entropy with classes in dim 1, and only BiP.fit took a loss of
    the caller's: a language model could not be pruned by OMP, IMP, HYDRA or random pruning. With loss_fn,
    each reaches its exact kept count and lowers the token loss, and reports the loss, not an accuracy.
    Fine-tuning takes 8 epochs: after 4, random pruning's loss stayed above the dense model's for about one
    seed in 30 (956768863: 2.406 against 2.391); after 8 it was at least 0.28 below it on 151 seeds."""
    model, data = token_task(seed)
    before = mean_loss(model, data, token_loss)
    model, result = bipkernels.prune(model, data, method, 0.5, epochs=4, finetune_epochs=8, batch_size=8,
                                     seed=seed, val_data=data, loss_fn=token_loss)
    assert len(bipkernels.masks(model)) == 2 and kept_blocks(model) == bipkernels.keep_count(8 * (8 + 12), 0.5)
    assert result["val_accuracy"] is None and result["test_loss"] is None
    assert result["val_loss"] < before
    assert result["val_loss"] == pytest.approx(mean_loss(model, data, token_loss))


@pytest.mark.parametrize("method", METHODS)
def test_a_loss_of_its_own_gets_the_targets_as_the_data_give_them(seed, method):
    """The squeeze of (N, 1) integer targets to (N,) and their cast to int64 are for the default
    cross_entropy: a loss of the caller's got them too, so a language model's one-token sequences came as
    (B,) int64 instead of (B, 1) int32. Every place that hands it targets (prune's check, training,
    the validation loss) now gives them stacked as they come."""
    model, data = token_task(seed, length=1)
    inputs, targets = data.tensors
    data = TensorDataset(inputs, targets.int())
    seen = set()

    def recording_loss(logits, targets):
        seen.add((tuple(targets.shape[1:]), targets.dtype))
        return token_loss(logits, targets.long())

    bipkernels.prune(model, data, method, 0.5, epochs=1, finetune_epochs=1, batch_size=8, seed=seed,
                     val_data=data, loss_fn=recording_loss)
    assert seen == {((1,), torch.int32)}


def test_prune_checks_its_loss_fn_before_it_changes_the_model(seed):
    """With a loss of the caller's, prune does not impose the classification shapes, but still refuses,
    before the model changes, a loss_fn that is not callable, fails on a split's first examples (here
    targets of one token fewer in the validation data) or gives more than one value."""
    model, data = token_task(seed)
    inputs, targets = data.tensors
    short = TensorDataset(inputs, targets[:, :-1])
    cases = [("omp", None, lambda logits, targets: logits.sum() * targets, ValueError,
              r"prune: train_data: loss_fn must give one value .* got shape \(2, 5\)"),
             ("imp", short, token_loss, ValueError,
              r"prune: val_data: loss_fn failed on the model's outputs of shape \(2, 5, 12\) and targets of "
              r"shape \(2, 4\): ValueError: Expected input batch_size \(10\) to match target batch_size \(8\)"),
             ("random", None, "cross_entropy", TypeError,
              r"prune: loss_fn must be callable or None, got str 'cross_entropy'")]
    for method, val_data, loss_fn, kind, message in cases:
        with pytest.raises(kind, match=message):
            bipkernels.prune(model, data, method, 0.5, finetune_epochs=1, batch_size=8, val_data=val_data,
                             loss_fn=loss_fn)
    assert not bipkernels.masked_layers(model)


@pytest.mark.parametrize(("method", "bad"), [("bip", {"lr": -1.0}), ("bip", {"lower_steps": 2}),
                                             ("imp", {"rate": 1.5}), ("imp", {"rewind_state": {"0.weight": 0}}),
                                             ("omp", {"lr": -1.0}), ("hydra", {"score_lr": float("nan")})])
def test_a_bad_setting_of_the_method_leaves_an_excluding_prune_untouched(seed, method, bad):
    """With exclude=, prune converts the model itself before the method runs: a bad setting of the method
    was raised after that, and a corrected retry was refused ("already masked")."""
    model = tiny_model()
    with pytest.raises((ValueError, TypeError)):
        bipkernels.prune(model, tiny_task(), method, 0.5, exclude="0", epochs=1, finetune_epochs=1, **bad)
    assert not bipkernels.masked_layers(model)
    bipkernels.prune(model, tiny_task(), method, 0.5, exclude="0", epochs=1, finetune_epochs=1)
    assert type(model[0]) is nn.Linear and bipkernels.masked_layers(model)


def test_a_state_saved_with_numpy_settings_loads_with_weights_only(seed, tmp_path):
    solver = bipkernels.BiP(tiny_model(), np.float64(0.5), lr=np.float32(0.1), total_steps=np.int64(10))
    torch.save(solver.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["settings"]["total_steps"] == 10 and type(state["settings"]["sparsity"]) is float
    bipkernels.BiP(tiny_model(), 0.5, lr=float(np.float32(0.1)), total_steps=10).load_state_dict(state)


def test_train_weights_epochs_past_2_32_are_refused():
    """epoch_batches' generators keep 32 bits of the epoch: epoch 2^32 would repeat epoch 0's batches."""
    from bipkernels.solvers.training import train_weights
    data = [(torch.zeros(2), 0)] * 4
    with pytest.raises(ValueError, match="first_epoch"):
        train_weights(nn.Linear(2, 2), data, 2, first_epoch=2**32 - 1)


def tiny_conv_task(seed: int = 0):
    """A conv net whose filters differ in size (9, 36 and 16 weights) on 32 random 8×8 images: a global
    filter projection at 80% keeps blocks of the big middle layer only."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 3))
    return model, TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,)))


@pytest.mark.parametrize("method, masked_before", [("imp", False), ("omp", True), ("random", False)])
def test_every_solver_names_the_layers_a_global_projection_empties(seed, method, masked_before):
    """convert warns when a global projection keeps no block of a layer; IMP and random pruning, which
    convert at sparsity 0 and then project, and OMP on a masked model warned of nothing. IMP names a
    layer once, in the round it empties, not again in every later round."""
    model, data = tiny_conv_task()
    if masked_before:
        bipkernels.convert(model, 0.0, "filter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = bipkernels.prune(model, data, method, 0.8, structure="filter", finetune_epochs=1,
                                     batch_size=16, seed=2)
    emptied = [str(w.message) for w in caught if "the global projection keeps no block of" in str(w.message)]
    empty_layers = [name for name, layer_sparsity in result["layers"].items() if layer_sparsity == 1.0]
    owner = {"imp": "imp", "omp": "omp", "random": "random_prune"}[method]
    assert empty_layers and emptied and emptied[-1].startswith(
        f"{owner}: the global projection keeps no block of {', '.join(empty_layers)}: ")
    assert len(set(emptied)) == len(emptied)
    assert not [w for w in caught if "masks of the layers already masked changed" in str(w.message)]


def test_prune_names_an_option_the_method_does_not_take_before_the_model_changes(seed):
    """A misspelt option reached BiP.__init__ or omp() as a raw TypeError naming them, after the checks;
    rewind_state, which only IMP reads, was ignored by the others."""
    model = tiny_model()
    with pytest.raises(ValueError, match=r"prune: rewind_state is IMP's .*; method 'omp' takes none"):
        bipkernels.prune(model, tiny_task(), "omp", 0.5, rewind_state=model.state_dict())
    with pytest.raises(TypeError, match=r"prune: method 'bip' takes no option 'score_lrr' \(its options: mode, lr, "
                                        r"score_lr, momentum, .*step_scores_in_backward, group; besides prune's own"):
        bipkernels.prune(model, tiny_task(), "bip", 0.5, epochs=1, score_lrr=0.1)
    with pytest.raises(TypeError, match=r"prune: method 'omp' takes no option 'inv_gamma', 'mode' \(its options: lr;"):
        bipkernels.prune(model, tiny_task(), "omp", 0.5, inv_gamma=1e-4, mode="fused")
    with pytest.raises(TypeError, match=r"method 'hydra' takes no option 'rate' \(its options: score_lr, lr;"):
        bipkernels.prune(model, tiny_task(), "hydra", 0.5, rate=0.5)
    with pytest.raises(ValueError, match=r"prune: epochs_per_round=3: prune sets it to finetune_epochs"):
        bipkernels.prune(model, tiny_task(), "imp", 0.5, epochs_per_round=3)
    assert not bipkernels.masked_layers(model)
    _, result = bipkernels.prune(model, tiny_task(), "imp", 0.5, finetune_epochs=1, rate=0.5, lr=0.01)
    assert result["epochs"] == 1


@pytest.mark.parametrize("mode", ["fused", "faithful"])
def test_step_returns_the_loss_detached(seed, mode):
    """The backward has run: float(loss) of a tensor that still requires grad warns."""
    model = tiny_model(seed)
    solver = bipkernels.BiP(model, 0.5, mode=mode, total_steps=4)
    closure = closure_on(model, *tiny_task(seed=seed).tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = solver.step(closure) if mode == "fused" else solver.step(closure, closure)
        assert not loss.requires_grad and float(loss) > 0
    def number():  # a closure's loss that is not a tensor comes back as it is
        return 2.5

    assert (solver.step(number) if mode == "fused" else solver.step(number, number)) == 2.5
    assert solver.fit(tiny_task(seed=seed), 1, batch_size=48, seed=seed) == (1, 0)


@pytest.mark.parametrize("method", bipkernels.solvers.METHODS)
def test_a_forward_that_fails_on_the_first_batch_leaves_the_model_untouched(seed, method):
    """The model converted first and failed in training with a raw RuntimeError, its batch norm already
    updated by the failed training forward."""
    model = nn.Sequential(nn.BatchNorm1d(12), nn.Dropout(0.5), nn.Linear(10, 3))  # the data have 12 features
    state = copy.deepcopy(model.state_dict())
    caller_stream = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"prune: the model's forward \(eval mode, no gradients\) failed on the first "
                                         r"training batch, inputs of shape \(16, 12\) and dtype torch.float32: "
                                         r"RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        bipkernels.prune(model, tiny_task(), method, 0.5, epochs=1, finetune_epochs=1, batch_size=16)
    assert not bipkernels.masked_layers(model) and model.training
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), caller_stream)


def test_the_training_data_checks_leave_the_stream_statistics_and_modes_as_they_were(seed):
    """check_training_data (the solvers' check of their data: two examples, then the first batch's forward)
    over data that draw as they are read: the caller's generator, which training draws from next, stays
    where it was (the reads drew from it, outside the fork around the forward), as do the batch-norm
    statistics and every module's mode."""
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model[2].eval()  # a mode of its own inside a model in training mode
    state = copy.deepcopy(model.state_dict())
    caller_stream = torch.get_rng_state()
    training.check_training_data("test", model, DrawingAsRead(tiny_task(seed=seed)), 1, 16, seed)
    assert torch.equal(torch.get_rng_state(), caller_stream)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert [module.training for module in model.modules()] == [True, True, True, False, True]


@pytest.mark.parametrize("method", ["bip", "omp", "imp", "hydra", "random"])
def test_every_method_leaves_excluded_layers_dense(seed, method):
    """2:4 with a first convolution of 3 input channels, which 4 does not divide: excluded, it stays a plain
    Conv2d under every method, whether prune converts (exclude=) or the model came masked without it (OMP,
    IMP and random pruning converted such a layer, unstructured, and pruned it)."""
    def model_and_data():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 3))
        return model, TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,)))

    settings = dict(epochs=1, finetune_epochs=1, batch_size=16, seed=seed)
    model, data = model_and_data()
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\)"):  # not excluded: 2:4 does not fit it
        bipkernels.prune(model, data, method, 0.5, structure="2:4", **settings)
    assert type(model[0]) is nn.Conv2d and not bipkernels.masked_layers(model)
    results = []
    for masked_before in (False, True):
        model, data = model_and_data()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if masked_before:
                bipkernels.convert(model, 0.0, "2:4", exclude="0")
                _, result = bipkernels.prune(model, data, method, 0.5, **settings)
            else:
                _, result = bipkernels.prune(model, data, method, 0.5, structure="2:4", exclude="0", **settings)
        assert type(model[0]) is nn.Conv2d and list(result["layers"]) == ["2", "6"], (masked_before, result)
        assert result["structure"] == "2:4"
        results.append(result["layers"])
    assert results[0] == results[1]
    with pytest.raises(ValueError, match=r"prune: exclude='0', but the model is already masked"):
        bipkernels.prune(model, data, method, 0.5, exclude="0", **settings)


@pytest.mark.parametrize("method", bipkernels.solvers.METHODS)
def test_an_exclude_of_every_layer_is_refused_with_the_model_untouched(seed, method):
    """exclude= naming every Conv2d and Linear left convert nothing to mask, and every method then
    converted the unmasked model whole: the excluded layers pruned after all."""
    model, data = tiny_conv_task(seed)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error says it all, without convert's "nothing to mask"
        with pytest.raises(ValueError, match=r"prune: exclude=\['0', '2', '6'\] leaves no nn.Conv2d or nn.Linear"):
            bipkernels.prune(model, data, method, 0.5, exclude=["0", "2", "6"], epochs=1, finetune_epochs=1,
                             batch_size=16)
    assert not bipkernels.masked_layers(model) and type(model[0]) is nn.Conv2d
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def oracle_gradients(weights, biases, masks, inputs, targets):
    """(g, bias gradients) of tiny_model's two linear layers: g = ∂l/∂z of each effective weight z = m ⊙ θ,
    by dense autograd."""
    effective = [(weight * mask).requires_grad_() for weight, mask in zip(weights, masks)]
    bias = [b.clone().requires_grad_() for b in biases]
    hidden = F.relu(F.linear(inputs, effective[0], bias[0]))
    F.cross_entropy(F.linear(hidden, effective[1], bias[1]), targets).backward()
    return [z.grad for z in effective], [b.grad for b in bias]


def oracle_masks(scores, sparsity):
    """The global top-k of |s| over the layers (ties have probability 0 in float64)."""
    flat = torch.cat([score.abs().flatten() for score in scores])
    kept = torch.zeros(flat.shape, dtype=torch.bool)
    kept[flat.topk(bipkernels.keep_count(flat.numel(), sparsity)).indices] = True
    return [part.view_as(score) for part, score in zip(kept.split([s.numel() for s in scores]), scores)]


class BiPOracle:
    """BiP on tiny_model (float64) by hand, as the paper and torch.optim.SGD define each update: weights and
    biases take SGD with weight decay (grad + wd·θ) and momentum (buffer = grad at the first step, then
    μ·buffer + grad) on m ⊙ g; scores take SGD with momentum on sign(s) ⊙ (θ ⊙ g − inv_gamma · m ⊙ g ⊙ g);
    both rates follow the cosine 0.5·(1 + cos(π·t / total_steps)) at iteration t; after every iteration
    the masks are the global top-k of |s|."""

    def __init__(self, model, sparsity, lr, score_lr, momentum, score_momentum, weight_decay, inv_gamma,
                 total_steps):
        layers = (model[0], model[2])
        self.weights = [layer.weight.detach().clone() for layer in layers]
        self.biases = [layer.bias.detach().clone() for layer in layers]
        self.scores = [layer.weight.detach().abs() for layer in layers]  # convert's |θ|
        self.sparsity, self.masks = sparsity, oracle_masks(self.scores, sparsity)
        self.lr, self.score_lr, self.momentum, self.score_momentum = lr, score_lr, momentum, score_momentum
        self.weight_decay, self.inv_gamma, self.total_steps = weight_decay, inv_gamma, total_steps
        self.buffers, self.iteration = {}, 0

    def _sgd(self, key, value, grad, lr, momentum):
        buffer = self.buffers.get(key)
        self.buffers[key] = buffer = grad.clone() if buffer is None else momentum * buffer + grad
        return value - lr * buffer

    def _factor(self):
        return 0.5 * (1.0 + math.cos(math.pi * min(self.iteration / self.total_steps, 1.0)))

    def _weight_step(self, g, bias_grads):
        lr = self.lr * self._factor()
        for i in range(2):
            self.weights[i] = self._sgd(("weight", i), self.weights[i],
                                        self.masks[i] * g[i] + self.weight_decay * self.weights[i], lr, self.momentum)
            self.biases[i] = self._sgd(("bias", i), self.biases[i],
                                       bias_grads[i] + self.weight_decay * self.biases[i], lr, self.momentum)

    def _score_step(self, g):
        lr = self.score_lr * self._factor()
        for i in range(2):
            sign = torch.where(self.scores[i] < 0, -1.0, 1.0).double()
            grad = sign * (self.weights[i] * g[i] - self.inv_gamma * self.masks[i] * g[i] * g[i])
            self.scores[i] = self._sgd(("scores", i), self.scores[i], grad, lr, self.score_momentum)

    def _gradients(self, batch):
        return oracle_gradients(self.weights, self.biases, self.masks, *batch)

    def step(self, lower_batches, upper_batch=None):
        """Fused (no ``upper_batch``): both levels from one backward at θ on lower_batches[0]. Faithful: a
        weight step on each lower batch, then the score step at the new θ on ``upper_batch``."""
        if upper_batch is None:
            g, bias_grads = self._gradients(lower_batches[0])
            self._score_step(g)  # at θ before its step
            self._weight_step(g, bias_grads)
        else:
            for batch in lower_batches:
                self._weight_step(*self._gradients(batch))
            self._score_step(self._gradients(upper_batch)[0])
        self.masks = oracle_masks(self.scores, self.sparsity)
        self.iteration += 1


def float64_task(seed):
    inputs, targets = tiny_task(n=64, seed=seed).tensors
    return TensorDataset(inputs.double(), targets)


@pytest.mark.parametrize("mode", ["fused", "faithful"])
def test_fit_takes_the_papers_updates_step_by_step(seed, mode):
    """Two epochs of BiP.fit against BiPOracle on the batches that fit takes (epoch_batches; faithful:
    each lower step on its own batch, the score step on the next one), with every setting away from
    zero and one, so that each of them (momenta, weight decay, rates, their schedules, the implicit term
    and its inv_gamma) changes the result."""
    data, model = float64_task(seed), tiny_model(seed).double()
    lower_steps, batch_size, epochs = (1 if mode == "fused" else 2), 8, 2
    per_step = 1 if mode == "fused" else lower_steps + 1
    total_steps = epochs * (64 // batch_size // per_step)
    settings = dict(lr=0.2, score_lr=0.5, momentum=0.7, score_momentum=0.8, weight_decay=0.05, inv_gamma=0.3,
                    total_steps=total_steps)
    oracle = BiPOracle(model, 0.6, **settings)
    solver = bipkernels.BiP(model, 0.6, mode=mode, lower_steps=lower_steps, **settings)
    solver.fit(data, epochs, batch_size=batch_size, seed=seed)
    run_oracle(oracle, data, epochs, batch_size, seed, per_step)
    assert solver.iteration == oracle.iteration == total_steps
    assert_model_is_the_oracles(model, oracle)


def run_oracle(oracle, data, epochs, batch_size, seed, per_step=1):
    """``oracle`` through the steps of BiP.fit(data, epochs, batch_size, seed): the batches of epoch_batches
    in groups of ``per_step`` (1: fused; faithful: the lower batches, then the upper one)."""
    for epoch in range(epochs):
        batches = [tuple(tensor[indices] for tensor in data.tensors)
                   for indices in epoch_batches(data, batch_size, seed, epoch)]
        for start in range(0, len(batches) - per_step + 1, per_step):
            group = batches[start:start + per_step]
            oracle.step(group) if per_step == 1 else oracle.step(group[:-1], group[-1])


def assert_model_is_the_oracles(model, oracle):
    for i, layer in enumerate((model[0], model[2])):
        torch.testing.assert_close(layer.weight.detach(), oracle.weights[i], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(layer.bias.detach(), oracle.biases[i], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(layer.scores.detach(), oracle.scores[i], rtol=1e-7, atol=1e-9)
        assert torch.equal(layer.mask(), oracle.masks[i])


def test_hydra_searches_the_scores_with_the_weights_frozen_and_no_implicit_term(seed):
    """HYDRA's score phase is BiPOracle with weight rate, momentum and decay 0 and inv_gamma 0 (the
    straight-through gradient θ ⊙ g alone): the weights stay as they were, the scores take every step."""
    data, model = float64_task(seed), tiny_model(seed).double()
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    steps = 2 * steps_per_epoch(64, 16)
    oracle = BiPOracle(model, 0.7, lr=0.0, score_lr=0.3, momentum=0.0, score_momentum=0.9, weight_decay=0.0,
                       inv_gamma=0.0, total_steps=steps)
    hydra(model, data, 0.7, score_epochs=2, finetune_epochs=0, score_lr=0.3, batch_size=16, seed=seed)
    run_oracle(oracle, data, 2, 16, seed)
    assert oracle.iteration == steps
    assert all(torch.equal(model[i].weight, weight) for i, weight in zip((0, 2), weights))
    assert_model_is_the_oracles(model, oracle)


def test_recalibration_averages_the_batches_statistics(seed):
    """recalibrate_batchnorm: a running mean and variance are the averages over the batches of the batch
    means and unbiased variances (momentum None: a cumulative average, whatever the statistics held), and
    the norm keeps its momentum."""
    inputs = torch.randn(40, 3, 5, 5, dtype=torch.float64) * 2 + 1
    norm = nn.BatchNorm2d(3, momentum=0.3).double()
    norm.running_mean.fill_(7.0)
    recalibrate_batchnorm(nn.Sequential(norm), TensorDataset(inputs, torch.zeros(40, dtype=torch.long)), batch_size=8)
    batches = inputs.split(8)
    torch.testing.assert_close(norm.running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0))
    assert norm.momentum == 0.3


@pytest.mark.parametrize("method", ["bip", "omp"])
def test_prune_recalibrates_the_batch_norms_under_the_final_masks(seed, method):
    """After pruning, a batch norm's running statistics are those of its inputs over the training data
    (one batch of 96: their mean and unbiased variance) through the pruned layer before it."""
    data = tiny_task(seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 3))
    bipkernels.prune(model, data, method, 0.7, epochs=1, finetune_epochs=1, batch_size=16, seed=seed)
    with torch.no_grad():
        hidden = model[0](data.tensors[0])
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0))
    torch.testing.assert_close(model[1].running_var, hidden.var(0))


@pytest.mark.parametrize("mode", ["fused", "faithful"])
def test_prune_schedules_bip_over_exactly_its_steps(seed, monkeypatch, mode):
    """prune builds its BiP with total_steps = epochs × steps_per_epoch (of the mode): the run ends exactly
    there, where both cosine schedules reach rate 0."""
    solvers = []

    class Recorded(bipkernels.BiP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            solvers.append(self)

    monkeypatch.setattr(importlib.import_module("bipkernels.solvers.prune"), "BiP", Recorded)
    bipkernels.prune(tiny_model(seed), tiny_task(seed=seed), "bip", 0.5, epochs=2, batch_size=16, mode=mode)
    (solver,) = solvers
    assert solver.iteration == solver.total_steps == 2 * steps_per_epoch(96, 16, mode)
    for optimizer in (solver.weight_optimizer, solver.score_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_imp_prunes_the_remaining_by_the_trained_magnitudes_and_rewinds_every_round(seed, monkeypatch):
    """IMP by hand, with training replaced by fresh random weights (so that each round's ranking is known):
    round r keeps keep_count(n, 1 − 0.8^r) weights (the target in the last), the largest |θ| that the
    previous round trained among those it kept (the model's own weights for the first round; a pruned
    weight never comes back), and trains from the rewind weights."""
    generator = torch.Generator().manual_seed(seed)
    rounds = []  # each round's (weights it trains from, masks, weights it trained to)

    def random_training(model, *args, **kwargs):
        layers = (model[0], model[2])
        start, masks = [layer.weight.detach().clone() for layer in layers], [layer.mask() for layer in layers]
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        rounds.append((start, masks, [layer.weight.detach().clone() for layer in layers]))
        return 0

    monkeypatch.setattr(importlib.import_module("bipkernels.solvers.imp"), "train_weights", random_training)
    model = tiny_model(seed)
    rewind = {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}
    ranked = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    kept = [torch.ones(weight.shape, dtype=torch.bool) for weight in ranked]
    imp(model, tiny_task(), 0.6, rewind_state=rewind, epochs_per_round=1)
    targets = [1 - 0.8**r for r in range(1, 5)] + [0.6]  # 20% of the remaining per round, the last capped
    assert len(rounds) == len(targets)
    for (start, masks, trained), target in zip(rounds, targets):
        kept = oracle_masks([torch.where(mask, weight.abs(), 0.0) for mask, weight in zip(kept, ranked)], target)
        assert all(torch.equal(mask, expected) for mask, expected in zip(masks, kept))
        assert torch.equal(start[0], rewind["0.weight"]) and torch.equal(start[1], rewind["2.weight"])
        ranked = trained
    assert torch.equal(model[0].mask(), kept[0]) and torch.equal(model[2].mask(), kept[1])
