"""Masked layers, model conversion and the projection to exactly k kept blocks.

A masked layer holds ``weight`` (θ), ``scores`` (s, initialised from |θ|) and a ``threshold`` buffer
(float64 (value, cut), see bipkernels.reference). Its forward uses θ ⊙ m with m recomputed from s, and
its backward gives both levels' gradients in one fused pass:

    weight.grad = m ⊙ g          scores.grad = θ ⊙ g − inv_gamma · I

with g the gradient of the effective weight and I the implicit term (``implicit="paper"``: m ⊙ g ⊙ g,
``"released"``: (θ ⊙ g)²). ``inv_gamma`` (default 0: the straight-through score gradient) and
``implicit`` are plain attributes that the solver sets.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from . import autograd, ops
from .structures import Structure, parse_structure

SCOPES = ("global", "layer")


def keep_all_threshold(device=None) -> torch.Tensor:
    """The threshold (-inf, +inf): every non-NaN score is kept."""
    return torch.tensor([float("-inf"), float("inf")], dtype=torch.float64, device=device)


class _Masked:
    """What MaskedConv2d and MaskedLinear share; mixed in before the torch layer."""

    weight: nn.Parameter

    def _init_mask(self, structure) -> None:
        self.structure: Structure = parse_structure(structure)
        self.structure.check_shape(self.weight.shape, "weight")
        self.scores = nn.Parameter(self.weight.detach().abs().clone())
        self.register_buffer("threshold", keep_all_threshold(self.weight.device))
        self.inv_gamma = 0.0
        self.implicit = "paper"

    def masked_weight(self) -> torch.Tensor:
        """θ ⊙ m, differentiable with respect to both ``weight`` and ``scores``."""
        return autograd.masked_weight(self.weight, self.scores, self.threshold, self.structure, self.inv_gamma,
                                      self.implicit)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The current bool mask, shaped like ``weight``."""
        return ops.block_mask(self.scores, self.threshold, self.structure)

    @torch.no_grad()
    def block_scores(self) -> torch.Tensor:
        return ops.block_scores(self.scores, self.structure)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A plain nn.Conv2d / nn.Linear state has no scores or threshold: start from |θ| and keep-all.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and prefix + "scores" not in state_dict:
            state_dict[prefix + "scores"] = weight.detach().abs()
            state_dict.setdefault(prefix + "threshold", keep_all_threshold(self.threshold.device))
            state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # The structure travels with the state: a threshold means nothing under another structure.
    def get_extra_state(self) -> dict:
        return {"structure": (self.structure.kind, self.structure.a, self.structure.b, self.structure.p)}

    def set_extra_state(self, state: dict) -> None:
        self.structure = Structure(*state["structure"])

    def _apply(self, fn, recurse=True):
        # The threshold must stay float64 (its cut is an exact index) whatever dtype the layer moves to.
        threshold = self._buffers.pop("threshold")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._buffers["threshold"] = threshold
        self._buffers["threshold"] = threshold.to(self.weight.device)
        return result

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure}"


class MaskedConv2d(_Masked, nn.Conv2d):
    """nn.Conv2d with a learned mask; the same constructor arguments plus ``structure``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, *, structure="unstructured"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        self._init_mask(structure)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MaskedLinear(_Masked, nn.Linear):
    """nn.Linear with a learned mask; the same constructor arguments plus ``structure``."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, structure="unstructured"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_mask(structure)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.masked_weight(), self.bias)


MASKED_LAYERS = (MaskedConv2d, MaskedLinear)


def masked_layers(model: nn.Module) -> list[tuple[str, _Masked]]:
    """(name, layer) of every masked layer of ``model``, in module order (the global tie order)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MASKED_LAYERS)]


def _masked_copy(layer: nn.Module, structure: Structure) -> nn.Module:
    weight = layer.weight
    factory = dict(device=weight.device, dtype=weight.dtype, structure=structure)
    if type(layer) is nn.Conv2d:
        masked = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory)
    else:
        masked = MaskedLinear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    masked.load_state_dict(layer.state_dict())
    return masked.train(layer.training)


def convert(model: nn.Module, sparsity: float = 0.0, structure: str | Structure = "unstructured",
            scope: str = "global", exclude=()) -> nn.Module:
    """Swap every nn.Conv2d and nn.Linear of ``model`` (in place) for its masked twin and prune it.

    Weights, biases, device, dtype and training mode are kept; scores start as |θ|; the thresholds are then
    set so that exactly keep_count(blocks, sparsity) blocks are kept (see ``project``). ``exclude`` names
    modules (qualified names) to leave dense. Subclasses of Conv2d / Linear (e.g. attention's output
    projection) and other layer types stay dense, and a warning lists them. Returns ``model``.
    """
    parsed = parse_structure(structure)
    skipped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if qualified in exclude or isinstance(child, MASKED_LAYERS):
                continue
            if type(child) in (nn.Conv2d, nn.Linear):
                setattr(module, child_name, _masked_copy(child, parsed))
            elif isinstance(child, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Conv2d, nn.Linear)):
                skipped.append(f"{qualified} ({type(child).__name__})")
    if skipped:
        warnings.warn("bipkernels.convert: left dense (not handled): " + ", ".join(skipped), stacklevel=2)
    project(model, sparsity, scope)
    return model


@torch.no_grad()
def project(model: nn.Module, sparsity: float, scope: str = "global") -> None:
    """Set every masked layer's threshold so exactly keep_count(blocks, sparsity) blocks stay (Proj_k).

    ``scope="global"`` ranks the blocks of all layers together (ties: module order, then flat index);
    ``"layer"`` keeps that fraction in each layer. N:M layers keep N of M by themselves and are skipped.
    """
    if scope not in SCOPES:
        raise ValueError(f"bipkernels.project: scope must be one of {SCOPES}, got {scope!r}")
    ops.check_sparsity(sparsity)
    layers = [layer for _, layer in masked_layers(model) if layer.structure.uses_threshold]
    if not layers:
        return
    block_scores = [layer.block_scores() for layer in layers]
    if scope == "global":
        total = sum(scores.numel() for scores in block_scores)
        thresholds = ops.topk_threshold(block_scores, ops.keep_count(total, sparsity))
    else:
        thresholds = [ops.topk_threshold(scores, ops.keep_count(scores.numel(), sparsity))
                      for scores in block_scores]
    for layer, threshold in zip(layers, thresholds):
        layer.threshold.copy_(threshold)


@torch.no_grad()
def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: bool mask shaped like its weight} for every masked layer."""
    return {name: layer.mask() for name, layer in masked_layers(model)}


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Pruned fraction of the masked layers' weights, all layers together (0.0 without masked layers)."""
    kept = total = 0
    for _, layer in masked_layers(model):
        kept += int(layer.mask().sum())
        total += layer.weight.numel()
    return 1.0 - kept / total if total else 0.0
