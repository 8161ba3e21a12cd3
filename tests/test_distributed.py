"""BiP across two processes (torch.multiprocessing spawn): DistributedDataParallel keeps every rank's
masks identical, and sharded scores get the exact single-process threshold.

The same checks run on gloo on the CPU and, where there are two CUDA GPUs and NCCL, on NCCL with one GPU
per rank. One spawn per backend runs every check (starting processes is the slow part); a failing rank's
traceback comes back through torch.multiprocessing.spawn."""

from __future__ import annotations

import copy
import datetime
import itertools
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import bipkernels
from bipkernels import distributed
from bipkernels.solvers.hydra import hydra
from bipkernels.solvers.imp import imp
from bipkernels.solvers.omp import omp, random_prune
from bipkernels.solvers import training
from bipkernels.solvers.training import epoch_batches, train_weights

from conftest import tied_scores, with_specials

WORLD = 2


def _shards(generator: torch.Generator, case: int) -> list[list[torch.Tensor]]:
    """Every rank's block scores for one case, the same on every rank (drawn from a shared generator):
    odd sizes, an empty shard, ties across ranks, NaN / ±inf / -0.0, and float32, float64 and float16."""
    dtype = (torch.float32, torch.float64, torch.float16)[case % 3]
    shards = []
    for rank in range(WORLD):
        count = 0 if case % 5 == 4 and rank == 0 else int(torch.randint(1, 4, (), generator=generator))
        shard = []
        for _ in range(count):
            size = int(torch.randint(0, 40, (), generator=generator))
            levels = 4 if case % 2 else 2 ** 20  # few levels: ties everywhere
            values = torch.randint(0, levels, (size,), generator=generator) / levels
            scores = values.to(dtype)
            if case % 3 == 1:
                scores = with_specials(scores) if size >= 4 else scores
            shard.append(scores)
        shards.append(shard)
    return shards


def _check_sharded_thresholds(rank: int, seed: int, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # with_specials draws from the global generator: the same on both ranks
    for case in range(30):
        shards = _shards(generator, case)
        everything = [scores for shard in shards for scores in shard]
        total = sum(scores.numel() for scores in everything)
        for k in (0, 1, int(torch.randint(0, total + 1, (), generator=generator)), total, total + 3):
            # A generator of tensors, as a list (the function reads its argument twice).
            got = distributed.topk_threshold((scores.to(device) for scores in shards[rank]), k)
            start = sum(len(shard) for shard in shards[:rank])
            rows = slice(start, start + len(shards[rank]))
            expected = bipkernels.topk_threshold([s.double() for s in everything], k)[rows] if everything else \
                torch.empty(0, 2, dtype=torch.float64)
            assert got.device == device, (case, k, got.device)
            assert torch.equal(got.cpu(), expected), (case, k, got, expected)
    # One tensor is the per-tensor form, as bipkernels.topk_threshold's (it was read as a list of elements).
    scores = torch.tensor([1.0, 1.0, 1.0, 4.0 + rank], device=device)
    expected = bipkernels.topk_threshold([torch.tensor([1.0, 1.0, 1.0, 4.0 + r]) for r in range(WORLD)], 3)
    assert torch.equal(distributed.topk_threshold(scores, 3).cpu(), expected[rank])
    # +0.0 and -0.0 are one score, tied in flat order: each k from 3 on cuts among zeros of both signs.
    zeros = [torch.tensor([1.0, -0.0, 0.0, -0.0]), torch.tensor([0.0, -0.0, 2.0, 0.0])]
    for k in range(1, 9):
        expected = bipkernels.topk_threshold(zeros, k)[rank]
        assert torch.equal(distributed.topk_threshold(zeros[rank].to(device), k).cpu(), expected), k


def _layers() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 5), nn.Linear(5, 9), nn.Linear(9, 3))


