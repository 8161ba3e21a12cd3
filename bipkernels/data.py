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


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10(folder: str) -> dict[str, TensorDataset]:
    """CIFAR-10 from a local folder in its python-pickle layout (``data_batch_1`` … ``data_batch_5``,
    ``test_batch``; the ``cifar-10-batches-py`` folder itself or its parent). Images (N, 3, 32, 32) float32
    in [0, 1]. The last 10% of the training batches (a fixed split) is held out as validation."""
    import pickle
    from pathlib import Path

    root = Path(folder)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    # data_batch_1, data_batch_2, ... in numeric order; not copies such as data_batch_1.bak, which would
    # put training images into the validation tenth.
    train_files = sorted((path for path in root.glob("data_batch_*") if path.name[11:].isdigit()),
                         key=lambda path: int(path.name[11:]))
    if not train_files or not (root / "test_batch").exists():
        raise FileNotFoundError(f"cifar10: no data_batch_* and test_batch files in {root}")

    def load(paths):
        images, labels = [], []
        for path in paths:
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="bytes")
            images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.int64))
        return torch.cat(images).float() / 255.0, torch.cat(labels)

    train_images, train_labels = load(train_files)
    test_images, test_labels = load([root / "test_batch"])
    for name, labels in (("training", train_labels), ("test", test_labels)):
        outside = labels[(labels < 0) | (labels >= len(CIFAR10_CLASSES))]
        if len(outside):
            raise ValueError(f"cifar10: the {name} labels in {root} must lie in [0, 9], got {int(outside[0])}")
    if len(train_labels) < 10:
        raise ValueError(f"cifar10: {len(train_labels)} training images in {root}; the validation tenth needs 10 "
                         "or more")
    n_val = len(train_labels) // 10
    splits = {"train": TensorDataset(train_images[:-n_val], train_labels[:-n_val]),
              "val": TensorDataset(train_images[-n_val:], train_labels[-n_val:]),
              "test": TensorDataset(test_images, test_labels)}
    for split in splits.values():  # ten classes, whichever labels a (small) copy happens to hold
        split.classes = CIFAR10_CLASSES
    return splits


def image_folder(folder: str, size: int = 32) -> dict:
    """torchvision's ImageFolder layout: ``train/`` (and ``test/``; ``val/`` if present, else 10% of train
    held out by a fixed permutation), one sub-folder per class. Images resized to ``size``×``size``."""
    from pathlib import Path

    from torch.utils.data import Subset

    root = Path(folder)
    names = [name for name in ("train", "val", "test") if (root / name).is_dir()]
    if "train" not in names or "test" not in names:
        raise FileNotFoundError(f"image_folder: {root} needs train/ and test/ sub-folders")
    try:
        from torchvision import datasets, transforms
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise ImportError(f"image_folder: reading the images of {root} needs torchvision, which does not import: "
                          f"{error} (pip install torchvision)") from error
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    splits = {name: datasets.ImageFolder(str(root / name), transform) for name in names}
    for name, split in splits.items():  # each split numbers its own class folders: they must be the same
        if split.classes != splits["train"].classes:
            raise ValueError(f"image_folder: {root / name} has the classes {split.classes}, but train/ has "
                             f"{splits['train'].classes}: every split needs the same class folders")
    if "val" not in splits:
        if len(splits["train"]) < 2:
            raise ValueError(f"image_folder: {len(splits['train'])} training image in {root / 'train'}; without "
                             "a val/ folder 2 or more are needed (one held out)")
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        n_val = max(1, len(order) // 10)
        splits["val"], splits["train"] = Subset(splits["train"], order[:n_val]), Subset(splits["train"], order[n_val:])
    return splits


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, folder) of a data spec: ``digits`` (folder ""), ``cifar10:FOLDER`` or ``folder:FOLDER``;
    TypeError / ValueError naming the spec otherwise. Reads nothing."""
    if not isinstance(spec, str):
        raise TypeError(f"data: spec must be a str, got {type(spec).__name__} {spec!r}")
    kind, _, path = spec.partition(":")
    if (kind == "digits" and not path) or (kind in ("cifar10", "folder") and path):
        return kind, path
    raise ValueError(f"data: bad spec {spec!r}: expected 'digits', 'cifar10:FOLDER' or 'folder:FOLDER'")


def load(spec: str = "digits") -> dict:
    """A data set by name: ``digits``, ``cifar10:FOLDER`` or ``folder:FOLDER`` (ImageFolder layout)."""
    kind, path = parse_spec(spec)
    if kind == "digits":
        return digits()
    return cifar10(path) if kind == "cifar10" else image_folder(path)


def describe(splits: dict) -> tuple[int, int]:
    """(input channels, classes) of a data set from load()."""
    train = splits["train"]
    image, _ = train[0]
    if hasattr(train, "classes"):
        classes = len(train.classes)
    elif hasattr(train, "tensors"):
        classes = int(train.tensors[1].max()) + 1
    else:
        base = getattr(train, "dataset", train)
        classes = len(base.classes)
    return int(image.shape[0]), classes
