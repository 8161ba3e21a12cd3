"""CPU topk_threshold (global over a model's layers) against what users would otherwise run.

Baselines: torch.kthvalue of the concatenated scores (the threshold value only, no tie rule), and the
official BiP implementation's way: torch.sort of all concatenated scores, then a 0/1 mask by indexing.
Run: pytest benchmarks --benchmark-json=out.json; python -m benchmarks.report out.json
"""

from __future__ import annotations

import pytest
import torch

import bipkernels

from .conftest import scores_of_size

SIZES = {"1M": 1_000_000, "11.2M (ResNet-18)": 11_200_000}
SPARSITY = 0.9


def official_sort_and_index(scores_list, k):
    """The released code's mask: sort every score, zero the lowest n - k, one the rest."""
    flat = torch.cat([s.reshape(-1) for s in scores_list])
    _, order = flat.sort()
    mask = torch.empty_like(flat)
    mask[order[: flat.numel() - k]] = 0
    mask[order[flat.numel() - k:]] = 1
    return mask


def kthvalue_threshold(scores_list, k):
    flat = torch.cat([s.reshape(-1) for s in scores_list])
    return torch.kthvalue(flat, flat.numel() - k + 1).values


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", ["bipkernels", "torch.kthvalue", "official sort+index"])
def test_topk_threshold_cpu(benchmark, size, method):
    scores = scores_of_size(SIZES[size])
    k = bipkernels.keep_count(sum(s.numel() for s in scores), SPARSITY)
    benchmark.group = f"topk_threshold cpu {size}"
    benchmark.extra_info.update(numel=sum(s.numel() for s in scores), tensors=len(scores), baseline=method != "bipkernels")
    if method == "bipkernels":
        thresholds = benchmark(bipkernels.topk_threshold, scores, k)
        assert sum(int(bipkernels.block_mask(s, t).sum()) for s, t in zip(scores, thresholds)) == k
    elif method == "torch.kthvalue":
        benchmark(kthvalue_threshold, scores, k)
    else:
        assert int(benchmark(official_sort_and_index, scores, k).sum()) == k
