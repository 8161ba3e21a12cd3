"""Bad-input contracts: every public function rejects each bad argument with ValueError or TypeError whose
message names the argument and the bad value, before it changes anything; the edge values that are
valid stay accepted."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import bipkernels
from bipkernels import data, distributed, models, ops
from bipkernels.cli import main
from bipkernels.solvers.bip import steps_per_epoch
from bipkernels.solvers.hydra import hydra
from bipkernels.solvers.imp import imp, imp_rounds
from bipkernels.solvers.omp import omp, random_prune
from bipkernels.solvers.training import evaluate, mean_loss, recalibrate_batchnorm, train_weights
from bipkernels.structures import Structure, parse_structure

from conftest import needs_torchvision

F64 = torch.float64


def _model():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _data(n=12):
    return TensorDataset(torch.randn(n, 2, 5, 5), torch.randint(0, 3, (n,)))


def _threshold(*shape):
    return torch.zeros(shape or (2,), dtype=F64)


def _fit(mode="fused", **kwargs):
    solver = bipkernels.BiP(_model(), 0.5, mode=mode)
    solver.fit(_data(), **{"epochs": 1, "batch_size": 4, **kwargs})


def _hypergrad(**kwargs):
    w = torch.rand(2, 3)
    args = {"grad": torch.rand(2, 3), "weight": w, "scores": torch.rand(2, 3), "threshold": _threshold(), **kwargs}
    return ops.hypergrad(**args)


# (call, exception type, argument name, bad value as the message shows it); one case per bad input.
CASES = {
    # ops
    "block_scores int scores": (lambda: ops.block_scores(torch.randint(0, 5, (3,), dtype=torch.int32)),
                                TypeError, "scores", "torch.int32"),
    "block_scores bool scores": (lambda: ops.block_scores(torch.rand(3) > 0.5), TypeError, "scores", "torch.bool"),
    "block_scores complex scores": (lambda: ops.block_scores(torch.rand(3, dtype=torch.complex64)), TypeError,
                                    "scores", "torch.complex64"),
    "block_scores not a tensor": (lambda: ops.block_scores([0.5, 1.0]), TypeError, "scores", "list"),
    "block_scores sparse scores": (lambda: ops.block_scores(torch.rand(2, 4).to_sparse()), TypeError, "scores",
                                   "sparse_coo"),
    "block_mask N:M threshold str": (lambda: ops.block_mask(torch.rand(2, 4), "x", "2:4"), TypeError, "threshold",
                                     "'x'"),
    "topk_masks not a list": (lambda: ops.topk_masks(5, 1), TypeError, "scores_list", "5"),
    "hypergrad inv_gamma past floats": (lambda: _hypergrad(inv_gamma=10**400), ValueError, "inv_gamma", "1000000"),
    "keep_count sparsity past floats": (lambda: ops.keep_count(10, 10**400), ValueError, "sparsity", "1000000"),
    "block_scores N:M needs in % M == 0": (lambda: ops.block_scores(torch.rand(3, 6), "2:4"), ValueError, "scores",
                                          "(3, 6)"),
    "block_scores N > M": (lambda: ops.block_scores(torch.rand(3, 8), "5:4"), ValueError, "structure", "5:4"),
    "block_scores M = 0": (lambda: ops.block_scores(torch.rand(3, 8), "0:0"), ValueError, "structure", "0:0"),
    "block_scores empty tile": (lambda: ops.block_scores(torch.rand(3, 6), "tile0x2"), ValueError, "structure",
                                "0x2"),
    "block_scores unknown structure": (lambda: ops.block_scores(torch.rand(3), "blocks"), ValueError, "structure",
                                       "'blocks'"),
    "block_scores structure of a wrong type": (lambda: ops.block_scores(torch.rand(3), 7), TypeError, "structure",
                                               "7"),
    "block_scores p = 3": (lambda: ops.block_scores(torch.rand(3, 6), "filter", p=3), ValueError, "p", "3"),
    "block_scores p = True": (lambda: ops.block_scores(torch.rand(3, 6), "filter", p=True), ValueError, "p", "True"),
    "block_scores filter of a 0-dim tensor": (lambda: ops.block_scores(torch.rand(()), "filter"), ValueError,
                                              "scores", "0-dim"),
    "topk_threshold k < 0": (lambda: ops.topk_threshold([torch.rand(3)], -1), ValueError, "k", "-1"),
    "topk_threshold k float": (lambda: ops.topk_threshold([torch.rand(3)], 2.5), ValueError, "k", "2.5"),
    "topk_threshold k bool": (lambda: ops.topk_threshold([torch.rand(3)], True), ValueError, "k", "True"),
    "topk_threshold k None": (lambda: ops.topk_threshold([torch.rand(3)], None), ValueError, "k", "None"),
    "topk_threshold not a list": (lambda: ops.topk_threshold(5, 1), TypeError, "block_scores_list", "5"),
    "topk_threshold int tensor": (lambda: ops.topk_threshold([torch.arange(3)], 1), TypeError, "block_scores[0]",
                                  "torch.int64"),
    "topk_threshold mixed dtypes": (lambda: ops.topk_threshold([torch.rand(3), torch.rand(3, dtype=F64)], 1),
                                    ValueError, "block_scores[1]", "torch.float64"),
    "topk_threshold mixed devices": (lambda: ops.topk_threshold([torch.rand(3), torch.rand(3, device="meta")], 1),
                                     ValueError, "block_scores[1]", "meta"),
    "block_mask float32 threshold": (lambda: ops.block_mask(torch.rand(3), torch.zeros(2)), TypeError, "threshold",
                                     "torch.float32"),
    "block_mask threshold shape": (lambda: ops.block_mask(torch.rand(3), _threshold(3)), ValueError, "threshold",
                                   "(3,)"),
    "block_mask threshold None": (lambda: ops.block_mask(torch.rand(3, 4), None, "filter"), TypeError, "threshold",
                                  "NoneType"),
    "block_mask threshold device": (lambda: ops.block_mask(torch.rand(3), _threshold().to("meta")), ValueError,
                                    "threshold", "meta"),
    "masked_weight int weight": (lambda: ops.masked_weight(torch.ones(3, dtype=torch.int32), torch.rand(3),
                                                           _threshold()), TypeError, "weight", "torch.int32"),
    "masked_weight scores shape": (lambda: ops.masked_weight(torch.rand(3), torch.rand(4), _threshold()), ValueError,
                                   "scores", "(4,)"),
    "masked_weight scores dtype": (lambda: ops.masked_weight(torch.rand(3), torch.rand(3, dtype=F64), _threshold()),
                                   ValueError, "scores", "torch.float64"),
    "masked_weight scores device": (lambda: ops.masked_weight(torch.rand(3), torch.rand(3, device="meta"),
                                                              _threshold()), ValueError, "scores", "meta"),
    "hypergrad grad shape": (lambda: _hypergrad(grad=torch.rand(3, 2)), ValueError, "grad", "(3, 2)"),
    "hypergrad grad device": (lambda: _hypergrad(grad=torch.rand(2, 3, device="meta")), ValueError, "grad", "meta"),
    "hypergrad bool grad": (lambda: _hypergrad(grad=torch.rand(2, 3) > 0.5), TypeError, "grad", "torch.bool"),
    "hypergrad implicit": (lambda: _hypergrad(implicit="both"), ValueError, "implicit", "'both'"),
    "hypergrad inv_gamma < 0": (lambda: _hypergrad(inv_gamma=-0.5), ValueError, "inv_gamma", "-0.5"),
    "hypergrad inv_gamma NaN": (lambda: _hypergrad(inv_gamma=math.nan), ValueError, "inv_gamma", "nan"),
    "hypergrad inv_gamma bool": (lambda: _hypergrad(inv_gamma=True), ValueError, "inv_gamma", "True"),
    "topk_masks k with N:M": (lambda: ops.topk_masks([torch.rand(2, 4)], 3, "2:4"), ValueError, "k", "3"),
    "keep_count n < 0": (lambda: ops.keep_count(-5, 0.5), ValueError, "n", "-5"),
    "keep_count sparsity > 1": (lambda: ops.keep_count(10, 1.5), ValueError, "sparsity", "1.5"),
    "keep_count sparsity < 0": (lambda: ops.keep_count(10, -0.1), ValueError, "sparsity", "-0.1"),
    "keep_count sparsity NaN": (lambda: ops.keep_count(10, math.nan), ValueError, "sparsity", "nan"),
    "keep_count sparsity str": (lambda: ops.keep_count(10, "0.5"), ValueError, "sparsity", "'0.5'"),
    "Structure unknown kind": (lambda: Structure("diagonal"), ValueError, "kind", "'diagonal'"),
    "Structure non-int N": (lambda: Structure("nm", 2.5, 4), ValueError, "a", "2.5"),
    "Structure M past int64": (lambda: parse_structure("1:99999999999999999999"), ValueError, "b",
                               "99999999999999999999"),
    # Both public: their messages began "structure: ", naming neither.
    "parse_structure unknown": (lambda: parse_structure("bogus"), ValueError, "parse_structure: structure",
                                "'bogus'"),
    "parse_structure N > M": (lambda: parse_structure("3:2"), ValueError, "parse_structure: structure", "3:2"),
    "parse_structure not a str": (lambda: parse_structure(5), TypeError, "parse_structure: structure", "5"),
    "Structure N > M": (lambda: Structure("nm", 3, 2), ValueError, "Structure: N:M", "3:2"),
    "parse_structure p = 0": (lambda: parse_structure("filter", p=0), ValueError, "p", "0"),
    # nn
    "MaskedLinear int dtype": (lambda: bipkernels.MaskedLinear(3, 4, dtype=torch.int32), TypeError, "dtype",
                               "torch.int32"),
    "MaskedConv2d bool dtype": (lambda: bipkernels.MaskedConv2d(3, 4, 3, dtype=torch.bool), TypeError, "dtype",
                                "torch.bool"),
    "MaskedLinear N:M does not divide": (lambda: bipkernels.MaskedLinear(6, 3, structure="2:4"), ValueError,
                                         "structure", "2:4"),
    "MaskedConv2d N > M": (lambda: bipkernels.MaskedConv2d(8, 4, 3, structure="3:2"), ValueError, "structure", "3:2"),
    "MaskedConv2d empty tile": (lambda: bipkernels.MaskedConv2d(8, 4, 3, structure="tile0x1"), ValueError,
                                "structure", "0x1"),
    "MaskedConv2d structure None": (lambda: bipkernels.MaskedConv2d(8, 4, 3, structure=None), TypeError, "structure",
                                    "None"),
    "convert not a model": (lambda: bipkernels.convert("model"), TypeError, "model", "'model'"),
    "convert sparsity > 1": (lambda: bipkernels.convert(_model(), 1.5), ValueError, "sparsity", "1.5"),
    "export_dense prune_masks str": (lambda: bipkernels.export_dense(bipkernels.convert(_model()), prune_masks="yes"),
                                     TypeError, "prune_masks", "'yes'"),
    "export_shrunk input str": (lambda: bipkernels.export_shrunk(bipkernels.convert(_model()), "x"), TypeError,
                                "example_inputs", "'x'"),
    "export_shrunk input shape": (lambda: bipkernels.export_shrunk(bipkernels.convert(_model()),
                                                                   torch.randn(1, 3, 5, 5)),
                                  ValueError, "example_inputs", "RuntimeError"),
    "convert sparsity bool": (lambda: bipkernels.convert(_model(), True), ValueError, "sparsity", "True"),
    "convert structure does not fit a layer": (lambda: bipkernels.convert(_model(), 0.5, "2:4"), ValueError,
                                               "structure", "2:4"),
    "convert unknown structure": (lambda: bipkernels.convert(_model(), 0.5, "rows"), ValueError, "structure",
                                  "'rows'"),
    "convert scope": (lambda: bipkernels.convert(_model(), 0.5, scope="all"), ValueError, "scope", "'all'"),
    "convert exclude unknown name": (lambda: bipkernels.convert(_model(), 0.5, exclude=["7"]), ValueError, "exclude",
                                     "'7'"),
    "convert exclude not names": (lambda: bipkernels.convert(_model(), 0.5, exclude=5), TypeError, "exclude", "5"),
    "project not a model": (lambda: bipkernels.project(None, 0.5), TypeError, "model", "None"),
    "project sparsity": (lambda: bipkernels.project(bipkernels.convert(_model()), 2.0), ValueError, "sparsity",
                         "2.0"),
    "project scope": (lambda: bipkernels.project(bipkernels.convert(_model()), 0.5, "x"), ValueError, "scope", "'x'"),
    "project a model never converted": (lambda: bipkernels.project(_model(), 0.5), ValueError, "masked layer",
                                        "Sequential"),
    "masks not a model": (lambda: bipkernels.masks([]), TypeError, "model", "[]"),
    "sparsity not a model": (lambda: bipkernels.sparsity("net"), TypeError, "model", "'net'"),
    "masked_layers not a model": (lambda: bipkernels.masked_layers(3), TypeError, "model", "3"),
    # solvers
    "BiP not a model": (lambda: bipkernels.BiP("net", 0.5), TypeError, "model", "'net'"),
    "BiP sparsity": (lambda: bipkernels.BiP(_model(), 1.5), ValueError, "sparsity", "1.5"),
    "BiP structure N > M": (lambda: bipkernels.BiP(_model(), 0.5, "3:2"), ValueError, "structure", "3:2"),
    "BiP scope": (lambda: bipkernels.BiP(_model(), 0.5, scope="nowhere"), ValueError, "scope", "'nowhere'"),
    "BiP mode": (lambda: bipkernels.BiP(_model(), 0.5, mode="both"), ValueError, "mode", "'both'"),
    "BiP implicit": (lambda: bipkernels.BiP(_model(), 0.5, implicit="neither"), ValueError, "implicit", "'neither'"),
    "BiP lr < 0": (lambda: bipkernels.BiP(_model(), 0.5, lr=-1.0), ValueError, "lr", "-1.0"),
    "BiP lr inf": (lambda: bipkernels.BiP(_model(), 0.5, lr=math.inf), ValueError, "lr", "inf"),
    "BiP score_lr NaN": (lambda: bipkernels.BiP(_model(), 0.5, score_lr=math.nan), ValueError, "score_lr", "nan"),
    "BiP inv_gamma < 0": (lambda: bipkernels.BiP(_model(), 0.5, inv_gamma=-1e-4), ValueError, "inv_gamma",
                          "-0.0001"),
    "BiP weight_decay str": (lambda: bipkernels.BiP(_model(), 0.5, weight_decay="0.1"), ValueError, "weight_decay",
                             "'0.1'"),
    "BiP momentum 1": (lambda: bipkernels.BiP(_model(), 0.5, momentum=1.0), ValueError, "momentum", "1.0"),
    "BiP score_momentum < 0": (lambda: bipkernels.BiP(_model(), 0.5, score_momentum=-0.5), ValueError,
                               "score_momentum", "-0.5"),
    "BiP lower_steps 0": (lambda: bipkernels.BiP(_model(), 0.5, lower_steps=0), ValueError, "lower_steps", "0"),
    "BiP lower_steps float": (lambda: bipkernels.BiP(_model(), 0.5, lower_steps=1.5), ValueError, "lower_steps",
                              "1.5"),
    "BiP total_steps 0": (lambda: bipkernels.BiP(_model(), 0.5, total_steps=0), ValueError, "total_steps", "0"),
    "BiP schedule": (lambda: bipkernels.BiP(_model(), 0.5, schedule="linear"), ValueError, "schedule", "'linear'"),
    "BiP score_schedule": (lambda: bipkernels.BiP(_model(), 0.5, score_schedule=None), ValueError, "score_schedule",
                           "None"),
    "BiP.fit epochs < 0": (lambda: _fit(epochs=-1), ValueError, "epochs", "-1"),
    "BiP.fit batch_size 0": (lambda: _fit(batch_size=0), ValueError, "batch_size", "0"),
    "BiP.fit seed < 0": (lambda: _fit(seed=-1), ValueError, "seed", "-1"),
    "BiP.fit start": (lambda: _fit(start=(0, -1)), ValueError, "start", "(0, -1)"),
    "BiP.fit one batch, faithful": (lambda: _fit(batch_size=64, mode="faithful"), ValueError, "batch_size", "64"),
    # A label is the progress line's name: labels given as targets (a tensor) were printed and ignored.
    "BiP.fit label": (lambda: _fit(label=torch.tensor([0, 1])), TypeError, "BiP.fit: label", "Tensor"),
    "train_weights label": (lambda: train_weights(_model(), _data(), 1, label=None), TypeError,
                            "train_weights: label", "None"),
    "BiP.step closure": (lambda: bipkernels.BiP(_model(), 0.5).step(5), TypeError, "closure", "5"),
    "steps_per_epoch batch_size 0": (lambda: steps_per_epoch(100, 0), ValueError, "batch_size", "0"),
    "omp finetune_epochs": (lambda: omp(_model(), _data(), 0.5, finetune_epochs=-1), ValueError, "finetune_epochs",
                            "-1"),
    "omp lr": (lambda: omp(_model(), _data(), 0.5, lr=-0.1), ValueError, "lr", "-0.1"),
    "omp sparsity": (lambda: omp(_model(), _data(), 1.01), ValueError, "sparsity", "1.01"),
    "random_prune seed": (lambda: random_prune(_model(), _data(), 0.5, seed=2**40), ValueError, "seed",
                          str(2**40)),
    "imp rate 0": (lambda: imp(_model(), _data(), 0.5, rate=0.0), ValueError, "rate", "0.0"),
    "imp rate 1": (lambda: imp(_model(), _data(), 0.5, rate=1.0), ValueError, "rate", "1.0"),
    "imp epochs_per_round": (lambda: imp(_model(), _data(), 0.5, epochs_per_round=-2), ValueError,
                             "epochs_per_round", "-2"),
    "imp_rounds sparsity": (lambda: imp_rounds(1.5), ValueError, "sparsity", "1.5"),
    "hydra score_epochs": (lambda: hydra(_model(), _data(), 0.5, score_epochs=-1), ValueError, "score_epochs", "-1"),
    "hydra score_lr": (lambda: hydra(_model(), _data(), 0.5, score_lr=math.inf), ValueError, "score_lr", "inf"),
    "hydra no data": (lambda: hydra(_model(), None, 0.5), TypeError, "hydra: the training data", "NoneType"),
    # Each solver names itself for a model that is none (masked_layers or an AttributeError named nothing).
    **{f"{solver.__name__} not a model": (lambda solver=solver: solver("net", _data(), 0.5), TypeError,
                                          f"{solver.__name__}: model", "'net'")
       for solver in (omp, random_prune, imp, hydra, train_weights)},
    **{f"{check.__name__} not a model": (lambda check=check: check(None, _data()), TypeError,
                                         f"{check.__name__}: model", "None")
       for check in (evaluate, recalibrate_batchnorm)},
    "mean_loss not a model": (lambda: mean_loss([], _data(), F.cross_entropy), TypeError, "mean_loss: model", "[]"),
    # batch_size was handed to Tensor.split unchecked: RuntimeError for 0 and -1, torch's TypeError for others.
    "evaluate batch_size 0": (lambda: evaluate(_model(), _data(), 0), ValueError, "evaluate: batch_size", "0"),
    "mean_loss batch_size -1": (lambda: mean_loss(_model(), _data(), F.cross_entropy, -1), ValueError,
                                "mean_loss: batch_size", "-1"),
    "recalibrate_batchnorm batch_size 2.5": (lambda: recalibrate_batchnorm(_model(), _data(), 2.5), ValueError,
                                             "recalibrate_batchnorm: batch_size", "2.5"),
    # data.load's dict of splits where one split goes: KeyError 0 from the first example read.
    "prune whole splits dict": (lambda: bipkernels.prune(_model(), {"train": _data(), "test": _data()}), TypeError,
                                "train_data", "'train'"),
    "BiP.fit whole splits dict": (lambda: bipkernels.BiP(_model(), 0.5).fit({"train": _data()}, 1, 4), TypeError,
                                  "dataset", "'train'"),
    "evaluate whole splits dict": (lambda: evaluate(_model(), {"test": _data()}), TypeError, "dataset", "'test'"),
    # Keyed by more than the indices 0 to len - 1: not map-style (KeyError 1 from its first examples' read).
    "evaluate dict of an example and a split": (lambda: evaluate(_model(), {0: _data()[0], "test": _data()}), TypeError,
                                                "dataset", "'test'"),
    # An empty split: torch.stack's RuntimeError (a list), or a test accuracy of 0.0 (an empty TensorDataset).
    "prune empty train_data": (lambda: bipkernels.prune(_model(), [], "omp"), ValueError, "train_data",
                               "no examples"),
    "prune empty test_data": (lambda: bipkernels.prune(_model(), _data(), "omp", test_data=_data(0)), ValueError,
                              "test_data", "no examples"),
    # Tensors without values: torch's NotImplementedError from copying them to the model's device.
    "prune data on the meta device": (lambda: bipkernels.prune(_model(), TensorDataset(
        torch.randn(12, 2, 5, 5, device="meta"), torch.zeros(12, dtype=torch.long, device="meta"))), ValueError,
                                      "prune: train_data", "meta device"),
    # A group that is no process group: torch's AttributeError or ValueError, after BiP had converted the model.
    "BiP group": (lambda: bipkernels.BiP(_model(), 0.5, group="world"), TypeError, "BiP: group", "'world'"),
    "distributed.project group": (lambda: distributed.project(bipkernels.convert(_model()), 0.5, group=1), TypeError,
                                  "group", "1"),
    "distributed.topk_threshold group": (lambda: distributed.topk_threshold([torch.rand(3)], 1, group="g"),
                                         TypeError, "group", "'g'"),
    # Without init_process_group: torch's ValueError, which named nothing of ours.
    "distributed.project no process group": (lambda: distributed.project(bipkernels.convert(_model()), 0.5),
                                             ValueError, "distributed.project: group=None", "init_process_group"),
    "distributed.topk_threshold no process group": (lambda: distributed.topk_threshold([torch.rand(3)], 1),
                                                    ValueError, "distributed.topk_threshold: group=None",
                                                    "init_process_group"),
    "distributed.project not a model": (lambda: distributed.project(None, 0.5), TypeError,
                                        "distributed.project: model", "None"),
    "prune not a model": (lambda: bipkernels.prune(None, _data()), TypeError, "model", "None"),
    "prune method": (lambda: bipkernels.prune(_model(), _data(), "magic"), ValueError, "method", "'magic'"),
    "prune sparsity": (lambda: bipkernels.prune(_model(), _data(), "omp", 2), ValueError, "sparsity", "2"),
    "prune epochs": (lambda: bipkernels.prune(_model(), _data(), epochs=-1), ValueError, "epochs", "-1"),
    "prune batch_size": (lambda: bipkernels.prune(_model(), _data(), batch_size=0), ValueError, "batch_size", "0"),
    "prune structure": (lambda: bipkernels.prune(_model(), _data(), structure="tile2x0"), ValueError, "structure",
                        "2x0"),
    # data and models
    "data.load unknown": (lambda: data.load("mnist"), ValueError, "spec", "'mnist'"),
    "data.load folder missing": (lambda: data.load("cifar10:"), ValueError, "spec", "'cifar10:'"),
    "data.load not a str": (lambda: data.load(5), TypeError, "spec", "5"),
    # pathlib's TypeError, which named neither the function nor the argument.
    "data.cifar10 folder None": (lambda: data.cifar10(None), TypeError, "cifar10: folder", "None"),
    "data.image_folder folder None": (lambda: data.image_folder(None), TypeError, "image_folder: folder", "None"),
    # torch's RuntimeError (negative dimension), or a model built with an empty head (0 classes).
    "models.SmallResNet num_classes": (lambda: models.SmallResNet(num_classes=-3), ValueError,
                                       "SmallResNet: num_classes", "-3"),
    "models.SmallResNet width": (lambda: models.SmallResNet(width=0), ValueError, "SmallResNet: width", "0"),
    "models.CifarResNet blocks_per_stage": (lambda: models.CifarResNet(0), ValueError,
                                            "CifarResNet: blocks_per_stage", "0"),
    "models.build not a str": (lambda: models.build(5, 10, 3), TypeError, "name", "5"),
    "models.build unknown": (lambda: models.build("no-such-net", 10, 3), ValueError, "name", "'no-such-net'"),
    "models.build num_classes": (lambda: models.build("resnet20", 0, 3), ValueError, "num_classes", "0"),
    "models.build in_channels": (lambda: models.build("small-resnet", 10, -1), ValueError, "in_channels", "-1"),
    "models.build torchvision in_channels": (lambda: models.build("resnet18", 10, 1), ValueError, "in_channels", "1"),
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=needs_torchvision) if "torchvision" in case else case
                                  for case in CASES])
def test_bad_argument_names_itself_and_its_value(seed, case):
    call, error, name, value = CASES[case]
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert type(raised.value) is error, message
    assert name in message and value in message, f"{message!r} should name {name} and {value}"


# (command line, option, bad value): argparse stops with status 2 before any work.
CLI_CASES = [
    (["prune", "--sparsity", "1.5"], "--sparsity", "1.5"),
    (["prune", "--sparsity", "nan"], "--sparsity", "nan"),
    (["prune", "--lr", "-1"], "--lr", "-1"),
    (["prune", "--lr", "abc"], "--lr", "'abc'"),
    (["prune", "--score-lr", "inf"], "--score-lr", "inf"),
    (["prune", "--inv-gamma", "-0.1"], "--inv-gamma", "-0.1"),
    (["prune", "--batch-size", "0"], "--batch-size", "0"),
    (["prune", "--epochs", "-1"], "--epochs", "-1"),
    (["prune", "--epochs", "2.5"], "--epochs", "'2.5'"),
    (["prune", "--pretrain-epochs", "-2"], "--pretrain-epochs", "-2"),
    (["prune", "--seed", "-3"], "--seed", "-3"),
    (["prune", "--save-every", "-1"], "--save-every", "-1"),
    (["prune", "--structure", "5:4"], "--structure", "5:4"),
    (["prune", "--structure", "blocks"], "--structure", "'blocks'"),
    (["prune", "--data", "mnist"], "--data", "'mnist'"),
    (["prune", "--model", "no-such-net"], "--model", "'no-such-net'"),
    (["prune", "--checkpoint", "no-such-dense.pt"], "--checkpoint", "'no-such-dense.pt'"),
    (["prune", "--scope", "all"], "--scope", "'all'"),
    (["prune", "--mode", "both"], "--mode", "'both'"),
    (["prune", "--score-momentum", "1.5"], "--score-momentum", "1.5"),
    (["compare", "--sparsities", "0.5", "1.5"], "--sparsities", "1.5"),
    (["compare", "--finetune-epochs", "-1"], "--finetune-epochs", "-1"),
    (["compare", "--methods", "magic"], "--methods", "'magic'"),
    (["compare", "--methods", "bip", "omp", "bip"], "--methods", "bip omp bip"),
    (["compare", "--sparsities", "0.5", "0.5"], "--sparsities", "0.5 0.5"),
]


@pytest.mark.parametrize("argv, option, value", CLI_CASES, ids=[" ".join(case[0]) for case in CLI_CASES])
def test_cli_rejects_bad_options_before_any_work(tmp_path, capsys, argv, option, value):
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert raised.value.code == 2, message
    assert f"argument {option}" in message and value in message, message
    assert not (tmp_path / "out").exists()


def test_convert_and_bip_leave_the_model_untouched_on_a_bad_argument(seed):
    model = _model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for call in (lambda: bipkernels.convert(model, 0.5, "2:4"), lambda: bipkernels.convert(model, 1.5),
                 lambda: bipkernels.convert(model, 0.5, exclude=["0", "nope"]),
                 lambda: bipkernels.BiP(model, 0.5, lr=-1.0), lambda: bipkernels.BiP(model, 2.0),
                 lambda: bipkernels.BiP(model, 0.5, group="world")):
        with pytest.raises((ValueError, TypeError)):
            call()
        assert not bipkernels.masked_layers(model)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("method", ["omp", "random", "imp", "hydra", "bip"])
def test_every_method_refuses_a_model_with_nothing_to_mask_and_leaves_it_as_it_was(seed, method):
    """A model of norms alone, and a bare nn.Linear (convert returns its masked twin, the model stays plain):
    OMP fine-tuned them unpruned, or failed in torch's optimiser ("empty parameter list"); random pruning
    and IMP said to convert the model first. Every method now says what BiP says."""
    examples = TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    for model in (nn.Sequential(nn.BatchNorm1d(6), nn.ReLU()), nn.Linear(6, 3)):
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ValueError, match="the model has no nn.Conv2d or nn.Linear layer inside it to mask"):
            bipkernels.prune(model, examples, method, 0.5, epochs=1, finetune_epochs=1, batch_size=4)
        assert type(model) in (nn.Sequential, nn.Linear) and not bipkernels.masked_layers(model)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("solver", [omp, random_prune, imp, hydra])
def test_solvers_check_the_data_against_the_model_before_they_convert_it(seed, solver):
    """Called directly (prune checks the data itself), each solver converted the model, then training raised
    torch's RuntimeError (inputs of the wrong shape), IndexError (a class index out of range) or an error
    naming nobody (examples that are no pairs), leaving the model converted."""
    wrong_inputs = TensorDataset(torch.randn(12, 3, 5, 5), torch.randint(0, 3, (12,)))
    wrong_classes = TensorDataset(torch.randn(12, 2, 5, 5), torch.full((12,), 7))
    no_pairs = [torch.randn(2, 5, 5)] * 12
    for bad, message in ((wrong_inputs, "the model's forward .* failed on the first training batch"),
                         (wrong_classes, "target 7 is not a class index of the model's 3 classes"),
                         (no_pairs, "the data's examples must be .input, target. pairs")):
        model = _model()
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"^{solver.__name__}: .*{message}"):
            solver(model, bad, 0.5, batch_size=4)
        assert not bipkernels.masked_layers(model)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    # Without training epochs the data are not read, so they are not checked: the solver prunes as asked.
    no_training = {omp: {"finetune_epochs": 0}, random_prune: {"finetune_epochs": 0}, imp: {"epochs_per_round": 0},
                   hydra: {"score_epochs": 0, "finetune_epochs": 0}}[solver]
    model = _model()
    solver(model, wrong_inputs, 0.5, batch_size=4, **no_training)
    assert bipkernels.masked_layers(model) and bipkernels.sparsity(model) == pytest.approx(0.5, abs=0.01)



class _Unreadable(torch.utils.data.Dataset):
    """``size`` examples, each of which raises on read; counts the reads."""

    def __init__(self, size: int):
        self.size, self.reads = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.reads += 1
        raise ValueError(f"example {index} read")


def test_bip_fit_resumed_at_its_end_reads_no_data(seed):
    """fit from the position it returned at the end, start=(epochs, 0), has no step left: it returns that
    position again without reading (so without checking) the data, the solver and model as they were.
    Checking the data for all the epochs rather than those left (a mutant) read them and raised. One epoch
    left and the same data fail their check."""
    solver = bipkernels.BiP(_model(), 0.5)
    before = {key: value.clone() for key, value in solver.model.state_dict().items() if isinstance(value, torch.Tensor)}
    data = _Unreadable(12)
    for epochs in (1, 3):
        assert solver.fit(data, epochs, batch_size=4, seed=seed, start=(epochs, 0)) == (epochs, 0)
    assert data.reads == 0 and solver.iteration == 0 and solver.passes == 0
    assert all(torch.equal(solver.model.state_dict()[key], value) for key, value in before.items())
    with pytest.raises(ValueError, match="^BiP.fit: ValueError: example .* read"):
        solver.fit(data, 3, batch_size=4, seed=seed, start=(2, 0))


def test_train_weights_resumed_at_its_end_reads_no_data(seed):
    """train_weights from a state saved after its last epoch has no epoch left: it reads (so checks) no data and
    returns the passes saved. It checked the data for all its epochs and raised. One epoch left and the same
    data fail their check."""
    states = []
    passes = train_weights(_model(), _data(), 2, batch_size=4, seed=seed,
                           on_epoch=lambda state: states.append(copy.deepcopy(state)))
    data = _Unreadable(12)
    assert train_weights(_model(), data, 2, batch_size=4, seed=seed, start=states[1]) == passes
    assert data.reads == 0
    with pytest.raises(ValueError, match="^train_weights: ValueError: example .* read"):
        train_weights(_model(), data, 2, batch_size=4, seed=seed, start=states[0])


def test_fit_and_train_weights_with_nothing_left_read_no_data(seed):
    """BiP.fit from the last position on_step was given, (epochs - 1, steps), has no step left, as from
    (epochs, 0): it returns (epochs, 0) without reading the data (it checked one epoch of them, and raised for
    data it never reads). train_weights resumed after its last epoch takes empty data too (it checked them
    for all its epochs: "the training data are empty")."""
    solver = bipkernels.BiP(_model(), 0.5)
    data, positions = _data(), []
    assert solver.fit(data, 2, batch_size=4, seed=seed, on_step=lambda *at: positions.append(at) or False) == (2, 0)
    iteration, passes = solver.iteration, solver.passes
    unreadable = _Unreadable(12)
    assert solver.fit(unreadable, 2, batch_size=4, seed=seed, start=positions[-1]) == (2, 0)
    assert unreadable.reads == 0 and (solver.iteration, solver.passes) == (iteration, passes)
    with pytest.raises(ValueError, match="^BiP.fit: ValueError: example .* read"):  # a step left: checked
        solver.fit(unreadable, 2, batch_size=4, seed=seed, start=positions[-2])
    states = []
    passes = train_weights(_model(), data, 2, batch_size=4, seed=seed,
                           on_epoch=lambda state: states.append(copy.deepcopy(state)))
    empty = TensorDataset(torch.randn(0, 2, 5, 5), torch.zeros(0, dtype=torch.long))
    assert train_weights(_model(), empty, 2, batch_size=4, seed=seed, start=states[1]) == passes
    with pytest.raises(ValueError, match="^train_weights: the training data are empty: 1 epochs would train"):
        train_weights(_model(), empty, 2, batch_size=4, seed=seed, start=states[0])


def test_training_and_evaluation_check_the_data_against_the_model_first(seed):
    """BiP.fit, train_weights, evaluate, mean_loss and recalibrate_batchnorm name themselves for data that
    the model cannot take, before any step or reset. They raised torch's IndexError (a class index out of
    range; train_weights after its first forward had moved the batch-norm statistics), RuntimeError (inputs
    of the wrong shape; recalibrate_batchnorm after resetting the statistics) or an error naming nobody
    (examples that are no pairs), and evaluate scored class indices out of range as misses.
    recalibrate_batchnorm's read of the batch it checks named nobody either (no pairs, the meta device).
    Examples whose inputs differ in shape raised torch.stack's RuntimeError, naming neither the caller nor
    the examples."""
    wrong_inputs = TensorDataset(torch.randn(12, 3, 5, 5), torch.randint(0, 3, (12,)))
    ragged = [(torch.randn(2 + i % 2, 5, 5), i % 3) for i in range(12)]
    unstacked = (ragged, r"ValueError: the data's examples must have inputs of one shape to batch, got \(2, 5, 5\) for "
                         r"example 0 and \(3, 5, 5\) for example 1")
    wrong_classes = TensorDataset(torch.randn(12, 2, 5, 5), torch.full((12,), 7))
    no_pairs = [torch.randn(2, 5, 5)] * 12
    on_meta = TensorDataset(torch.randn(12, 2, 5, 5, device="meta"), torch.zeros(12, dtype=torch.long, device="meta"))
    forward, classes, pairs = ("the model's forward .* failed", "target 7 is not a class index of the model's 3 "
                               "classes", "ValueError: the data's examples must be .input, target. pairs")
    model = bipkernels.convert(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                             nn.Flatten(), nn.Linear(100, 3)))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    solver = bipkernels.BiP(model, 0.5)
    cases = [("BiP.fit", lambda split: solver.fit(split, 1, 4), (wrong_classes, classes), (no_pairs, pairs),
              (wrong_inputs, forward), unstacked),
             ("train_weights", lambda split: train_weights(model, split, 1, batch_size=4), (wrong_classes, classes),
              (no_pairs, pairs), (wrong_inputs, forward), unstacked),
             ("evaluate", lambda split: evaluate(model, split), (wrong_classes, classes), (wrong_inputs, forward),
              unstacked),
             ("mean_loss", lambda split: mean_loss(model, split, F.cross_entropy), (wrong_inputs, forward), unstacked),
             ("recalibrate_batchnorm", lambda split: recalibrate_batchnorm(model, split), (wrong_inputs, forward),
              (no_pairs, pairs), (on_meta, "ValueError: the data's examples lie on the meta device"))]
    for owner, call, *bad in cases:
        for split, message in bad:
            before = {key: value.clone() for key, value in model.state_dict().items() if torch.is_tensor(value)}
            with pytest.raises(ValueError, match=rf"^{owner}: .*{message}"):
                call(split)
            assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items()), (owner, message)


def test_prune_names_itself_for_the_errors_of_what_it_runs(seed):
    """A user called prune: errors raised by what it runs (bipkernels.convert for exclude, IMP's rewind_state
    check, the method's own) named those alone ("bipkernels.convert: ...", "imp: ...", "omp: ..."). They begin
    with "prune: " now and still say where they came from."""
    cases = [(_model, dict(method="omp", exclude=["7"]), ValueError, "bipkernels.convert: exclude names no module"),
             (_model, dict(method="imp", rewind_state=[1]), TypeError, "imp: rewind_state must be a state_dict"),
             (_model, dict(method="imp", rewind_state={"x": torch.zeros(1)}), ValueError,
              "imp: rewind_state lacks 4 of the model's 4 parameters"),
             (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(50)), dict(method="omp"), ValueError,
              "omp: the model has no nn.Conv2d or nn.Linear layer"),
             (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(50)), dict(method="bip"), ValueError,
              "BiP: the model has no nn.Conv2d or nn.Linear layer")]
    for model, arguments, kind, message in cases:
        with pytest.raises(kind, match=rf"^prune: {message}") as raised:
            bipkernels.prune(model(), _data(), sparsity=0.5, epochs=1, finetune_epochs=1, batch_size=4, **arguments)
        assert type(raised.value) is kind and raised.value.__cause__ is not None
    with pytest.raises(TypeError, match=r"^prune\(\) missing 1 required positional argument"):  # Python's own
        bipkernels.prune(_model())


def test_exclude_covers_the_named_module_and_everything_inside(seed):
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    bipkernels.convert(model, 0.5, exclude="0")
    assert [name for name, _ in bipkernels.masked_layers(model)] == ["1"]


def test_structure_spellings():
    """parse_structure reads any case, ignores surrounding spaces, and reads tile:HxW as tileHxW."""
    assert parse_structure(" Filter\n") == Structure("filter") and parse_structure("CHANNEL") == Structure("channel")
    assert parse_structure("TILE4X2") == parse_structure("tile:4x2") == Structure("tile", 4, 2)
    assert parse_structure(" 2:4 ", p=2) == Structure("nm", 2, 4, 2)


def test_valid_edge_values_are_accepted(seed):
    scores = torch.rand(4, 6, dtype=F64)
    assert ops.keep_count(0, 0.5) == 0 and ops.keep_count(9, 0) == 9 and ops.keep_count(9, 1) == 0
    assert ops.topk_threshold([scores], 0).shape == (1, 2) and ops.topk_threshold((scores,), 24).shape == (1, 2)
    assert ops.topk_threshold([], 3).shape == (0, 2)
    assert torch.equal(ops.topk_threshold(scores, 2**63), ops.topk_threshold(scores, 24))  # past int64: keep all
    grad_weight, _ = ops.hypergrad(scores, scores, scores, ops.topk_threshold(scores, 5), inv_gamma=0)
    assert int((grad_weight != 0).sum()) == 5
    assert parse_structure("0:4").a == 0 and parse_structure("tile9x9").a == 9
    model = bipkernels.convert(_model(), 1.0, "tile2x2")
    assert bipkernels.sparsity(model) == 1.0
    bipkernels.BiP(_model(), 0.0, momentum=0.0, lr=0, inv_gamma=0, lower_steps=1, total_steps=1).fit(
        _data(), epochs=0, batch_size=1, seed=2**32 - 1)
    assert imp_rounds(1.0) == [1.0] and imp_rounds(0.0) == []
    # Empty data of any map-style kind (a list: fetch cannot stack no examples): mean_loss nan, as documented.
    assert math.isnan(mean_loss(_model(), [], F.cross_entropy)) and evaluate(_model(), []) == 0.0