def _check_sharded_project_and_bip(rank: int, seed: int, device: torch.device) -> None:
    """Rank r holds layers 2r and 2r + 1 of one model; the projection equals the single-process one."""
    torch.manual_seed(seed)
    whole = bipkernels.convert(_layers().to(device), 0.0)
    with torch.no_grad():
        for _, layer in bipkernels.masked_layers(whole):
            layer.scores.copy_(tied_scores(layer.scores.shape, torch.float32))
    shard = copy.deepcopy(whole[2 * rank:2 * rank + 2])
    distributed.project(shard, 0.7)
    bipkernels.project(whole, 0.7)
    # A weightless layer (three empty filters) on every rank holds nothing and changes nothing.
    distributed.project(nn.Sequential(*shard, bipkernels.MaskedLinear(0, 3, structure="filter").to(device)), 0.7)
    for i in range(2):
        assert torch.equal(shard[i].threshold, whole[2 * rank + i].threshold)
        assert torch.equal(shard[i].mask(), whole[2 * rank + i].mask())
    # The solver on the shard: after a step on this rank's own loss the kept count is global and exact.
    solver = bipkernels.BiP(shard, 0.6, group=dist.group.WORLD, total_steps=5)
    x = torch.randn(4, shard[0].in_features).to(device)

    def closure():
        loss = shard(x).square().mean()
        loss.backward()
        return loss

    solver.step(closure)
    kept = torch.tensor(sum(int(layer.mask().sum()) for layer in shard), device=device)
    total = torch.tensor(sum(layer.weight.numel() for layer in shard), device=device)
    dist.all_reduce(kept)
    dist.all_reduce(total)
    assert int(kept) == bipkernels.keep_count(int(total), 0.6)


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor.contiguous())
    return out


def _check_ddp(rank: int, seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)  # the same initial model on every rank; DDP also broadcasts rank 0's
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).to(device)
    bipkernels.convert(model, 0.8)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
    solver = bipkernels.BiP(ddp, 0.8, score_lr=0.5, total_steps=10)
    total = sum(layer.weight.numel() for _, layer in bipkernels.masked_layers(model))
    torch.manual_seed(seed + 1 + rank)  # every rank its own batches
    changed = False
    for _ in range(3):
        x, y = torch.randn(4, 3, 6, 6).to(device), torch.randint(0, 5, (4,)).to(device)
        before = bipkernels.masks(model)

        def closure():
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        solver.step(closure)
        masks = bipkernels.masks(model)
        changed |= any(not torch.equal(masks[name], before[name]) for name in masks)
        assert sum(int(mask.sum()) for mask in masks.values()) == bipkernels.keep_count(total, 0.8)
        for name, layer in bipkernels.masked_layers(model):
            for tensor in (masks[name], layer.scores.detach(), layer.threshold, layer.weight.detach()):
                first, second = _gathered(tensor)
                assert torch.equal(first, second), name
    assert changed  # the steps moved the masks, identically on both ranks


def _check_ddp_fit(rank: int, seed: int, device: torch.device) -> None:
    """BiP.fit on a DDP model: each rank its own share of every epoch, the same steps as one process
    taking the ranks' batches together (DDP averages equal-sized batches' gradients: the union's mean).
    Without the implicit term: DDP averages the ranks' g ⊙ g, not the square of the averaged g."""
    torch.manual_seed(seed)
    inputs, targets = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    data = torch.utils.data.TensorDataset(inputs, targets)
    model = bipkernels.convert(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double().to(device), 0.5)
    alone = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
    solver = bipkernels.BiP(ddp, 0.5, score_lr=0.5, inv_gamma=0.0, total_steps=6)
    reference = bipkernels.BiP(alone, 0.5, score_lr=0.5, inv_gamma=0.0, total_steps=6)
    assert solver.steps_per_epoch(len(data), 4) == reference.steps_per_epoch(len(data), 4 * WORLD) == 3
    solver.fit(data, 2, batch_size=4, seed=seed)
    reference.fit(data, 2, batch_size=4 * WORLD, seed=seed)
    assert solver.iteration == reference.iteration == 6
    for (name, layer), (_, single) in zip(bipkernels.masked_layers(model), bipkernels.masked_layers(alone)):
        assert torch.equal(layer.mask(), single.mask()), name
        torch.testing.assert_close(layer.weight, single.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.scores, single.scores, rtol=1e-10, atol=1e-12)


