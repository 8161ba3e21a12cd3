"""torchvision's ImageFolder without hidden class folders. Imports torchvision: data.image_folder imports it
once torchvision is known to import (an optional dependency)."""

from __future__ import annotations

import os

from torchvision import datasets


def hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (begins with "."): Jupyter's .ipynb_checkpoints, macOS's
    .DS_Store and its ._NAME resource forks beside each copied file."""
    return name.startswith(".")


class VisibleImageFolder(datasets.ImageFolder):
    """ImageFolder whose classes are the visible sub-folders of its root: torchvision's find_classes made
    a hidden one (.ipynb_checkpoints) a class of its own, an extra output of the model when every split has
    one. Which files of a class are examples is ``is_valid_file``'s choice, as ImageFolder's. A module-level
    class, so that its datasets pickle (DataLoader workers)."""

    def find_classes(self, directory):
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not hidden(entry.name))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory} (hidden ones left out).")
        return classes, {name: index for index, name in enumerate(classes)}
