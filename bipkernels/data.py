"""Built-in data: scikit-learn's digits (1,797 8×8 grey images, 10 classes), split once and for all.

The split is fixed (a permutation drawn from a fixed seed): 60% train, 15% validation (held out from
training data, for model selection), 25% test (touched once, at the end).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .ops import check_int

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


def _folder_path(owner: str, folder) -> Path:
    """``folder`` (a str or an os.PathLike such as a pathlib.Path) as a Path; TypeError naming ``owner`` for
    anything else (pathlib's own, for None, named nothing of ours)."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{owner}: folder must be a str or a pathlib.Path, got {type(folder).__name__} {folder!r}")
    return Path(folder)


def cifar10(folder: str) -> dict[str, TensorDataset]:
    """CIFAR-10 from a local folder in its python-pickle layout (``data_batch_1`` … ``data_batch_5``,
    ``test_batch``; the ``cifar-10-batches-py`` folder itself or its parent). Images (N, 3, 32, 32) float32
    in [0, 1]. The last 10% of the training batches (a fixed split) is held out as validation. ``folder``: a
    str or a pathlib.Path (TypeError naming it otherwise)."""
    import pickle

    root = _folder_path("cifar10", folder)
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
            # The keys as the original files hold them (bytes), or as Python 3 writes a copy (str).
            entries = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
            if "data" not in entries or "labels" not in entries:
                raise ValueError(f"cifar10: {path} holds no 'data' and 'labels' entries (keys {sorted(entries)})")
            images.append(torch.as_tensor(entries["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(entries["labels"], dtype=torch.int64))
            if len(images[-1]) != len(labels[-1]):  # joined, the labels would shift onto other images
                raise ValueError(f"cifar10: {path} holds {len(images[-1])} images but {len(labels[-1])} labels")
        return torch.cat(images).float() / 255.0, torch.cat(labels)

    train_images, train_labels = load(train_files)
    test_images, test_labels = load([root / "test_batch"])
    if not len(test_labels):
        raise ValueError(f"cifar10: {root / 'test_batch'} holds no images: nothing to test on")
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


# What image_folder reads as images, by extension (any case): torchvision's IMG_EXTENSIONS and GIF (its
# first frame), which torchvision leaves out.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def image_folder(folder: str, size: int = 32) -> dict:
    """torchvision's ImageFolder layout: ``train/`` (and ``test/``; ``val/`` if present, else 10% of train
    held out by a fixed permutation), one sub-folder per class. Images resized to ``size``×``size``.

    Hidden entries (a name that begins with "."), class folders and files at any depth, are left out without
    a word: Jupyter's .ipynb_checkpoints was a class of its own, macOS's ._NAME files failed to decode. The
    images of a class are its files (in its sub-folders too) with an extension of IMAGE_EXTENSIONS (GIF
    included: torchvision's ImageFolder skipped GIFs in silence); other files are left out with one warning
    that counts them and names the first.

    Every image of every split is decoded once here (see _check_images): a file that is no image, a
    truncated one or a 16-bit one is a ValueError naming it, before a run writes anything. ``folder``: a str
    or a pathlib.Path (TypeError naming it otherwise); ``size``: an int >= 1 (ValueError naming it otherwise)."""
    from torch.utils.data import Subset

    size = check_int("image_folder", "size", size, 1)  # torchvision's Resize took True as 1, and named nothing
    root = _folder_path("image_folder", folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: no folder {root} (a ~ after 'folder:' is not expanded by the "
                                "shell)" if str(folder).startswith("~") else f"image_folder: no folder {root}")
    names = [name for name in ("train", "val", "test") if (root / name).is_dir()]
    if "train" not in names or "test" not in names:
        raise FileNotFoundError(f"image_folder: {root} needs train/ and test/ sub-folders")
    try:
        from torchvision import transforms

        from .visible_image_folder import VisibleImageFolder, hidden
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise ImportError(f"image_folder: reading the images of {root} needs torchvision, which does not import: "
                          f"{error} (pip install torchvision)") from error
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    not_images = []

    def is_image(path: str) -> bool:  # a file below a class folder: an example, hidden, or named as skipped
        if any(hidden(part) for part in Path(path).relative_to(root).parts):
            return False
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            return True
        not_images.append(path)
        return False

    splits = {}
    for name in names:
        try:
            splits[name] = VisibleImageFolder(str(root / name), transform, loader=_rgb_image, is_valid_file=is_image)
        except FileNotFoundError as error:  # torchvision's names the class, not the folder
            raise FileNotFoundError(f"image_folder: {root / name}: {error} (images: "
                                    f"{', '.join(IMAGE_EXTENSIONS)})") from None
    if not_images:
        warnings.warn(f"image_folder: left out {len(not_images)} file(s) of {root} whose extension is none of an "
                      f"image ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(not_images[:3])}"
                      f"{', ...' if len(not_images) > 3 else ''}", stacklevel=2)
    for name, split in splits.items():  # each split numbers its own class folders: they must be the same
        if split.classes != splits["train"].classes:
            shown = [f"[{', '.join(map(ascii, classes))}]" for classes in (split.classes, splits["train"].classes)]
            raise ValueError(f"image_folder: {root / name} has the classes {shown[0]}, but train/ has {shown[1]}: "
                             "every split needs the same class folders (names as ascii() gives them: a name can "
                             "differ in its Unicode form alone)")
    _check_images(splits, root)
    if "val" not in splits:
        if len(splits["train"]) < 2:
            raise ValueError(f"image_folder: {len(splits['train'])} training image in {root / 'train'}; without "
                             "a val/ folder 2 or more are needed (one held out)")
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        n_val = max(1, len(order) // 10)
        splits["val"], splits["train"] = Subset(splits["train"], order[:n_val]), Subset(splits["train"], order[n_val:])
    return splits


# 8-bit PIL modes, which torchvision's loader converts to RGB as they are; 16-bit and float ones ("I;16",
# "I", "F") it would clip to 0–255, so a 16-bit grey image read as nearly all white.
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


# A check of the images that runs longer than this many seconds reports its progress (a large set).
PROGRESS_SECONDS = 5.0


def _check_images(splits: dict, root) -> None:
    """Decodes every image of the ImageFolder ``splits`` once, as training will, so that a bad file is a
    ValueError naming it now, not an exit in the middle of a run (the images are read lazily, a batch at a
    time). Costs about one epoch's decoding; prints its progress to stderr every PROGRESS_SECONDS."""
    paths = [path for split in splits.values() for path, _ in split.samples]
    last_report = time.monotonic()
    for done, path in enumerate(paths, 1):
        _rgb_image(path)
        if time.monotonic() - last_report >= PROGRESS_SECONDS:
            print(f"image_folder: checked {done} of {len(paths)} images in {root}", file=sys.stderr, flush=True)
            last_report = time.monotonic()


def _rgb_image(path: str):
    """The image at ``path`` as an 8-bit RGB PIL image; ValueError naming the file for one that does not
    decode (not an image, truncated) and for 16-bit or float ones."""
    from PIL import Image

    with open(path, "rb") as file:
        try:
            image = Image.open(file)
            image.load()
        except Exception as error:  # by format, PIL's decoders raise OSError, ValueError, SyntaxError, ...
            raise ValueError(f"image_folder: {path} does not decode as an image ({type(error).__name__}: "
                             f"{error})") from error
        if image.mode not in _EIGHT_BIT_MODES:
            raise ValueError(f"image_folder: {path} is a {image.mode!r} image (16-bit or float), which an 8-bit "
                             "conversion would clip: convert the data to 8-bit images first")
        return image.convert("RGB")


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


def absolute_spec(spec: str) -> str:
    """``spec`` with its folder made absolute (~ expanded): a run saved with it resumes from anywhere, and
    never on another folder of the same relative name."""
    kind, path = parse_spec(spec)
    return spec if kind == "digits" else f"{kind}:{Path(path).expanduser().resolve()}"


def fingerprint(splits: dict) -> dict[str, str]:
    """{split: sha256 hex digest} of what each split of load() holds, to tell whether a data set changed
    between a run and its resume (an image folder that gained one image reshuffles its validation tenth):
    an image folder's files (relative to its split folder) and labels in the split's order; a tensor
    data set's image shape and labels (its pixels are not read: the CIFAR files' are 150 MB)."""
    import hashlib

    digests = {}
    for name, split in sorted(splits.items()):
        digest = hashlib.sha256()
        if isinstance(split, TensorDataset):
            images, labels = split.tensors
            digest.update(repr(tuple(images.shape)).encode())
            digest.update(labels.numpy().tobytes())
        else:  # an ImageFolder, or the Subset of one that holds out the validation tenth
            base, indices = (split.dataset, split.indices) if hasattr(split, "indices") else \
                (split, range(len(split)))
            for index in indices:
                path, label = base.samples[index]
                digest.update(f"{Path(path).relative_to(base.root)}\0{label}\n".encode())
        digests[name] = digest.hexdigest()
    return digests


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