def _check_group_edges(rank: int, seed: int, device: torch.device) -> None:
    """BiP under a group: a rank whose shard has nothing to mask still takes part, and an error on one
    rank's shard raises on every rank instead of leaving the others waiting in the projection."""
    torch.manual_seed(seed)
    shard = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 5)) if rank == 0 else nn.Sequential(nn.LayerNorm(5))
    solver = bipkernels.BiP(shard.to(device), 0.6, group=dist.group.WORLD, total_steps=5)
    x = torch.randn(4, 6).to(device)

    def closure():
        loss = (shard(x) if rank == 0 else shard(torch.randn(4, 5).to(device))).square().mean()
        loss.backward()
        return loss

    solver.step(closure)
    kept = torch.tensor(sum(int(layer.mask().sum()) for _, layer in bipkernels.masked_layers(shard)), device=device)
    dist.all_reduce(kept)
    assert int(kept) == bipkernels.keep_count(6 * 7 + 7 * 5, 0.6)
    # A shard without parameters trains nothing but goes through fit with the others (its loss has no
    # gradient: a backward would raise on that rank alone).
    shard = nn.Sequential(nn.Linear(6, 3)) if rank == 0 else nn.Sequential(nn.ReLU())
    solver = bipkernels.BiP(shard.to(device), 0.6, group=dist.group.WORLD, mode="faithful", total_steps=2)
    data = TensorDataset(torch.randn(16, 6 if rank == 0 else 3), torch.randint(0, 3, (16,)))
    assert solver.fit(data, epochs=1, batch_size=4) == (1, 0) and solver.iteration == 2
    kept = torch.tensor(sum(int(layer.mask().sum()) for _, layer in bipkernels.masked_layers(shard)), device=device)
    dist.all_reduce(kept)
    assert int(kept) == bipkernels.keep_count(6 * 3, 0.6)

    # Rank 1 asks for a structure its (already masked) shard does not have: both ranks raise.
    masked = bipkernels.convert(nn.Sequential(nn.Linear(6, 8)).to(device), 0.0, "filter")
    structure = "filter" if rank == 0 else "channel"
    expected = (RuntimeError, "BiP: rank 1 of the process group failed") if rank == 0 else \
        (ValueError, "BiP: structure 'channel', but the model is already masked")
    with pytest.raises(expected[0], match=expected[1]):
        bipkernels.BiP(masked, 0.5, structure, group=dist.group.WORLD)
    # Rank 0 passes no model at all.
    expected = (TypeError, "BiP: model must be a torch.nn.Module, got NoneType") if rank == 0 else \
        (RuntimeError, "BiP: rank 0 of the process group failed")
    with pytest.raises(expected[0], match=expected[1]):
        bipkernels.BiP(None if rank == 0 else masked, 0.5, group=dist.group.WORLD)
    # Rank 1's scores lie on two devices (meta stands in for a second GPU): both ranks raise, neither waits.
    split = bipkernels.convert(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)).to(device), 0.0)
    if rank == 1:
        split[1].to("meta")
    expected = (RuntimeError, "BiP: rank 1 of the process group failed") if rank == 0 else \
        (ValueError, r"BiP: this rank's scores lie on several devices \['(cpu|cuda:1)', 'meta'\]")
    with pytest.raises(expected[0], match=expected[1]):
        bipkernels.BiP(split, 0.5, group=dist.group.WORLD)
    # No rank holds anything to mask: the same error on both.
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear layer on any rank of the group to mask"):
        bipkernels.BiP(nn.Sequential(nn.LayerNorm(3)).to(device), 0.5, group=dist.group.WORLD)


