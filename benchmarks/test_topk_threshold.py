"""topk_threshold (global over a model's layers) on every backend against what users would otherwise run.

Baselines: torch.topk and torch.kthvalue of the concatenated scores (the threshold only, no tie rule), and
the official BiP implementation's way: torch.sort of all concatenated scores, then a 0/1 mask by indexing.
Sizes: 1M (ResNet-18's shapes scaled down) and the real layer shapes of ResNet-18 (11.2M), ResNet-50
(25.6M) and GPT-2 small (124M).
"""

from __future__ import annotations

import pytest
import torch

import bipkernels

from .conftest import model_scores, scores_of_size

SIZES = {"1M": lambda: scores_of_size(1_000_000), "11.2M (ResNet-18)": lambda: model_scores("ResNet-18"),
         "25.6M (ResNet-50)": lambda: model_scores("ResNet-50"), "124M (GPT-2)": lambda: model_scores("GPT-2")}
SPARSITY = 0.9
METHODS = ["bipkernels cpu", "bipkernels torch", "torch.topk", "torch.kthvalue", "official sort+index"]
_cache: dict[str, list[torch.Tensor]] = {}


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


def topk_threshold_value(scores_list, k):
    flat = torch.cat([s.reshape(-1) for s in scores_list])
    return torch.topk(flat, k, sorted=False).values.min()


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", METHODS)
def test_topk_threshold_cpu(benchmark, monkeypatch, size, method):
    if size not in _cache:
        _cache.clear()  # one size in memory at a time (GPT-2's scores are 0.5 GB)
        _cache[size] = SIZES[size]()
    scores = _cache[size]
    n = sum(s.numel() for s in scores)
    k = bipkernels.keep_count(n, SPARSITY)
    benchmark.group = f"topk_threshold cpu {size}"
    benchmark.extra_info.update(numel=n, tensors=len(scores), baseline=method != "bipkernels cpu")
    rounds = dict(rounds=3 if n > 50_000_000 else 7, warmup_rounds=1)
    if method.startswith("bipkernels"):
        monkeypatch.setenv("BIPKERNELS_BACKEND", method.split()[1])
        thresholds = benchmark.pedantic(bipkernels.topk_threshold, (scores, k), **rounds)
        assert sum(int(bipkernels.block_mask(s, t).sum()) for s, t in zip(scores, thresholds)) == k
    elif method == "torch.topk":
        benchmark.pedantic(topk_threshold_value, (scores, k), **rounds)
    elif method == "torch.kthvalue":
        benchmark.pedantic(kthvalue_threshold, (scores, k), **rounds)
    else:
        assert int(benchmark.pedantic(official_sort_and_index, (scores, k), **rounds).sum()) == k


def unstructured_block_scores_then_threshold(scores_list, k):
    structure = bipkernels.parse_structure("unstructured")
    return bipkernels.topk_threshold([bipkernels.block_scores(s, structure) for s in scores_list], k)


@pytest.mark.parametrize("method", ["absolute=True", "block_scores, then topk_threshold"])
def test_unstructured_threshold_from_signed_scores_cpu(benchmark, method):
    """The projection of unstructured scores: |s| taken inside the select against |s| written out first."""
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(s.shape, generator=generator) for s in model_scores("ResNet-18")]
    k = bipkernels.keep_count(sum(s.numel() for s in scores), SPARSITY)
    benchmark.group = "unstructured threshold from signed scores cpu 11.2M (ResNet-18)"
    benchmark.extra_info["baseline"] = method != "absolute=True"
    if method == "absolute=True":
        got = benchmark.pedantic(lambda: bipkernels.topk_threshold(scores, k, absolute=True), rounds=7,
                                 warmup_rounds=1)
    else:
        got = benchmark.pedantic(unstructured_block_scores_then_threshold, (scores, k), rounds=7, warmup_rounds=1)
    assert torch.equal(got, unstructured_block_scores_then_threshold(scores, k))
