"""One BiP iteration (fused and faithful) against one dense SGD step of the same model and batch, and
against the official implementation's iteration (benchmarks/official.py), on the CPU and on a GPU.

Models: CIFAR ResNet-20 and torchvision's ResNet-18 at 32×32, batch 64 and 128, 90% sparsity.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.nn import functional as F

import bipkernels
from bipkernels import models

from .official import OfficialIteration

MODELS = ["resnet20", "resnet18"]
# torchvision is optional: .ci/setup leaves it out beside a CPU-only torch.
MODEL_PARAMS = [name if name == "resnet20" else pytest.param(name, marks=pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="needs torchvision")) for name in MODELS]
METHODS = ["dense step", "bip fused", "bip faithful", "official iteration"]


def build_model(name: str) -> torch.nn.Module:
    return models.build(name, 10, 3)


def _batches(batch_size, count=3, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, 32, 32, generator=generator).to(device),
             torch.randint(0, 10, (batch_size,), generator=generator).to(device)) for _ in range(count)]


def _closure(model, batch):
    def closure():
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss
    return closure


def iteration_step(method: str, model, batch_a, batch_b):
    """A callable that runs one iteration of ``method`` (one of METHODS) on ``model``."""
    if method == "dense step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            optimizer.zero_grad()
            _closure(model, batch_a)()
            optimizer.step()
    elif method.startswith("bip"):
        mode = method.split()[1]
        solver = bipkernels.BiP(model, 0.9, mode=mode, total_steps=100)

        def step():
            if mode == "fused":
                solver.step(_closure(model, batch_a))
            else:
                solver.step(_closure(model, batch_a), _closure(model, batch_b))
    else:
        iteration = OfficialIteration(model, keep=0.1)

        def step():
            iteration(batch_a, batch_b)
    return step


@pytest.mark.parametrize("batch_size", [64, 128])
@pytest.mark.parametrize("model_name", MODEL_PARAMS)
@pytest.mark.parametrize("method", METHODS)
def test_iteration_cpu(benchmark, method, model_name, batch_size):
    torch.manual_seed(0)
    model = build_model(model_name)
    batch_a, batch_b, _ = _batches(batch_size)
    benchmark.group = f"iteration cpu {model_name} batch {batch_size}"
    benchmark.extra_info["baseline"] = method != "bip fused"
    step = iteration_step(method, model, batch_a, batch_b)
    benchmark.pedantic(step, rounds=9 if model_name == "resnet20" else 3, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch_size", [64, 128])
@pytest.mark.parametrize("model_name", MODEL_PARAMS)
@pytest.mark.parametrize("method", METHODS)
def test_iteration_cuda(benchmark, method, model_name, batch_size):
    from .gpu import record

    torch.manual_seed(0)
    model = build_model(model_name).cuda()
    batch_a, batch_b, _ = _batches(batch_size, device="cuda")
    benchmark.group = f"iteration cuda {model_name} batch {batch_size}"
    benchmark.extra_info["baseline"] = method != "bip fused"
    record(benchmark, iteration_step(method, model, batch_a, batch_b), ())