def _check_agreement(rank: int, seed: int, device: torch.device) -> None:
    """What the ranks must share is checked together: an argument that fails on one rank, or one that
    differs between ranks, raises on every rank (none is left waiting in a collective)."""
    torch.manual_seed(seed)
    other = "rank 1 of the process group failed"
    cases = [  # (this rank's call, (error, message) on rank 0[, on rank 1])
        (lambda: distributed.topk_threshold([torch.rand(4, device=device) if rank == 0
                                             else torch.arange(4, device=device)], 2),
         (RuntimeError, other), (TypeError, r"block_scores\[0\] must be float32")),
        (lambda: distributed.topk_threshold([torch.rand(4, device=device)], 2 + rank),
         (ValueError, r"the ranks ask for different k \(from 2 to 3\)")),
        (lambda: distributed.topk_threshold([torch.rand(4, device=device, dtype=(torch.float32, torch.float64)[rank])],
                                            2),
         (ValueError, r"several dtypes \(torch.float32, torch.float64\)")),
        (lambda: bipkernels.BiP(nn.Sequential(nn.Linear(4, 3)).to(device), 0.5, total_steps=1 - rank,
                                group=dist.group.WORLD),
         (RuntimeError, other), (ValueError, "total_steps must be an int >= 1")),
    ]
    for call, *expected in cases:
        error, message = expected[min(rank, len(expected) - 1)]
        with pytest.raises(error, match=message):
            call()
    # Layers of float64 on one rank and float32 on the other: one ranking dtype over the group, or every
    # rank raises (a float64 threshold compared in float32 kept more than k).
    shard = bipkernels.convert(nn.Sequential(nn.Linear(4, 2)).to(device, (torch.float64, torch.float32)[rank]), 0.0)
    with pytest.raises(ValueError, match="several dtypes"):
        distributed.project(shard, 0.6, group=dist.group.WORLD)
    with pytest.raises(ValueError, match="different scopes"):
        distributed.project(shard, 0.6, ("global", "layer")[rank], group=dist.group.WORLD)
    # Layer scope has no k to compare: the sparsities themselves are (each rank kept its own).
    shard = bipkernels.convert(nn.Sequential(nn.Linear(4, 2)).to(device), 0.0)
    for scope in ("global", "layer"):
        with pytest.raises(ValueError, match=r"the ranks ask for different sparsities \(from 0.5 to 0.7\)"):
            distributed.project(shard, (0.5, 0.7)[rank], scope, group=dist.group.WORLD)
    assert shard[0].mask().all()  # before any change
    distributed.project(shard, (0.0, -0.0)[rank], "layer", group=dist.group.WORLD)  # one sparsity (-0.0 overflowed)
    # k past int64 keeps everything, as bipkernels.topk_threshold does.
    scores = torch.rand(5, device=device)
    assert torch.equal(distributed.topk_threshold([scores], 2**64)[0].cpu(),
                       bipkernels.topk_threshold([scores.cpu()], 2**64)[0])
    # A DistributedDataParallel replica is not a shard: group= is refused on every rank.
    replica = bipkernels.convert(nn.Sequential(nn.Linear(4, 3)).to(device), 0.0)
    ddp = nn.parallel.DistributedDataParallel(replica, device_ids=[rank] if device.type == "cuda" else None)
    with pytest.raises(ValueError, match="group= is for a model sharded over the ranks"):
        bipkernels.BiP(ddp, 0.5, group=dist.group.WORLD)


class _FailingExamples(torch.utils.data.Dataset):
    """(input, target) pairs of ``inputs`` and ``targets``, but the examples at ``bad`` (indices) raise
    on read (``read_fails``) or come with an input of one feature too few."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, bad, read_fails: bool):
        self.inputs, self.targets, self.bad, self.read_fails = inputs, targets, set(bad), read_fails

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        if index in self.bad and self.read_fails:
            raise ValueError(f"example {index} cannot be read")
        return (self.inputs[index][:-1] if index in self.bad else self.inputs[index]), self.targets[index]


def _first_batch_of_rank_1(size: int, batch_size: int, seed: int, world_size: int) -> tuple[int, list[int]]:
    """A seed from ``seed`` on and the indices of rank 1's first batch under it (of ``world_size`` ranks
    sharing each epoch), such that the batch holds neither example 0 nor 1, which every rank's checks read
    first: rank 1's checks alone then fail where its batch does."""
    for candidate in itertools.count(seed):
        batch = epoch_batches(range(size), batch_size, candidate, 0, (1, world_size))[0].tolist()
        if not {0, 1} & set(batch):
            return candidate, batch


