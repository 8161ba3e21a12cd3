"""Small reference models for the built-in data."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .ops import check_int


def _check_sizes(owner: str, **sizes) -> None:
    """ValueError naming ``owner``, the size and its value unless each of ``sizes`` is an int >= 1 (torch's
    layers raised RuntimeError for a negative one and built an empty head for 0 classes)."""
    for name, value in sizes.items():
        check_int(owner, name, value, 1)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 8×8 single-channel images: stem, one block at 8×8, one at 4×4, then a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        _check_sizes("SmallResNet", num_classes=num_classes, width=width, in_channels=in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): 3 stages of n basic blocks at widths 16, 32, 64; ResNet-20
    is n = 3 (0.27M weights). Input (N, in_channels, H, W), any H, W >= 4."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        _check_sizes("CifarResNet", blocks_per_stage=blocks_per_stage, num_classes=num_classes,
                     in_channels=in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, width = [], 16
        for stage, out in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                stages.append(BasicBlock(width, out, stride=2 if stage > 0 and index == 0 else 1))
                width = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


BUILT_IN = ("small-resnet", "resnet20")


def torchvision_or_none():
    """torchvision if it imports (an optional dependency: only its models and image folders need it). A
    torchvision built for another torch raises RuntimeError on import: None as well."""
    try:
        import torchvision
    except (ImportError, RuntimeError):
        return None
    return torchvision


def check_name(name: str) -> str:
    """``name`` if build() knows it (BUILT_IN or a torchvision classification model), else TypeError /
    ValueError naming it. Imports torchvision only for a name that is not built in."""
    if not isinstance(name, str):
        raise TypeError(f"model: name must be a str, got {type(name).__name__} {name!r}")
    if name not in BUILT_IN:
        torchvision = torchvision_or_none()
        if torchvision is None:
            raise ValueError(f"model: name {name!r} is neither small-resnet nor resnet20, and the other names are "
                             "torchvision's classification models: torchvision is not installed or does not import "
                             "beside this torch (pip install torchvision)")
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"model: name {name!r} is neither small-resnet, resnet20 nor a torchvision "
                             "classification model")
    return name


def build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """``small-resnet``, ``resnet20`` or any torchvision classification model by name (e.g. resnet18)."""
    check_name(name)
    check_int("model", "num_classes", num_classes, 1)
    check_int("model", "in_channels", in_channels, 1)
    if name == "small-resnet":
        return SmallResNet(num_classes, in_channels=in_channels)
    if name == "resnet20":
        return CifarResNet(3, num_classes, in_channels)
    if in_channels != 3:
        raise ValueError(f"model: torchvision's {name} takes 3-channel images, got in_channels={in_channels}")
    torchvision = torchvision_or_none()
    # Auxiliary classifiers make the training-mode output a tuple: the pruning loss wants the logits alone.
    auxiliary = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, num_classes=num_classes, **auxiliary)
