"""Dense export: plain nn.Conv2d / nn.Linear holding θ ⊙ m, optionally with torch.nn.utils.prune masks."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .. import ops
from ..nn import MaskedConv2d, masked_layers, masks


@torch.no_grad()
def _plain_twin(layer) -> nn.Module:
    """The nn.Conv2d / nn.Linear of a masked layer with weight θ ⊙ m (exactly 0 where pruned, even where θ
    is NaN or inf), the same bias, device, dtype, training mode and requires_grad."""
    weight = layer.weight
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, MaskedConv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    plain.weight.copy_(ops.masked_weight(weight, layer.scores, layer.threshold, layer.structure))
    plain.weight.requires_grad_(weight.requires_grad)
    if layer.bias is not None:
        plain.bias.copy_(layer.bias)
        plain.bias.requires_grad_(layer.bias.requires_grad)
    return plain.train(layer.training)


def export_dense(model: nn.Module, *, prune_masks: bool = False) -> nn.Module:
    """A copy of ``model`` with every masked layer replaced by a plain nn.Conv2d / nn.Linear holding θ ⊙ m.

    The copy's state_dict has the keys of the unconverted architecture (no scores or thresholds), so it
    loads into a freshly built model; outputs equal the masked model's in train and eval mode. Layers
    shared between several places stay shared. ``model`` is unchanged; a model without masked layers
    comes back as a plain deep copy. ``prune_masks=True`` also attaches each exact mask with
    torch.nn.utils.prune (``apply_prune_masks``): the state_dict then holds ``weight_orig`` and
    ``weight_mask`` until ``torch.nn.utils.prune.remove``.
    """
    # Seeding deepcopy's memo swaps each masked layer for its twin wherever the model refers to it,
    # without copying scores that the export throws away.
    twins = {id(layer): _plain_twin(layer) for _, layer in masked_layers(model)}
    dense = copy.deepcopy(model, memo=twins)
    return apply_prune_masks(dense, masks(model)) if prune_masks else dense


def apply_prune_masks(model: nn.Module, layer_masks: dict[str, torch.Tensor]) -> nn.Module:
    """Attach ``{module name: bool mask shaped like its weight}`` (e.g. bipkernels.masks(masked_model)) to
    the plain layers of ``model`` with torch.nn.utils.prune.custom_from_mask, in place; returns ``model``.

    Tools that read torch's pruning state (prune.is_pruned, ``weight_mask`` buffers, prune.remove) then
    see the exact masks. An empty dict changes nothing. ValueError names a layer whose weight has
    another shape than its mask.
    """
    for name, mask in layer_masks.items():
        module = model.get_submodule(name)
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"apply_prune_masks: {name} has weight shape {tuple(module.weight.shape)} "
                             f"but its mask has shape {tuple(mask.shape)}")
        torch_prune.custom_from_mask(module, "weight", mask.to(module.weight.device))
    return model