def _check_data_checks_together(rank: int, seed: int, device: torch.device) -> None:
    """A solver's checks of its training data fail on rank 1's share alone: every rank raises, rank 1 its
    own error and rank 0 a RuntimeError naming rank 1. Rank 0 went on into training and waited for ever in
    the first gradient all-reduce (a projection over the group, for BiP's group=). Those collectives run
    in a group of a short timeout here, so that a rank left waiting fails the test instead of blocking it,
    and each case ends at a barrier of the default group, so that rank 1 waits there, not in rank 0's
    collective."""
    quick = dist.new_group(timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(seed)
    inputs, targets, batch_size = torch.randn(24, 6), torch.randint(0, 3, (24,)), 4
    model = bipkernels.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device), 0.0)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None,
                                              process_group=quick)
    fit_seed, bad = _first_batch_of_rank_1(len(inputs), batch_size, seed, WORLD)
    data = _FailingExamples(inputs, targets, bad, read_fails=False)  # the same on every rank: rank 1's share fails
    common = dict(batch_size=batch_size, seed=fit_seed)
    runs = {"BiP.fit": lambda: bipkernels.BiP(ddp, 0.5, total_steps=6).fit(data, 1, **common),
            "train_weights": lambda: train_weights(ddp, data, 1, **common),
            "omp": lambda: omp(ddp, data, 0.5, finetune_epochs=1, **common),
            "random_prune": lambda: random_prune(ddp, data, 0.5, finetune_epochs=1, **common),
            "imp": lambda: imp(ddp, data, 0.5, epochs_per_round=1, **common),
            "hydra": lambda: hydra(ddp, data, 0.5, score_epochs=1, finetune_epochs=1, **common),
            "prune": lambda: bipkernels.prune(ddp, data, "bip", 0.5, epochs=1, **common)}
    forward = r"the model's forward \(eval mode, no gradients\) failed on the first training batch"
    for owner, run in runs.items():
        expected = (RuntimeError, f"^{owner}: rank 1 of the process group failed") if rank == 0 else \
            (ValueError, f"^{owner}: {forward}")
        with pytest.raises(expected[0], match=expected[1]):
            run()
        dist.barrier()
    # A model sharded by layers (BiP's group=): every rank reads every batch, of data of its own; rank 1's
    # fail to read in its first batch.
    fit_seed, bad = _first_batch_of_rank_1(len(inputs), batch_size, seed, 1)
    shard = bipkernels.convert(nn.Sequential(nn.Linear(6, 3) if rank == 0 else nn.Linear(6, 6)).to(device), 0.0)
    data = _FailingExamples(inputs, targets, bad if rank == 1 else (), read_fails=True)
    solver = bipkernels.BiP(shard, 0.5, group=quick, total_steps=6)
    expected = (RuntimeError, "^BiP.fit: rank 1 of the process group failed") if rank == 0 else \
        (ValueError, f"^BiP.fit: ValueError: example {bad[0]} cannot be read")
    with pytest.raises(expected[0], match=expected[1]):
        solver.fit(data, 1, batch_size, fit_seed)
    dist.barrier()


def _worker(rank: int, backend: str, init_file: str, seed: int) -> None:
    if backend == "nccl":  # one GPU per rank, chosen before NCCL starts
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    progress = open(f"{init_file}.rank{rank}", "w", buffering=1)  # the last check begun, for a failure report
    try:
        torch.set_num_threads(1)
        for check in (_check_sharded_thresholds, _check_sharded_project_and_bip, _check_ddp, _check_ddp_fit,
                      _check_group_edges, _check_agreement, _check_data_checks_together):
            print(check.__name__, file=progress)
            check(rank, seed, device)
        print("teardown", file=progress)
        dist.barrier()  # both ranks done before either tears down
    finally:
        dist.destroy_process_group()
    # A rank aborted now and then (SIGABRT, "terminate called without an active exception", about 1 CI run
    # in 30, with the barrier too) with no Python error: a thread of gloo's still joinable when the
    # interpreter's teardown destroys it. Every check has passed by now, so the rank leaves without that
    # teardown.
    progress.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_NO_GLOO = not dist.is_available() or not dist.is_gloo_available()
