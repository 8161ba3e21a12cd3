"""Which layers' weights a model reads directly, not through the layer's forward (a torch.fx trace).

convert leaves such layers dense: a mask applies in the layer's forward only, so F.linear(x,
self.qkv.weight) (torchvision's Swin attention) would compute with the unmasked weight while the mask
counted it as pruned.
"""

from __future__ import annotations

import warnings

from torch import fx, nn

# Uses of a weight that read no values: its metadata, or a new tensor shaped like it.
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_meta"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "new_zeros", "new_ones", "new_empty",
                     "new_full"}


class _Tracer(fx.Tracer):
    """fx's tracer, with ``leaves`` (module types) kept as single calls: the masked layers' forward has
    control flow that a trace cannot follow."""

    def __init__(self, leaves: tuple):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaves) or super().is_leaf_module(module, qualified_name)


def _reads_values(node: fx.Node) -> bool:
    """Whether a use of a traced tensor reads its values: anything but metadata, directly or through an
    attribute (weight.T reads them, weight.shape does not)."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in _METADATA_ATTRIBUTES and any(_reads_values(user) for user in node.users)
    return True


def _module_states(model: nn.Module) -> list[tuple[dict, dict]]:
    """(dict, a shallow copy) of every module's attribute, parameter, buffer and child dicts."""
    return [(state, dict(state)) for module in model.modules()
            for state in (module.__dict__, module._parameters, module._buffers, module._modules)]


def weights_read_directly(model: nn.Module, layers: set[int], leaves: tuple) -> set[int]:
    """The ids among ``layers`` (module ids) of the layers whose ``weight`` the forward of ``model`` reads
    directly, as a torch.fx trace shows. Modules of the types ``leaves`` are traced as single calls.

    Empty where the forward does not trace (data-dependent control flow, nn.TransformerEncoderLayer's
    fast-path checks), so such reads go unseen; export_shrunk's own trace refuses to shrink those layers.
    The trace runs the forward's Python code on proxies: whatever it stores on the modules is put back
    afterwards (a cached activation, a call counter).
    """
    states = _module_states(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer(leaves).trace(model)
    except Exception:  # noqa: BLE001 - any failure to trace means nothing is known
        return set()
    finally:
        for state, saved in states:
            state.clear()
            state.update(saved)
    owners = {node.target.removesuffix(".weight") for node in graph.nodes
              if node.op == "get_attr" and node.target.endswith(".weight") and any(map(_reads_values, node.users))}
    return {key for key in (id(model.get_submodule(owner)) for owner in owners) if key in layers}
