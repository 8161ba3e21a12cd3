"""Which layers' weights a model reads directly, not through the layer's forward (a torch.fx trace).

convert leaves such layers dense: a mask applies in the layer's forward only, so F.linear(x,
self.qkv.weight) (torchvision's Swin attention) would compute with the unmasked weight while the mask
counted it as pruned.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

# Uses of a weight that read no values: its metadata, or a new tensor shaped like it.
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_meta", "grad"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "stride", "is_contiguous",
                     "is_floating_point", "get_device", "new_zeros", "new_ones", "new_empty", "new_full"}
_METADATA_FUNCTIONS = {torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
_PASSED_ON = {"detach"}  # a view whose uses are the weight's
_TAKE_METADATA = {"type_as", "to"}  # x.type_as(weight), x.to(weight): the weight's dtype (and device) only


class _Tracer(fx.Tracer):
    """fx's tracer, with ``leaves`` (module types) and TorchScript modules kept as single calls: a masked
    layer's use of its own weight, in its forward, is no direct read."""

    def __init__(self, leaves: tuple):
        super().__init__()
        self.leaves = leaves + (torch.jit.ScriptModule,)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaves) or super().is_leaf_module(module, qualified_name)


def _reads_values(tensor: fx.Node, user: fx.Node) -> bool:
    """Whether ``user`` reads the values of the traced ``tensor``: anything but metadata, directly or
    through an attribute or a detached view (weight.T reads them, weight.shape does not)."""
    method = user.target if user.op == "call_method" else None
    if method in _METADATA_METHODS or (user.op == "call_function" and user.target in _METADATA_FUNCTIONS):
        return False
    if method in _TAKE_METADATA and user.args[0] is not tensor:
        return False
    if method in _PASSED_ON or (user.op == "call_function" and user.target is getattr):
        if user.op == "call_function" and user.args[1] in _METADATA_ATTRIBUTES:
            return False
        return any(_reads_values(user, further) for further in user.users)
    return True


def _stand_in(model: nn.Module) -> tuple[nn.Module, dict[int, int]]:
    """A copy of ``model``'s module tree to trace, and {id of each stand-in tensor: id of its original}.

    Parameters and buffers are meta tensors (nothing allocated; what the forward does to them changes
    nothing of the model's), tensors kept as plain attributes are copies (a forward may read their values:
    int(self.repeats)), lists, dicts and sets are shallow copies (a forward appending to self.history), and
    every other attribute is shared, not copied (a dataset, a lock, a file). No hooks: a user's hook would
    run on the trace's proxies. TorchScript modules are shared whole (the trace keeps them as one call).
    """
    copies, originals = {}, {}

    def tensor(original: torch.Tensor) -> torch.Tensor:
        if id(original) not in copies:
            meta = torch.empty_like(original, device="meta")
            copies[id(original)] = nn.Parameter(meta, original.requires_grad) \
                if isinstance(original, nn.Parameter) else meta
            originals[id(copies[id(original)])] = id(original)
        return copies[id(original)]

    def module(original: nn.Module) -> nn.Module:
        if isinstance(original, torch.jit.ScriptModule):
            return original
        if id(original) not in copies:
            # A bare instance of the class, its attributes set below (copy.copy would pickle, which a
            # parametrized module refuses).
            stand_in = copies[id(original)] = object.__new__(type(original))
            for name, value in vars(original).items():
                if name in ("_parameters", "_buffers"):
                    value = {key: None if item is None else tensor(item) for key, item in value.items()}
                elif name == "_modules":
                    value = {key: None if item is None else module(item) for key, item in value.items()}
                elif "hooks" in name and isinstance(value, dict):
                    value = type(value)()
                elif isinstance(value, torch.Tensor):
                    value = value.detach().clone()
                elif isinstance(value, (list, dict, set)):
                    value = copy.copy(value)
                stand_in.__dict__[name] = value
        return copies[id(original)]

    return module(model), originals


def weights_read_directly(model: nn.Module, layers: set[int], leaves: tuple) -> set[int]:
    """The ids among ``layers`` (module ids) of the layers whose ``weight`` the forward of ``model`` reads
    directly, as a torch.fx trace of a stand-in shows (_stand_in: the model's structure, parameters on
    the meta device, no hooks, so weights read inside a hook go unseen). Modules of the types ``leaves``
    are traced as single calls. A layer counts when its weight is read under any name (a tie, an alias
    such as self.w = self.fc.weight) or when the layer itself is handed to a function.

    Empty where the model does not trace (data-dependent control flow, nn.TransformerEncoderLayer's
    fast-path checks), so such reads go unseen; export_shrunk's own trace refuses to shrink those layers.
    The forward's Python code runs once on proxies: what it does outside the model (a global list it
    appends to) stays done.
    """
    try:
        stand_in, originals = _stand_in(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer(leaves).trace(stand_in)
    except Exception:  # noqa: BLE001 - any failure to copy or trace means nothing is known
        return set()
    holders: dict[int, set[int]] = {}  # id of a weight: the ids of the layers holding it (ties)
    for module in model.modules():
        if id(module) in layers:
            holders.setdefault(id(module.weight), set()).add(id(module))
    read = set()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = _attribute(stand_in, node.target)
        if isinstance(value, nn.Module):  # a layer handed to a function, which may read its weight
            read.update({id(model.get_submodule(node.target))} & layers)  # the stand-in's names are the model's
        elif isinstance(value, torch.Tensor) and any(_reads_values(node, user) for user in node.users):
            read.update(holders.get(originals.get(id(value)), set()))
    return read


def _attribute(module: nn.Module, target: str):
    """The attribute at the dotted ``target`` (a get_attr node's) of ``module``."""
    for part in target.split("."):
        module = getattr(module, part)
    return module
