"""Built-in data: scikit-learn's digits (1,797 8×8 grey images, 10 classes), split once and for all.

The split is fixed (a permutation drawn from a fixed seed): 60% train, 15% validation (held out from
training data, for model selection), 25% test (touched once, at the end).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

SPLIT_SEED = 20221128  # fixed: every run sees the same train/validation/test images
SPLIT_FRACTIONS = (0.60, 0.15)


def digits() -> dict[str, TensorDataset]:
    """{"train", "val", "test"}: TensorDatasets of (N, 1, 8, 8) float32 images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(SPLIT_FRACTIONS[0] * len(order))
    n_val = int(SPLIT_FRACTIONS[1] * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: TensorDataset(images[index], labels[index]) for name, index in parts.items()}
