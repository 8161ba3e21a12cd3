"""Where one iteration's time goes, per method: `python -m benchmarks.profile_iteration [--model resnet20]`.

Runs the iterations of benchmarks/test_iteration.py under torch.profiler and sums the self CPU time of
the operators by category (convolutions, batch norm, the mask: sort or bipkernels ops, the optimisers,
everything else), per iteration. It answers why a ratio between two methods is what it is: for example
how many forward/backward passes each one pays, and what the official implementation's sort costs.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .test_iteration import METHODS, MODELS, _batches, build_model, iteration_step

# First match wins (backward before forward: the names nest): (category, substrings of the operator name).
CATEGORIES = [
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution",
                             "aten::conv2d")),
    ("batch norm", ("batch_norm",)),
    ("linear / matmul", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")),
    ("mask: sort", ("aten::sort",)),
    ("mask: bipkernels ops", ("bipkernels::",)),
    ("optimiser", ("_foreach_", "aten::add_", "aten::mul_", "aten::lerp_", "aten::addcmul_")),
]


def category(name: str) -> str:
    return next((label for label, keys in CATEGORIES if any(key in name for key in keys)), "other")


def profile_method(method: str, model_name: str, batch_size: int, rounds: int) -> dict[str, float]:
    """Milliseconds of self CPU time per iteration by category, and their sum 'total' (about the wall time:
    an operator's self time is the calling thread's wall time inside it, its worker threads included)."""
    torch.manual_seed(0)
    batch_a, batch_b, _ = _batches(batch_size)
    step = iteration_step(method, build_model(model_name), batch_a, batch_b)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(rounds):
            step()
    per_category: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        per_category[category(event.key)] += event.self_cpu_time_total / 1e3 / rounds
    per_category["total"] = sum(per_category.values())
    return per_category


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    results = {method: profile_method(method, args.model, args.batch_size, args.rounds) for method in METHODS}
    labels = [label for label, _ in CATEGORIES] + ["other", "total"]
    print(f"Self CPU time per iteration (ms), {args.model}, batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, {args.rounds} iterations each\n")
    print("| category | " + " | ".join(METHODS) + " |")
    print("|---|" + "---:|" * len(METHODS))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{results[m].get(label, 0.0):.1f}" for m in METHODS) + " |")


if __name__ == "__main__":
    main()
