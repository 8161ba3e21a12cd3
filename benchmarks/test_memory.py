"""Peak memory of one BiP iteration (fused, faithful) against one dense SGD step of the same model and
batch: CIFAR ResNet-20 (3×32×32) and the small ResNet of the digits job (1×8×8), batch 64, 90% sparsity.

CPU: every measurement runs in a fresh process, entirely under torch.profiler with profile_memory=True,
which reports every allocation and free of the CPU allocator with its running total of live bytes (those
inside the ops included). A step's peak is the largest total inside its record_function window, after
one warm-up step (so that the optimisers' state exists). CUDA: torch.cuda.max_memory_allocated around the
same step (skipped without a GPU).

The goal: a BiP step holds no more than one extra score tensor and its optimiser state (momentum) over a
dense step, 2·W for W the bytes of the masked weights. Measured (CPU, torch 2.14): 2.14·W on ResNet-20
and 2.03·W on the small ResNet, in both modes; the part over 2·W is one layer's θ ⊙ m, recomputed in the
backward. Two things were needed, and either alone left 3·W: the scores step inside the backward, so no
score gradient exists at the peak (BiP step_scores_in_backward), and the masked layers save no θ ⊙ m
for the convolution's backward (nn._Masked._with_masked_weight). The test holds each measurement to
EXTRA_BOUND, so that one more weight-sized tensor fails it.

    python -m benchmarks.test_memory                 # CPU table (and CUDA with a GPU)
    pytest benchmarks/test_memory.py -s              # the same measurements as tests
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import bipkernels
from bipkernels import models

MODELS = {"resnet20": (3, 32), "small-resnet": (1, 8)}  # input channels, image size
METHODS = ["dense step", "bip fused", "bip faithful"]
BATCH = 64
EXTRA_BOUND = 2.5  # the goal, 2·W, plus one layer's transient, with a margin below one more W


def _step(model_name: str, method: str, device: str):
    """(step function, W): one training step of ``method`` on a model of ``model_name``, and the bytes of
    its prunable weights."""
    torch.manual_seed(0)
    channels, size = MODELS[model_name]
    model = models.build(model_name, 10, channels).to(device)
    batches = [(torch.randn(BATCH, channels, size, size, device=device), torch.randint(0, 10, (BATCH,), device=device))
               for _ in range(2)]

    def closure(batch):
        def run():
            loss = F.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            return loss
        return run

    if method == "dense step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            closure(batches[0])()
            optimizer.step()
    else:
        solver = bipkernels.BiP(model, 0.9, mode=method.split()[1], total_steps=10, step_scores_in_backward=True)

        def step():
            solver.step(closure(batches[0]), *([closure(batches[1])] if solver.mode == "faithful" else []))
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return step, sum(w.numel() * w.element_size() for w in weights)


def _cpu_peak(model_name: str, method: str) -> dict:
    """Run in a fresh process: persistent bytes before the step and the step's peak (live tensor bytes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step, weight_bytes = _step(model_name, method, "cpu")
        step()  # warm-up: the optimisers' state, the masks
        with record_function("measured step"):
            step()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    events = sorted(walk(prof.profiler.kineto_results.experimental_event_tree()), key=lambda e: e.start_time_ns)
    window = next(e for e in events if e.name == "measured step")
    totals = [(e.start_time_ns, e.extra_fields.total_allocated) for e in events
              if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"]
    before = [total for time, total in totals if time < window.start_time_ns]
    inside = [total for time, total in totals if window.start_time_ns <= time <= window.end_time_ns]
    return {"persistent": before[-1], "peak": max(inside), "weights": weight_bytes}


def _cuda_peak(model_name: str, method: str) -> dict:
    step, weight_bytes = _step(model_name, method, "cuda")
    step()
    torch.cuda.synchronize()
    persistent = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"persistent": persistent, "peak": torch.cuda.max_memory_allocated(), "weights": weight_bytes}


def measure(model_name: str, method: str, device: str = "cpu") -> dict:
    """{persistent, peak, weights} in bytes, measured in a fresh process."""
    code = ("import json, sys; from benchmarks.test_memory import _cpu_peak, _cuda_peak; "
            "print(json.dumps((_cpu_peak if sys.argv[3] == 'cpu' else _cuda_peak)(sys.argv[1], sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, model_name, method, device], capture_output=True, text=True,
                          check=True, timeout=600, cwd=Path(__file__).parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="module")
def dense_peaks():
    return {}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_of_a_step(dense_peaks, method, model_name, device):
    if (model_name, device) not in dense_peaks:
        dense_peaks[model_name, device] = measure(model_name, "dense step", device)
    dense = dense_peaks[model_name, device]
    got = dense if method == "dense step" else measure(model_name, method, device)
    extra = (got["peak"] - dense["peak"]) / got["weights"]
    print(f"\n{model_name} {method} on {device}: peak {got['peak'] / 2**20:.2f} MiB "
          f"({got['peak'] / dense['peak']:.3f}× dense), extra {extra:.2f}·W (W = {got['weights'] / 2**20:.2f} MiB)")
    assert got["persistent"] < got["peak"]
    assert extra <= EXTRA_BOUND, f"a BiP step holds {extra:.2f}·W more than a dense step (bound {EXTRA_BOUND}·W)"


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("| model | device | method | persistent (MiB) | peak (MiB) | × dense peak | extra peak over dense (·W) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for model_name in MODELS:
        for device in devices:
            dense = measure(model_name, "dense step", device)
            for method in METHODS:
                got = dense if method == "dense step" else measure(model_name, method, device)
                print(f"| {model_name} (W = {got['weights'] / 2**20:.2f} MiB) | {device} | {method} | "
                      f"{got['persistent'] / 2**20:.2f} | {got['peak'] / 2**20:.2f} | "
                      f"{got['peak'] / dense['peak']:.3f} | {(got['peak'] - dense['peak']) / got['weights']:.2f} |")


if __name__ == "__main__":
    main()
