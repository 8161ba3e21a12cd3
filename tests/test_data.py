"""Data loaders on small files the tests write, and the model builder."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from bipkernels import data, models
from bipkernels.cli import main

from conftest import needs_torchvision


def write_cifar(folder, per_batch: int = 10):
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {b"data": torch.randint(0, 256, (per_batch, 3072), generator=generator, dtype=torch.uint8).numpy(),
                 b"labels": torch.randint(0, 10, (per_batch,), generator=generator).tolist()}
        with open(root / name, "wb") as file:
            pickle.dump(batch, file)
    return batch


def test_cifar10_pickle_layout(tmp_path):
    last = write_cifar(tmp_path)
    splits = data.cifar10(str(tmp_path))
    assert [len(splits[name]) for name in ("train", "val", "test")] == [18, 2, 10]
    images, labels = splits["test"].tensors
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images, torch.as_tensor(last[b"data"]).reshape(10, 3, 32, 32).float() / 255)
    assert labels.tolist() == last[b"labels"]
    assert data.describe(splits) == (3, 10)
    for split in splits.values():  # a copy without labels 5-9 still has ten classes
        split.tensors[1].clamp_(max=4)
    assert data.describe(splits) == (3, 10)
    with pytest.raises(FileNotFoundError, match="no data_batch"):
        data.cifar10(str(tmp_path / "missing"))


def test_cifar10_reads_only_its_numbered_batches_and_checks_labels(tmp_path):
    """A stray copy (data_batch_1.bak) is not read: it put training images into the validation tenth;
    data_batch_10 comes after data_batch_2; labels outside 0-9 are named (training failed on them late)."""
    write_cifar(tmp_path)
    root = tmp_path / "cifar-10-batches-py"
    (root / "data_batch_1.bak").write_bytes((root / "data_batch_1").read_bytes())
    (root / "data_batch_2").rename(root / "data_batch_10")
    (root / "data_batch_2").write_bytes((root / "test_batch").read_bytes())
    splits = data.cifar10(str(tmp_path))
    assert len(splits["train"]) + len(splits["val"]) == 30
    test_images = splits["test"].tensors[0]
    assert torch.equal(splits["train"].tensors[0][10:20], test_images)  # data_batch_2 second, 10 last
    with open(root / "test_batch", "rb") as file:
        batch = pickle.load(file)
    batch[b"labels"][3] = 12
    with open(root / "test_batch", "wb") as file:
        pickle.dump(batch, file)
    with pytest.raises(ValueError, match=r"cifar10: the test labels in .* must lie in \[0, 9\], got 12"):
        data.cifar10(str(tmp_path))


def write_image_folder(root, counts=(("train", 10), ("test", 3)), labels=("cat", "dog")):
    from PIL import Image

    for split, count in counts:
        for label in labels:
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (12, 9), (index * 20, 0, 255 if label == "dog" else 0)).save(folder / f"{index}.png")


@needs_torchvision
def test_image_folder_layout(tmp_path):
    write_image_folder(tmp_path)
    splits = data.load(f"folder:{tmp_path}")
    assert [len(splits[name]) for name in ("train", "val", "test")] == [18, 2, 6]
    image, label = splits["test"][0]
    assert image.shape == (3, 32, 32) and label in (0, 1)
    assert data.describe(splits) == (3, 2)


@needs_torchvision
def test_image_folder_leaves_out_hidden_entries_reads_gifs_and_names_other_files(tmp_path, seed):
    """Hidden entries are left out: Jupyter's .ipynb_checkpoints in every split was a class of its own (3
    outputs for 2 classes; in one split alone, a class mismatch), inside a class folder its copies were
    examples twice, and macOS's ._NAME resource fork failed to decode. GIFs were skipped in silence; they are
    images now (any case of extension), and other files are left out with a warning that names them."""
    from PIL import Image

    write_image_folder(tmp_path)  # 10 training and 3 test images per class
    for folder in (tmp_path / "train" / ".ipynb_checkpoints", tmp_path / "test" / ".ipynb_checkpoints",
                   tmp_path / "train" / "cat" / ".ipynb_checkpoints"):
        folder.mkdir()
        Image.new("RGB", (12, 9)).save(folder / "0-checkpoint.png")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "test" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    colour = tuple(torch.randint(0, 256, (3,)).tolist())
    Image.new("RGB", (12, 9), colour).save(tmp_path / "train" / "dog" / "gif.GIF")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("where the photos came from")
    with pytest.warns(UserWarning, match=r"image_folder: left out 1 file\(s\) of .* whose extension is none of an "
                                         r"image \(.*\.gif\): .*notes\.txt$"):
        splits = data.load(f"folder:{tmp_path}")
    assert data.describe(splits) == (3, 2) and splits["test"].classes == ["cat", "dog"]
    assert [len(splits[name]) for name in ("train", "val", "test")] == [19, 2, 6]  # 21 training images
    folder = splits["train"].dataset
    paths = [Path(path).relative_to(tmp_path).as_posix() for path, _ in folder.samples]
    assert not any("/." in path for path in paths)
    image, label = folder[paths.index("train/dog/gif.GIF")]
    assert label == folder.class_to_idx["dog"]
    assert torch.equal(image, torch.tensor(colour).div(255).reshape(3, 1, 1).expand(3, 32, 32))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"`{' '.join(data.IMAGE_EXTENSIONS)}`" in readme  # the README lists what is read


@needs_torchvision
def test_image_folder_splits_must_have_the_same_classes(tmp_path):
    write_image_folder(tmp_path)
    write_image_folder(tmp_path, counts=(("test", 1),), labels=("emu",))  # test/ numbers emu 1 and dog 2
    with pytest.raises(ValueError, match=r"test has the classes \['cat', 'dog', 'emu'\], but train/ has"):
        data.load(f"folder:{tmp_path}")


@needs_torchvision
def test_too_few_training_images_say_so(tmp_path):
    write_cifar(tmp_path, per_batch=4)
    with pytest.raises(ValueError, match="cifar10: 8 training images"):
        data.cifar10(str(tmp_path))
    write_image_folder(tmp_path / "folder", counts=(("train", 1), ("test", 1)), labels=("cat",))
    with pytest.raises(ValueError, match="image_folder: 1 training image"):
        data.load(f"folder:{tmp_path / 'folder'}")


def test_cifar10_batches_are_checked_file_by_file(tmp_path):
    """A batch whose images and labels differ in number was joined with the labels shifted onto the next
    file's images; a copy written by Python 3 (str keys) loads as the original (bytes keys) does; an empty
    test batch is an error, not a test accuracy of 0."""
    write_cifar(tmp_path)
    root = tmp_path / "cifar-10-batches-py"
    with open(root / "data_batch_1", "rb") as file:
        batch = pickle.load(file)
    with open(root / "data_batch_1", "wb") as file:
        pickle.dump({"data": batch[b"data"], "labels": batch[b"labels"]}, file)
    assert torch.equal(data.cifar10(str(tmp_path))["train"].tensors[1][:10], torch.tensor(batch[b"labels"]))
    with open(root / "data_batch_1", "wb") as file:
        pickle.dump({b"data": batch[b"data"], b"labels": batch[b"labels"][:9]}, file)
    with pytest.raises(ValueError, match=r"cifar10: .*data_batch_1 holds 10 images but 9 labels"):
        data.cifar10(str(tmp_path))
    with open(root / "data_batch_1", "wb") as file:
        pickle.dump({b"images": batch[b"data"]}, file)
    with pytest.raises(ValueError, match=r"data_batch_1 holds no 'data' and 'labels' entries \(keys \['images'\]\)"):
        data.cifar10(str(tmp_path))
    write_cifar(tmp_path / "empty_test")
    with open(tmp_path / "empty_test" / "cifar-10-batches-py" / "test_batch", "wb") as file:
        pickle.dump({b"data": batch[b"data"][:0], b"labels": []}, file)
    with pytest.raises(ValueError, match=r"test_batch holds no images: nothing to test on"):
        data.cifar10(str(tmp_path / "empty_test"))


@needs_torchvision
def test_image_folder_refuses_what_it_would_misread_and_names_where(tmp_path):
    """16-bit and float images were clipped to 0–255 by the RGB conversion (a 50% grey 16-bit image read
    as white); a missing folder, an empty class folder and class names that differ in their Unicode form
    alone are named."""
    import numpy as np
    from PIL import Image

    write_image_folder(tmp_path / "deep")
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "deep" / "test" / "cat" / "0.png")
    with pytest.raises(ValueError, match=r"image_folder: .*0.png is a 'I;16' image \(16-bit or float\)"):
        data.load(f"folder:{tmp_path / 'deep'}")["test"][0]
    with pytest.raises(FileNotFoundError, match=r"image_folder: no folder .*nowhere"):
        data.load(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match=r"image_folder: no folder ~/nowhere \(a ~ after 'folder:'"):
        data.load("folder:~/nowhere")
    # A pathlib.Path is a folder too (its missing folder raised AttributeError: no attribute 'startswith').
    for missing in (tmp_path / "nowhere", Path("~/nowhere")):
        with pytest.raises(FileNotFoundError, match=r"image_folder: no folder .*nowhere"):
            data.image_folder(missing)
    # A size that is no int >= 1: torchvision's errors named nothing, and True resized to 1×1.
    for size in (0, True, 2.5, "32"):
        with pytest.raises(ValueError, match=rf"image_folder: size must be an int >= 1, got {re.escape(repr(size))}"):
            data.image_folder(tmp_path / "deep", size)
    write_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "test" / "emu").mkdir()
    with pytest.raises(FileNotFoundError, match=r"image_folder: .*empty/test: .*emu"):
        data.load(f"folder:{tmp_path / 'empty'}")
    write_image_folder(tmp_path / "forms", labels=("caf\u00e9",))
    (tmp_path / "forms" / "test" / "caf\u00e9").rename(tmp_path / "forms" / "test" / "cafe\u0301")
    with pytest.raises(ValueError, match=re.escape("has the classes ['cafe\\u0301'], but train/ has ['caf\\xe9']")):
        data.load(f"folder:{tmp_path / 'forms'}")


@needs_torchvision
@pytest.mark.parametrize("split, damage", [("train", "garbage"), ("train", "truncated"), ("val", "garbage"),
                                           ("test", "truncated")])
def test_an_image_that_does_not_decode_is_named_before_anything_is_written(tmp_path, seed, split, damage):
    """The images are read a batch at a time: a bad one past the two that prune's trial forward reads
    stopped the run in its training, after resume.pt was written. Every image of every split is decoded
    up front, and a bad one (not an image; a PNG cut short) named."""
    root = tmp_path / "images"
    write_image_folder(root, counts=(("train", 10), ("val", 2), ("test", 3)))
    files = sorted((root / split).rglob("*.png"))
    bad = files[int(torch.randint(len(files), ()))]
    if damage == "garbage":
        bad.write_bytes(b"not an image")
    else:  # noise, so that half the file cuts its pixel data (a small flat image's fits in its first bytes)
        from PIL import Image

        Image.fromarray(torch.randint(256, (32, 32, 3), dtype=torch.uint8).numpy()).save(bad)
        bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"image_folder: {re.escape(str(bad))} does not decode as an image"):
        data.load(f"folder:{root}")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"bipkernels prune: folder:.* {re.escape(str(bad))} does not decode"):
        main(["prune", "--data", f"folder:{root}", "--model", "resnet20", "--pretrain-epochs", "1", "--epochs", "1",
              "--batch-size", "4", "--out", str(out)])
    assert not out.exists()


@needs_torchvision
def test_fingerprints_tell_a_changed_data_set(tmp_path):
    """One image more in train/ reshuffles the held-out validation tenth: the fingerprint of each split
    changes, as --resume checks; the same folder gives the same fingerprint."""
    from PIL import Image

    write_image_folder(tmp_path)
    before = data.fingerprint(data.load(f"folder:{tmp_path}"))
    assert data.fingerprint(data.load(f"folder:{tmp_path}")) == before
    Image.new("RGB", (5, 5)).save(tmp_path / "train" / "cat" / "extra.png")
    after = data.fingerprint(data.load(f"folder:{tmp_path}"))
    assert after["train"] != before["train"] and after["test"] == before["test"]
    assert data.fingerprint(data.digits()) == data.fingerprint(data.digits())
    assert data.absolute_spec("digits") == "digits"
    assert data.absolute_spec("folder:rel/x") == f"folder:{(tmp_path.cwd() / 'rel' / 'x').resolve()}"


def test_data_spec_errors():
    with pytest.raises(ValueError, match="expected 'digits'"):
        data.load("mnist")


def test_models_build():
    resnet20 = models.build("resnet20", 10, 3)
    weights = sum(m.weight.numel() for m in resnet20.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert 0.26e6 < weights < 0.28e6
    assert resnet20(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="'no-such-net' is neither small-resnet"):
        models.build("no-such-net", 10, 3)


def test_a_torchvision_that_does_not_import_is_named(monkeypatch, tmp_path):
    """A torchvision built for another torch raises RuntimeError on import ('operator torchvision::nms
    does not exist'): the model names and image folders say what is missing."""
    real_import = __import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", failing_import)
    with pytest.raises(ValueError, match="'resnet18' is neither small-resnet nor resnet20.*does not import"):
        models.build("resnet18", 10, 3)
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(ImportError, match="needs torchvision, which does not import: operator torchvision::nms"):
        data.image_folder(str(tmp_path))


@needs_torchvision
def test_models_build_torchvision_models():
    assert models.build("resnet18", 7, 3)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert models.build("googlenet", 3, 3).train()(torch.randn(2, 3, 32, 32)).shape == (2, 3)  # no aux outputs


def test_prune_on_a_local_cifar_folder(tmp_path):
    write_cifar(tmp_path / "cifar")
    out = tmp_path / "out"
    main(["prune", "--data", f"cifar10:{tmp_path / 'cifar'}", "--model", "resnet20", "--pretrain-epochs", "1",
          "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_an_empty_cifar_batch_is_named_before_anything_is_written(tmp_path):
    write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"bipkernels prune: cifar10:.* EOFError"):
        main(["prune", "--data", f"cifar10:{tmp_path / 'cifar'}", "--model", "resnet20", "--out", str(out)])
    assert not (out / "resume.pt").exists()


def test_describe_counts_every_class_of_a_tensor_data_set(seed):
    """describe's classes are the labels 0 to C − 1 of the training split: C, the model's output count."""
    classes = int(torch.randint(2, 12, ()))
    splits = {"train": torch.utils.data.TensorDataset(torch.rand(classes, 3, 8, 8), torch.randperm(classes))}
    assert data.describe(splits) == (3, classes)
    assert data.describe(data.digits()) == (1, 10)