_NO_NCCL = not dist.is_available() or not dist.is_nccl_available() or torch.cuda.device_count() < WORLD


def test_bad_block_scores_are_named_before_any_collective():
    topk = distributed.topk_threshold
    for bad, error in (([torch.tensor([3, 1])], "block_scores\\[0\\] must be float32, float64, float16 or bfloat16, "
                                              "got torch.int64"),
                       ([torch.zeros(2), [0.5, 0.2]], "block_scores\\[1\\] must be a tensor, got list"),
                       (3.0, "block_scores_list must be a tensor or an iterable of tensors, got float 3.0")):
        with pytest.raises(TypeError, match=f"bipkernels.distributed.topk_threshold: {error}"):
            topk(bad, 1)
    with pytest.raises(ValueError, match="op: this rank's scores lie on the meta device, with no values to rank"):
        distributed.check_devices("op", [torch.zeros(2, device="meta")], "gloo")


def test_devices_a_collective_takes():
    """The check each rank makes before the projection's first collective (it needs no process group)."""
    for backend in ("gloo", "nccl"):
        distributed.check_devices("op", [], backend)
    distributed.check_devices("op", [torch.zeros(2), torch.zeros(3)], "gloo")
    with pytest.raises(ValueError, match=r"op: the group's backend is NCCL, .* this rank's scores lie on cpu"):
        distributed.check_devices("op", [torch.zeros(2)], "nccl")
    with pytest.raises(ValueError, match=r"op: this rank's scores lie on several devices \['cpu', 'meta'\]"):
        distributed.check_devices("op", [torch.zeros(2), torch.zeros(2, device="meta")], "gloo")


def test_checks_meet_on_the_models_gpu_under_nccl(monkeypatch):
    """The all-reduce that makes the solvers' checks raise on every rank runs on the model's GPU under NCCL:
    it ran on the current GPU, device 0 on every rank of a DistributedDataParallel(model.to(rank),
    device_ids=[rank]) that never called torch.cuda.set_device, where NCCL fails (two ranks on one GPU).
    No GPU here: the backend is NCCL by name, the collective recorded, not run."""
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group: "nccl")
    assert distributed.collective_device([], None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.collective_device([torch.zeros(1)], None, torch.device("cuda", 1)) == torch.device("cpu")
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group: "gloo")
    assert distributed.collective_device([], None, torch.device("cuda", 1)) == torch.device("cpu")
    met = []
    monkeypatch.setattr(distributed, "raise_together", lambda *arguments: met.append(arguments))
    group, model = object(), nn.Linear(2, 2, device="meta")
    with training.checked_together("op", model, group):
        pass
    assert met == [("op", None, group, torch.device("meta"))]


@pytest.mark.parametrize("backend", [
    pytest.param("gloo", marks=pytest.mark.skipif(_NO_GLOO, reason="needs torch.distributed with gloo")),
    pytest.param("nccl", marks=pytest.mark.skipif(
        _NO_NCCL, reason=f"needs torch.distributed with NCCL and {WORLD} CUDA GPUs "
                         f"(found {torch.cuda.device_count()})")),
])
def test_two_processes(backend, seed, tmp_path):
    init_file = os.fspath(tmp_path / "init")
    try:
        mp.spawn(_worker, args=(backend, init_file, seed), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:  # killed by a signal: say which check each rank had begun
        reached = {rank: open(f"{init_file}.rank{rank}").read().split()[-1:] for rank in range(WORLD)
                   if os.path.exists(f"{init_file}.rank{rank}")}
        raise AssertionError(f"{error}; the last check each rank began: {reached}") from error
