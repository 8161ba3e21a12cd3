"""Dense export: plain nn.Conv2d / nn.Linear holding θ ⊙ m, optionally with torch.nn.utils.prune masks."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.nn.utils import skip_init

from .. import ops
from ..nn import _HOOK_DICTS, MASKED_LAYERS, _check_model, _keep_forward, carry_attributes, masked_layers, masks


@torch.no_grad()
def plain_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, groups: int | None = None):
    """An nn.Conv2d or nn.Linear (as ``layer``, masked or plain, is one) with ``layer``'s settings holding
    copies of ``weight`` and ``bias`` (their shapes give its sizes; ``groups`` replaces a convolution's), in
    the memory format of ``layer``'s weight. No initialisation runs: the caller's random numbers stay as
    they were. carry_over then gives it ``layer``'s mode, requires_grad flags and hooks."""
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups if groups is None else groups
        plain = skip_init(nn.Conv2d, weight.shape[1] * groups, weight.shape[0], layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, groups, bias is not None, layer.padding_mode, **factory)
    else:
        plain = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias is not None, **factory)
    plain.weight.copy_(weight)
    if bias is not None:
        plain.bias.copy_(bias)
    if layer.weight.dim() == 4 and layer.weight.is_contiguous(memory_format=torch.channels_last) \
            and not layer.weight.is_contiguous():
        plain.to(memory_format=torch.channels_last)
    return plain


def carry_over(old: nn.Module, new: nn.Module, memo: dict | None = None) -> nn.Module:
    """``new`` (in place, returned) takes ``old``'s training mode, the requires_grad flag of each of its
    parameters by name (a parameter ``old`` lacks, such as a bias that folded constants made, takes the
    weight's), its hooks (the same functions: a user's hook acts on the export as on the model;
    removing it through its handle removes it from ``old`` only) and the user's own attributes
    (nn.carry_attributes: a hook or a forward may read them; deep copies through ``memo`` when ``new``
    goes into a copy of the model made with that memo)."""
    taken = carry_attributes(old, new, memo)
    if taken:
        warnings.warn(f"bipkernels export: the attributes {taken} of a {type(old).__name__} are not carried over "
                      f"to its {type(new).__name__}, which uses those names itself", stacklevel=2)
    new.train(old.training)
    for name, parameter in new.named_parameters(recurse=False):
        source = getattr(old, name, None)
        parameter.requires_grad_((source if source is not None else old.weight).requires_grad)
    for hooks in _HOOK_DICTS:  # not bipkernels' own (convert's _keep_forward: an export needs no bipkernels)
        getattr(new, hooks).update({key: hook for key, hook in getattr(old, hooks).items()
                                    if hook is not _keep_forward})
    new._is_full_backward_hook = old._is_full_backward_hook
    return new


def _plain_twin(layer) -> nn.Module:
    """The nn.Conv2d / nn.Linear of a masked layer with weight θ ⊙ m (exactly 0 where pruned, even where θ
    is NaN or inf), the same bias, device, dtype and layout (carry_over gives it the rest)."""
    masked = ops.masked_weight(layer.weight.detach(), layer.scores.detach(), layer.threshold, layer.structure)
    return plain_layer(layer, masked, layer.bias)


def _tied(model: nn.Module, untied: set[int]) -> list[str]:
    """'NAME and NAME' for each parameter of ``untied`` (ids: the masked weights the export cannot keep
    shared) that several modules hold."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():  # a module shared under two names counts once
        for key, parameter in module._parameters.items():
            if parameter is not None:
                holders.setdefault(id(parameter), []).append(f"{name}.{key}" if name else key)
    return [" and ".join(names) for key, names in holders.items() if key in untied and len(names) > 1]


def check_exportable(op: str, model: nn.Module) -> None:
    """TypeError / ValueError naming ``op`` for a model the exports cannot copy layer by layer: a
    torch.compile wrapper (its state_dict keys gain '_orig_mod.'), or layers pruned with
    torch.nn.utils.prune (their weight is computed by a hook, and deepcopy refuses it)."""
    _check_model(op, model)
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError(f"bipkernels.{op}: model is a torch.compile wrapper (OptimizedModule): pass the module it "
                        "compiled, model._orig_mod, and compile the export")
    pruned = [name or "the model itself" for name, module in model.named_modules()
              if any(isinstance(hook, torch_prune.BasePruningMethod) for hook in module._forward_pre_hooks.values())]
    if pruned:
        raise ValueError(f"bipkernels.{op}: {', '.join(pruned)} pruned with torch.nn.utils.prune (the weight is "
                         "computed from weight_orig and weight_mask): torch.nn.utils.prune.remove(layer, 'weight') "
                         "first (it keeps the zeros)")


def export_dense(model: nn.Module, *, prune_masks: bool = False) -> nn.Module:
    """A copy of ``model`` with every masked layer replaced by a plain nn.Conv2d / nn.Linear holding θ ⊙ m.

    The copy's state_dict has the keys of the unconverted architecture (no scores or thresholds), so it
    loads into a freshly built model; outputs equal the masked model's in train and eval mode. Layers
    shared between several places stay shared, and so do parameters shared with other modules, but for a
    pruned weight: the masked layer used θ ⊙ m and the others θ, so the export unties them and warns (its
    state_dict loaded into an architecture that ties them would give other outputs). ``model`` is
    unchanged; a model without masked layers comes back as a plain deep copy. ``prune_masks=True`` also
    attaches each exact mask with torch.nn.utils.prune (``apply_prune_masks``): the state_dict then holds
    ``weight_orig`` and ``weight_mask`` until ``torch.nn.utils.prune.remove``. TypeError for a torch.compile
    wrapper (export the module it compiled), ValueError for layers pruned with torch.nn.utils.prune.
    """
    check_exportable("export_dense", model)
    if not isinstance(prune_masks, bool):
        raise TypeError(f"bipkernels.export_dense: prune_masks must be a bool, got {type(prune_masks).__name__} "
                        f"{prune_masks!r}")
    dense = dense_copy("export_dense", model)
    return apply_prune_masks(dense, masks(model)) if prune_masks else dense


def dense_copy(op: str, model: nn.Module) -> nn.Module:
    """export_dense's copy of ``model`` (checked by check_exportable), for bipkernels.``op``, which the
    warning about weights that come apart names (the user called ``op``, the warning points at its caller)."""
    # Seeding deepcopy's memo swaps each masked layer for its twin wherever the model refers to it,
    # without copying scores that the export throws away. A bias, and a weight nothing prunes, that
    # other modules also hold stay shared with them through the twin's copy.
    # Twins of masked layers that share a parameter share its copy too.
    twins, untied = {}, set()
    for _, layer in masked_layers(model):
        twin = twins[id(layer)] = _plain_twin(layer)
        if layer.bias is not None:
            twin.bias = twins.setdefault(id(layer.bias), twin.bias)
        if not layer.weight.is_meta and torch.equal(twin.weight, layer.weight):
            twin.weight = twins.setdefault(id(layer.weight), twin.weight)
        else:
            untied.add(id(layer.weight))
    # Then what the twins carry over, its attributes copied into the export: every twin is in the memo by
    # now, so an attribute that refers to a masked layer refers to that layer's twin.
    for _, layer in masked_layers(model):
        carry_over(layer, twins[id(layer)], twins)
    tied = _tied(model, untied)
    if tied:
        warnings.warn(f"bipkernels.{op}: weights tied in the model come apart ({'; '.join(tied)}): the masked "
                      "layer computed with θ ⊙ m and the others with θ, and so does the export, but its state_dict "
                      "loaded into an architecture that ties them gives other outputs", stacklevel=3)
    return copy.deepcopy(model, memo=twins)


def apply_prune_masks(model: nn.Module, layer_masks: dict[str, torch.Tensor]) -> nn.Module:
    """Attach ``{module name: bool mask shaped like its weight}`` (e.g. bipkernels.masks(masked_model)) to
    the plain layers of ``model`` with torch.nn.utils.prune.custom_from_mask, in place; returns ``model``.

    Tools that read torch's pruning state (prune.is_pruned, ``weight_mask`` buffers, prune.remove) then
    see the exact masks. An empty dict changes nothing. A mask may also hold 0 and 1 in another dtype
    (torch's own ``weight_mask`` buffers are float). Every entry is checked before any is attached:
    ValueError names a layer that is missing or has no weight, a mask of another shape than its weight, or
    one with values other than 0 and 1 (it would scale the weights) or none (on the meta device), or a masked
    layer (export first); TypeError a mask that is no tensor.
    """
    op = "bipkernels.apply_prune_masks"
    _check_model("apply_prune_masks", model)
    if not isinstance(layer_masks, dict):
        raise TypeError(f"{op}: layer_masks must be a dict {{module name: bool mask}}, got "
                        f"{type(layer_masks).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module under each of its names
    for name, mask in layer_masks.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"{op}: the model has no {'module' if module is None else 'weight in module'} "
                             f"{name!r}")
        if isinstance(module, MASKED_LAYERS):  # its weight is θ and its forward masks it: torch's hook would too
            raise ValueError(f"{op}: {name!r} is a masked layer ({type(module).__name__}): attach the masks to "
                             "bipkernels.export_dense(model) (or call export_dense(model, prune_masks=True))")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{op}: the mask of {name!r} must be a tensor, got {type(mask).__name__}")
        if mask.is_meta:  # checked with the rest: attaching it would fail after the masks before it
            raise ValueError(f"{op}: the mask of {name!r} is on the meta device, with no values to attach")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"{op}: {name} has weight shape {tuple(module.weight.shape)} "
                             f"but its mask has shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{op}: the mask of {name!r} must hold only 0 and 1 (or be bool), got {mask.dtype} "
                             f"values such as {mask[(mask != 0) & (mask != 1)].flatten()[0].item()!r}")
    for name, mask in layer_masks.items():
        module = modules[name]
        torch_prune.custom_from_mask(module, "weight", mask.to(module.weight.device, torch.bool))
    return model
