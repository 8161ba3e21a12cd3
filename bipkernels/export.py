"""Export a pruned model to plain PyTorch: dense with zeros, with torch.nn.utils.prune masks, physically
smaller (structured masks), or with 2:4 semi-structured sparse weights (CUDA).

    dense = bipkernels.export_dense(model)                    # nn.Conv2d / nn.Linear, 0 where pruned
    dense = bipkernels.export_dense(model, prune_masks=True)  # + weight_orig / weight_mask (torch prune)
    small, report = bipkernels.export_shrunk(model, example)  # zero filters / channels removed
    fast, left = bipkernels.export_semi_structured(model)     # 2:4 Linear weights as sparse tensors

Every export keeps the exact trained mask (bipkernels.ops.masked_weight), never a per-layer re-pruning,
and never modifies ``model``.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

from . import ops
from .nn import MaskedConv2d, masked_layers, masks

__all__ = ["export_dense", "apply_prune_masks", "export_shrunk", "ShrinkReport", "export_semi_structured"]


# ------------------------------------------------------------------------------------------------ dense


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


# ----------------------------------------------------------------------------------------------- shrink
#
# The traced graph is cut into channel spaces: tensors whose channel index means the same channel (an
# activation, its batch norm and ReLU, the residual add that joins branches). Channels lie in dim 1, or in
# the last dim of a space that a Linear layer reads or writes on more than 2 dims (tokens: (B, T, C)); a
# space is one or the other, and an op that would mix them keeps its tensors whole. Convolutions
# (groups=1) and Linear layers ("readers") read one space and write a new one; depthwise convolutions,
# batch norms, activations, pools, means over other dims, flatten and same-shape add/sub/mul stay inside
# a space. A concatenation along the channels makes a joined space, whose channels are the segments of the
# spaces it joins: a channel leaves a space only if it can leave every joined space it is part of too.
# Removing channel c from a space removes the rows writing it, every per-channel parameter inside it and the columns reading it.
# That is exact when each reader has zero weights for c, or reads a value of c that is the same at every
# position for every input ("constant": every layer writing c has a zero filter, so c is a bias pushed
# through batch norms and activations). A constant folds into the reader's bias, unless the reader pads
# with zeros (the constant stops at the border): then one constant channel stays and carries the others,
# their weights merged into its column (linear in the input: Σ v_c W_c = v_0 · Σ (v_c / v_0) W_c).

# One input, channel-wise: elementwise (same shape, channels in any dim), or over dims 2 and up (channels
# in dim 1 only).
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
                          F.hardtanh, F.mish, F.dropout, torch.relu, torch.sigmoid, torch.tanh, "relu", "relu_",
                          "sigmoid", "tanh", "contiguous"}
_CHANNELS_FIRST_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                           nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_CHANNELS_FIRST_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# Over given dims (a constant channel stays constant): channel-wise where neither batch nor channels go.
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, torch.add,
           torch.sub, torch.mul, "add", "add_", "sub", "sub_", "mul", "mul_"}


@dataclass
class ShrinkReport:
    """What export_shrunk changed and what it could not.

    ``shapes``: {module name: (weight shape before, after)} of every module that shrank (batch norms
    included). ``kept``: {layer name: how many of its zero filters / zero input channels stay, and why}.
    """

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{name}: {before} -> {after}" for name, (before, after) in self.shapes.items()]
        lines += [f"{name}: kept {why}" for name, why in self.kept.items()]
        return "\n".join(lines) or "nothing shrank"


def _is_depthwise(module) -> bool:
    return type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels > 1


def _pads_with_zeros(module) -> bool:
    """Whether a constant input stops being constant at the border: zero padding that is convolved or
    averaged, or a fixed divisor over border windows that hold fewer values. Max pooling pads with -inf,
    which leaves a constant constant."""
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and any(module._reversed_padding_repeated_twice)
    if isinstance(module, nn.AvgPool2d):
        padded = any(nn.modules.utils._pair(module.padding))
        return padded and module.count_include_pad or module.divisor_override is not None and \
            (padded or module.ceil_mode)
    return False


def _in_place(node: fx.Node, module) -> bool:
    """Whether ``node`` overwrites its first input: a module or function with inplace=True, a method
    ending in _ (relu_, add_), or x += y."""
    if module is not None:
        return getattr(module, "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.op == "call_function" and (node.kwargs.get("inplace") is True or
                                           node.target in (operator.iadd, operator.isub, operator.imul))


def _is_flatten(node: fx.Node, module) -> bool:
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if node.op != "call_module" and node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _channel_view(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A reader's weight as (out, channels, entries per channel): a convolution's kernel positions, or for
    a Linear layer after a flatten the features made of each channel."""
    return weight.reshape(weight.shape[0], channels, -1)


class _Recorder(fx.Interpreter):
    """Runs the graph once; keeps each tensor's shape and its values at the first position of the first
    sample (the values of constant channels): ``first`` per dim-1 index, ``last`` per last-dim index."""

    def __init__(self, module):
        super().__init__(module)
        self.shapes, self.first, self.last = {}, {}, {}

    def run_node(self, node):
        out = super().run_node(node)
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.numel():
            self.shapes[node] = tuple(out.shape)
            # Copies: a later in-place op would rewrite a view of the activation.
            self.first[node] = out[0].reshape(out.shape[1], -1)[:, 0].detach().to("cpu", torch.float64, copy=True)
            self.last[node] = out.reshape(-1, out.shape[-1])[0].detach().to("cpu", torch.float64, copy=True)
        return out


class _Graph:
    """Channel spaces of a traced model (union-find over its nodes) and what shrinking needs per node."""

    def __init__(self, graph_module: fx.GraphModule, recorder: _Recorder):
        self.gm, self.shapes, self.first, self.last = graph_module, recorder.shapes, recorder.first, recorder.last
        self.parent, self.expansion, self.frozen = {}, {}, {}
        self.placed: dict[fx.Node, int] = {}  # space root -> its channel dim, 1 or -1, once an op decides it
        # Joined space (a torch.cat's node, its root) -> its segments: (a node of the space, its channels).
        self.segments: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
        self.readers: dict[fx.Node, nn.Module] = {}  # Conv2d (groups=1) / Linear nodes
        self.members: dict[fx.Node, nn.Module] = {}  # depthwise convolutions and batch norms
        self.whole: dict[fx.Node, str] = {}  # other Conv2d / Linear layers, which keep every channel: why
        self.constant: dict[fx.Node, torch.Tensor | None] = {}  # bool per channel (None: none), see _analyse
        # A layer with parameters called twice, or sharing one with another layer, cannot be cut for one use.
        calls = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
        owners = {}
        for name, module in graph_module.named_modules():
            for parameter in module.parameters(recurse=False):
                owners.setdefault(id(parameter), []).append(name)
        self.entangled = {name: "shares a parameter with another layer" for names in owners.values()
                          if len(names) > 1 for name in names}
        self.entangled.update({target: "called more than once" for target in calls if calls.count(target) > 1
                               and any(True for _ in graph_module.get_submodule(target).parameters(recurse=False))})
        self.entangled.update({node.target.rpartition(".")[0]: "its weights are also read directly"
                               for node in graph_module.graph.nodes if node.op == "get_attr"})
        for node in graph_module.graph.nodes:
            self._analyse(node)

    def root(self, node):
        while self.parent[node] is not node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def axis(self, node) -> int:
        """The dim of ``node``'s channels: -1 in a space placed there, else 1 (one and the same in 2-D)."""
        return self.placed.get(self.root(node), 1)

    def channels(self, node) -> int:
        return self.shapes[node][self.axis(node)] // self.expansion[node]

    def value(self, node) -> torch.Tensor:
        """Per channel, the recorded value at its first position (its value where it is constant)."""
        return self.last[node] if self.axis(node) == -1 else self.first[node][::self.expansion[node]]

    def constants(self, node) -> torch.Tensor:
        constant = self.constant[node]
        return torch.zeros(self.channels(node), dtype=torch.bool) if constant is None else constant

    def _fits(self, node, axis: int) -> bool:
        """Whether ``node``'s channels may lie in dim ``axis``: 2-D, or its space not placed elsewhere."""
        return len(self.shapes[node]) == 2 or self.placed.get(self.root(node), axis) == axis

    def _reduction_axis(self, node, source) -> int | None:
        """The channel dim of ``source`` that ``node`` keeps: a reduction (torch.mean(x, dims), x.sum(dim=...),
        ...) over dims that are neither the batch's nor the channels', where a reader or a channel-wise op
        has already placed ``source``'s channels (in dim 1 or the last). None otherwise: a reduction over
        dim 1 of an unplaced space could be a mean over channels as well as over tokens."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        axis = self.placed.get(self.root(source))
        if node.op not in ("call_function", "call_method") or node.target not in _REDUCTIONS or \
                len(node.all_input_nodes) != 1 or axis is None or \
                not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(dim, int) for dim in dims):
            return None
        rank = len(self.shapes[source])
        reduced = {dim % rank for dim in dims}
        return axis if not reduced & {0, axis % rank} else None

    def _cat_parts(self, node) -> list | None:
        """The tensors that ``node``, a torch.cat along their channel dim, joins (in order); None if it is
        no such cat: another dim, parts of mixed layouts, none with a decided layout, or flattened parts.
        Parts with no decided layout take the others' (e.g. an upsampled tensor joining a skip)."""
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat, torch.concatenate):
            return None
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        if not isinstance(parts, (list, tuple)) or not parts or not isinstance(dim, int) or \
                not all(isinstance(part, fx.Node) and part in self.shapes for part in parts):
            return None
        rank = len(self.shapes[parts[0]])
        axes = {self.placed.get(self.root(part)) for part in parts} - {None}
        axis = 1 if rank == 2 else axes.pop() if len(axes) == 1 else None
        flat = any(len(self.shapes[part]) != rank or self.expansion[part] != 1 for part in parts)
        return list(parts) if axis is not None and not flat and dim % rank == axis % rank else None

    def bases(self, root) -> list[tuple[fx.Node, int]]:
        """(space root, channel offset) of each segment of the space at ``root``: itself, or what it joins."""
        segments = self.segments.get(root)
        if segments is None:
            return [(root, 0)]
        offsets = [0]
        for _, count in segments:
            offsets.append(offsets[-1] + count)
        return [(self.root(part), offset) for (part, _), offset in zip(segments, offsets)]

    def _place(self, node, axis: int):
        if len(self.shapes[node]) > 2:
            self.placed[self.root(node)] = axis

    @staticmethod
    def zero_filters(module) -> torch.Tensor:
        """Per output channel (row of the weight), whether all its weights are zero."""
        return (module.weight.reshape(module.weight.shape[0], -1) == 0).all(1).cpu()

    def _freeze(self, node, why: str):
        self.frozen.setdefault(node, set()).add(why)

    def _join(self, node, source, expansion: int = 1):
        self.parent[node] = self.root(source)
        self.expansion[node] = self.expansion[source] * expansion

    def _union(self, node, other):
        root, other_root = self.root(node), self.root(other)
        if other_root is not root:
            self.parent[other_root] = root
            if other_root in self.placed:
                self.placed[root] = self.placed.pop(other_root)

    def _analyse(self, node):
        """Places ``node`` in a space; ``constant[node]`` marks the channels that provably hold one
        input-independent value at every position (a reader's zero filters, then carried through the
        channel-wise ops that keep a constant constant)."""
        inputs = node.all_input_nodes
        if node.op == "output" or node not in self.shapes:  # the result, or a non-tensor / 1-D value
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
                self.whole[node] = f"{node.target} (its output has fewer than 2 dims)"
            for source in inputs:
                if source in self.shapes:
                    self._freeze(source, "it reaches the model output" if node.op == "output" else
                                 f"{_name(node)} reads it")
            return
        self.parent[node], self.expansion[node] = node, 1
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        kind, what = self._kind(node, module)
        self.constant[node] = None
        if kind == "input":
            self._freeze(node, "it is the model input")
        elif kind == "reader":
            self.readers[node] = module
            self.constant[node] = self.zero_filters(module)
            axis = 1 if isinstance(module, nn.Conv2d) else -1
            self._place(inputs[0], axis)
            self._place(node, axis)
        elif kind == "cat":
            parts = self._cat_parts(node)
            axis = 1 if len(self.shapes[node]) == 2 else next(self.placed[self.root(part)] for part in parts
                                                                if self.root(part) in self.placed)
            for part in parts:
                self._place(part, axis)
            self.segments[node] = [segment for part in parts for segment in
                                   self.segments.get(self.root(part), [(part, self.channels(part))])]
            self._place(node, axis)
            self.constant[node] = torch.cat([self.constants(part) for part in parts])
        elif kind == "unknown":
            why = f"{_name(node)} ({what})"
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self.whole[node] = why
            self._freeze(node, f"{why} writes it")
            for source in inputs:
                if source in self.shapes:
                    self._freeze(source, f"{why} reads it")
        else:
            source = inputs[0]
            if kind in ("flatten", "channels-first", "depthwise"):
                self._place(source, 1)
            self._join(node, source, math.prod(self.shapes[source][2:]) if kind == "flatten" else 1)
            for other in inputs[1:]:
                self._union(node, other)
            given = [self.constant[s] for s in inputs]  # a constant channel: constant in every input
            carried = None if any(c is None for c in given) else torch.stack(given).all(0)
            # A constant survives zero padding only if it is zero, and a sum only then stays the same for
            # every input size (it multiplies by the number of positions summed).
            summed = kind == "reduction" and node.target in ("sum", torch.sum)
            if carried is not None and (_pads_with_zeros(module) or summed):
                carried &= self.value(source) == 0
            if kind == "depthwise":
                self.members[node] = module
                carried = self.zero_filters(module) if carried is None else carried | self.zero_filters(module)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                self.members[node] = module
            self.constant[node] = carried

    def _kind(self, node, module) -> tuple[str, str]:
        """How ``node`` treats channels: input, reader, depthwise, flatten, elementwise, channels-first
        (channel-wise over dims 2 and up), reduction (over dims other than the batch's and channels'),
        cat (along the channels), binary (channel-wise, same shapes) or unknown, with why for unknown."""
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            return "input", ""
        if not all(source in self.shapes for source in inputs):
            return "unknown", "it reads a value that is not an activation"
        if node.op == "call_module" and node.target in self.entangled:
            return "unknown", self.entangled[node.target]
        op = node.target if node.op in ("call_function", "call_method") else None  # a function or method
        source = inputs[0] if inputs else None
        rank = len(self.shapes[source]) if inputs else 0
        if inputs and _in_place(node, module) and len(source.users) > 1:
            return "unknown", "it overwrites in place a tensor that other ops read"
        across = "its input's channels lie in the last dim" if inputs and not self._fits(source, 1) else ""
        if isinstance(module, nn.Conv2d):
            if type(module) is not nn.Conv2d or rank != 4:
                return "unknown", "a Conv2d subclass or an unbatched input"
            if across:
                return "unknown", across
            if module.groups == 1:
                return "reader", ""
            return ("depthwise", "") if _is_depthwise(module) else ("unknown", "a grouped convolution")
        if isinstance(module, nn.Linear):
            if type(module) is not nn.Linear:
                return "unknown", "a Linear subclass"
            if not self._fits(source, -1):
                return "unknown", "it reads the last dim of a tensor whose channels lie in dim 1"
            return "reader", ""
        if len(inputs) == 1 and _is_flatten(node, module) and rank > 2 and not across:
            return "flatten", ""
        # F.dropout(x, p) defaults to training=True even in eval mode: it would not keep constants.
        dropping = node.target is F.dropout and (node.args[2] if len(node.args) > 2 else
                                                  node.kwargs.get("training", True))
        if len(inputs) == 1 and (isinstance(module, _ELEMENTWISE_MODULES) or op in _ELEMENTWISE_FUNCTIONS) \
                and self.shapes[source] == self.shapes[node] and not dropping:
            return "elementwise", ""
        # 2-D pools read a 3-D tensor as one unbatched (C, H, W) sample: its dim 1 would be pooled as H.
        batched = rank in (2, 3) if isinstance(module, nn.BatchNorm1d) else rank == 4
        if len(inputs) == 1 and (isinstance(module, _CHANNELS_FIRST_MODULES) or op in _CHANNELS_FIRST_FUNCTIONS) \
                and batched and self.shapes[source][:2] == self.shapes[node][:2] and not across:
            return "channels-first", ""
        if rank > 2 and self._reduction_axis(node, source) is not None:
            return "reduction", ""
        if self._cat_parts(node) is not None:
            return "cat", ""
        placed = {self.placed.get(self.root(s)) for s in inputs} - {None}
        roots = {self.root(s) for s in inputs}
        if inputs and op in _BINARY and all(self.shapes[s] == self.shapes[node] for s in inputs) and \
                len(placed) <= 1:
            if len(roots) > 1 and roots & self.segments.keys():  # a joined space stays apart
                return "unknown", "it joins a concatenation with another space"
            return "binary", ""
        return "unknown", "an op shrinking does not handle"


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op in ("call_module", "call_method") else getattr(node.target, "__name__",
                                                                                       str(node.target))


@dataclass
class _Plan:
    """One space's decision: which channels stay, why each stays, and per channel its carrier (-1: none),
    the kept constant channel whose column takes its constant where a reader pads with zeros."""

    keep: torch.Tensor
    why: list[str]
    carriers: torch.Tensor


def _frozen(graph: _Graph, nodes: list) -> list[str]:
    """Why a space keeps every channel (empty: it need not)."""
    reasons = sorted(set().union(*(graph.frozen.get(node, set()) for node in nodes)))
    if len({graph.channels(node) for node in nodes}) > 1:
        reasons.append("its tensors disagree on the number of channels")
    return reasons


def _plan(graph: _Graph, nodes: list, readers: list, frozen: list[str]) -> _Plan:
    """The plan of a space (not a joined one) of ``nodes``, read by ``readers``: (reader, the offset of
    this space's channels among its input's), kept whole for the reasons ``frozen``."""
    channels = max(graph.channels(node) for node in nodes)
    none = torch.full((channels,), -1)
    if frozen:
        return _Plan(torch.ones(channels, dtype=torch.bool), ["; ".join(frozen)] * channels, none)
    why = [""] * channels
    needed = torch.zeros(channels, dtype=torch.bool)  # some reader needs the channel's varying values
    carried = {}  # (reader input node, offset) -> channels whose constant meets the reader's zero padding
    for reader, offset in readers:
        source = reader.all_input_nodes[0]
        columns = slice(offset, offset + channels)
        weight = _channel_view(graph.readers[reader].weight, graph.channels(source))[:, columns]
        zero = (weight == 0).all(2).all(0).cpu()
        constant, value = graph.constants(source)[columns], graph.value(source)[columns]
        free = zero | constant & ((value == 0) | (not _pads_with_zeros(graph.readers[reader])))
        for c in (~free & ~constant & ~needed).nonzero().flatten().tolist():
            why[c] = f"{reader.target} reads it and it varies with the input"
        needed |= ~free & ~constant
        if (~free & constant).any():
            carried[source, offset] = carried.get((source, offset), torch.zeros_like(needed)) | ~free & constant
            for c in (~free & constant).nonzero().flatten().tolist():
                why[c] = why[c] or f"its constant value meets the zero padding of {reader.target}"
    candidates = torch.stack(list(carried.values())).any(0) & ~needed if carried else torch.zeros_like(needed)
    # The carrier's value divides the others' (v_c / v_0): take the largest smallest |v_0| over the readers.
    strength = torch.stack([torch.where(graph.constants(s)[o:o + channels], graph.value(s)[o:o + channels].abs(),
                                        0.0) for s, o in carried]).amin(0) if carried else None
    carrier = int(strength.masked_fill(~candidates, 0).argmax()) if candidates.any() else None
    if carrier is not None and strength[carrier] == 0:
        carrier = None  # no constant channel is nonzero at every reader behind zero padding
    keep = needed | candidates
    if carrier is not None:
        keep = needed.clone()
        keep[carrier] = True
        why[carrier] = "it carries the constants of the removed channels into zero padding"
    if not keep.any() and channels:
        keep[0] = True
        why[0] = "every channel could go, and a layer keeps one"
    return _Plan(keep, why, none if carrier is None else torch.full((channels,), carrier))


def _joined_plan(plans: list[_Plan]) -> _Plan:
    """The plan of a joined space: its segments' plans end to end, carriers moved by their offsets."""
    offsets = torch.tensor([0] + [len(plan.keep) for plan in plans]).cumsum(0)
    carriers = [torch.where(plan.carriers >= 0, plan.carriers + offset, -1) for plan, offset in zip(plans, offsets)]
    return _Plan(torch.cat([plan.keep for plan in plans]), [why for plan in plans for why in plan.why],
                 torch.cat(carriers))


def _kept_notes(what: str, zero: torch.Tensor, plan: _Plan) -> list[str]:
    reasons = [plan.why[c] for c in (zero & plan.keep).nonzero().flatten().tolist()]
    counts = {reason: reasons.count(reason) for reason in reasons}
    return [f"{n} zero {what}{'s' if n > 1 else ''} ({reason})" for reason, n in counts.items()]


def _index(keep: torch.Tensor, expansion: int) -> torch.Tensor:
    """Feature indices of the kept channels when each channel spans ``expansion`` features."""
    channels = keep.nonzero().flatten()
    return (channels[:, None] * expansion + torch.arange(expansion)).flatten()


@torch.no_grad()
def _shrunk_reader(module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    factory = dict(device=module.weight.device, dtype=module.weight.dtype)
    if type(module) is nn.Linear:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, **factory)
    else:  # a depthwise convolution keeps one group per channel
        groups = weight.shape[0] if _is_depthwise(module) else 1
        new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], module.kernel_size, module.stride, module.padding,
                        module.dilation, groups, bias is not None, module.padding_mode, **factory)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


@torch.no_grad()
def _shrunk_norm(norm, index: torch.Tensor) -> nn.Module:
    tensors = dict(norm.named_parameters(recurse=False)) | dict(norm.named_buffers(recurse=False))
    floating = [t for t in tensors.values() if t.is_floating_point()]
    factory = dict(device=floating[0].device, dtype=floating[0].dtype) if floating else {}
    new = type(norm)(len(index), norm.eps, norm.momentum, norm.affine, norm.track_running_stats, **factory)
    for name, tensor in tensors.items():  # num_batches_tracked is a 0-dim count
        getattr(new, name).copy_(tensor if tensor.dim() == 0 else tensor[index.to(tensor.device)])
    return new


@torch.no_grad()
def _shrink_reader(graph: _Graph, node, plans: dict) -> nn.Module:
    """The reader at ``node`` without the removed rows and columns; the removed constant input channels
    folded into its bias, or behind zero padding into the carrier's column (sums in float64)."""
    module = graph.readers[node]
    source = node.all_input_nodes[0]
    plan_in, plan_out = plans[graph.root(source)], plans[graph.root(node)]
    channels = graph.channels(source)
    weight = _channel_view(module.weight.detach(), channels)
    value = graph.value(source).to(weight.device)
    fold = (~plan_in.keep & graph.constants(source)).to(weight.device) & (value != 0) & (weight != 0).any(2).any(0)
    rows = plan_out.keep.nonzero().flatten().to(weight.device)
    kept = weight[rows][:, plan_in.keep.to(weight.device)]
    bias = None if module.bias is None else module.bias.detach()[rows].double()
    if fold.any() and _pads_with_zeros(module):
        carriers = plan_in.carriers.to(weight.device)[fold]
        merged = weight[rows][:, fold].double() * (value[fold] / value[carriers])[:, None]
        columns = (plan_in.keep.cumsum(0) - 1).to(weight.device)[carriers]  # the carriers among the kept
        kept.index_add_(1, columns, merged.to(kept.dtype))
    elif fold.any():
        folded = (weight[rows][:, fold].sum(2, dtype=torch.float64) * value[fold]).sum(1)
        bias = folded if bias is None else bias + folded
    shape = (len(rows), -1) + tuple(module.weight.shape[2:])
    return _shrunk_reader(module, kept.reshape(shape), None if bias is None else bias.to(kept.dtype))


def export_shrunk(model: nn.Module, example_inputs, *, warn: bool = True) -> tuple[nn.Module, ShrinkReport]:
    """A physically smaller copy of ``model``: zero filters and zero input channels removed, with the
    batch norms, depthwise convolutions and next layers that share their channels.

    ``model``: masked (exported first, see export_dense) or plain with zeros; traced with torch.fx.
    ``example_inputs``: a tensor or a tuple of the forward's arguments (shapes only matter; values are
    recorded once to read the constant outputs of pruned filters). Returns ``(smaller, report)``:
    ``smaller`` is the model's own class in eval mode and gives the masked model's eval-mode outputs up
    to float rounding (batch norms use their running statistics; fine-tuning it in train mode is a new
    model). A channel is removed only where that is exact:

    - residual streams (tensors joined by add) lose a channel only if every layer writing the stream
      has that filter at zero, or every layer reading it has that input channel at zero;
    - a pruned filter's output is a constant (its bias through batch norm and activation); it folds
      into the next layer's bias, or behind zero padding, into one kept carrier channel;
    - Linear layers on more than 2 dims (tokens: (B, T, C)) read and write channels in the last dim;
      an op that mixes that layout with channels in dim 1 keeps its tensors' channels (the first op in
      graph order to read a tensor decides its layout: a later reader of the other layout stays whole);
    - a torch.cat along the channels joins its inputs' channels end to end: a channel goes only if it
      can go from its own space and from every concatenation it is part of (DenseNet, Inception);
    - a sum over positions keeps only zero constants (it scales them by the input's size); 2-D pools
      and batch norms only take batched inputs;
    - tensors that reach the output or come from the input, layers called twice, grouped convolutions
      other than depthwise, in-place ops on tensors other ops read, and ops outside the known
      channel-wise set keep every channel; layers
      inside a module that torch.fx calls whole (torch.nn's, e.g. nn.TransformerEncoderLayer) or not
      called as modules stay whole.

    ``report.kept`` lists each layer whose zero filters or channels stay and why (also a warning when
    ``warn``); ``report.shapes`` every module that shrank. A model with nothing to remove comes back
    as an unchanged copy. ValueError if torch.fx cannot trace the model.
    """
    dense = export_dense(model).eval()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    try:
        traced = fx.symbolic_trace(dense)
    except Exception as error:  # fx raises many types for untraceable Python
        raise ValueError(f"export_shrunk: torch.fx cannot trace {type(model).__name__} ({error}); "
                         "export_dense gives the same model without removing channels") from error
    recorder = _Recorder(traced)
    with torch.no_grad():
        recorder.run(*inputs)
    graph = _Graph(traced, recorder)
    spaces, readers, frozen = {}, {}, {}
    for node in graph.parent:
        spaces.setdefault(graph.root(node), []).append(node)
    for node in graph.readers:  # a reader of a joined space reads each of its segments
        for base, offset in graph.bases(graph.root(node.all_input_nodes[0])):
            readers.setdefault(base, []).append((node, offset))
    for root, nodes in spaces.items():  # a joined space kept whole keeps its segments whole
        for base, _ in graph.bases(root):
            frozen.setdefault(base, set()).update(_frozen(graph, nodes))
    plans = {root: _plan(graph, nodes, readers.get(root, []), sorted(frozen[root]))
             for root, nodes in spaces.items() if root not in graph.segments}
    for root in graph.segments:
        plans[root] = _joined_plan([plans[base] for base, _ in graph.bases(root)])

    report = ShrinkReport()
    whole = {node.target: why for node, why in graph.whole.items()} | _untraced_layers(dense, traced)
    for name, why in whole.items():
        zeros = _zero_parts(dense.get_submodule(name))
        if zeros:
            report.kept[name] = f"{zeros} ({why}: shrinking leaves it whole)"
    for node, module in graph.readers.items():
        source, plan_in = node.all_input_nodes[0], plans[graph.root(node.all_input_nodes[0])]
        weight = _channel_view(module.weight, graph.channels(source))
        zero_columns = (weight == 0).all(2).all(0).cpu()
        notes = _kept_notes("filter", graph.constant[node], plans[graph.root(node)]) + \
            _kept_notes("input channel", zero_columns, plan_in)
        # After a flatten a channel feeds several features; a zero feature of a kept channel stays.
        partial = int(((weight == 0).all(0).cpu() & (plan_in.keep & ~zero_columns)[:, None]).sum())
        if partial:
            notes.append(f"{partial} zero input feature{'s' if partial > 1 else ''} (each channel feeds "
                         f"{weight.shape[2]} features; a channel goes only whole)")
        if not (plans[graph.root(node)].keep.all() and plan_in.keep.all()):
            _replace(dense, node.target, _shrink_reader(graph, node, plans), report)
        if notes:
            report.kept[node.target] = ", ".join(notes)
    for node, module in graph.members.items():
        plan = plans[graph.root(node)]
        notes = _kept_notes("filter", graph.zero_filters(module), plan) if _is_depthwise(module) else []
        if notes:
            report.kept[node.target] = ", ".join(notes)
        if plan.keep.all():
            continue
        index = _index(plan.keep, graph.expansion[node])
        if _is_depthwise(module):
            index = index.to(module.weight.device)
            bias = None if module.bias is None else module.bias.detach()[index]
            _replace(dense, node.target, _shrunk_reader(module, module.weight.detach()[index], bias), report)
        else:
            _replace(dense, node.target, _shrunk_norm(module, index), report)
    if warn and report.kept:
        warnings.warn("bipkernels.export_shrunk: zero filters or channels stay in:\n  "
                      + "\n  ".join(f"{name}: {why}" for name, why in report.kept.items()), stacklevel=2)
    return dense, report


def _untraced_layers(model: nn.Module, traced: fx.GraphModule) -> dict[str, str]:
    """{name: why} of the Conv2d / Linear layers of ``model`` that the traced graph does not call: inside a
    module that torch.fx keeps as one call (torch.nn's own, such as nn.TransformerEncoderLayer), or
    used some other way (their weights read directly)."""
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    called = {id(traced.get_submodule(target)) for target in calls}
    untraced = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in called:
            inside = [target for target in calls if name.startswith(target + ".")]
            untraced[name] = f"inside {inside[0]}, which torch.fx traces as one call" if inside else \
                "the model itself" if not name else "not called as a module in the traced forward"
    return untraced


def _zero_parts(module: nn.Module) -> str:
    """'N zero filters, M zero input channels' of a Conv2d / Linear weight ('' if none; input channels
    only where one column is one channel, groups=1)."""
    weight = module.weight.detach()
    counts = {"filter": int((weight.reshape(weight.shape[0], -1) == 0).all(1).sum())}
    if getattr(module, "groups", 1) == 1:
        counts["input channel"] = int((weight.transpose(0, 1).reshape(weight.shape[1], -1) == 0).all(1).sum())
    return ", ".join(f"{n} zero {what}{'s' if n > 1 else ''}" for what, n in counts.items() if n)


def _replace(model: nn.Module, name: str, new: nn.Module, report: ShrinkReport) -> None:
    old = model.get_submodule(name)
    new.train(old.training)
    model.set_submodule(name, new)
    report.shapes[name] = (_channels_shape(old), _channels_shape(new))


def _channels_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape (a batch norm without affine parameters: its running mean's)."""
    tensor = module.weight if getattr(module, "weight", None) is not None else module.running_mean
    return tuple(tensor.shape) if tensor is not None else (module.num_features,)


# ------------------------------------------------------------------------------------ semi-structured


def export_semi_structured(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A dense export (export_dense) whose Linear layers with a 2:4 or 1:4 mask hold their weight as a
    torch.sparse semi-structured tensor (to_sparse_semi_structured): half the values stored, and the
    matrix product on the sparse tensor cores of a CUDA GPU of compute capability 8.0 or newer.

    The library's N:M groups run along the input dimension, the rows of a Linear weight (out, in), which
    is the layout those tensors take. Torch's constraints apply: a CUDA tensor, float16 / bfloat16
    (float32 and int8 with the CUTLASS backend), both dimensions multiples of its minimum tile (16 to 64
    by backend and dtype). For inference (the sparse weights do not train). Returns ``(model, left)``:
    ``left`` = {masked layer: why it stays dense}: other structures, convolutions (their N:M groups are
    not rows of a matrix product), and torch's refusal verbatim (e.g. a CPU model).
    """
    from torch.sparse import to_sparse_semi_structured

    dense = export_dense(model)
    left = {}
    for name, layer in masked_layers(model):
        structure = layer.structure
        if not (structure.kind == "nm" and structure.b == 4 and structure.a <= 2):
            left[name] = f"its structure {structure} is not 2:4"
        elif isinstance(layer, MaskedConv2d):
            left[name] = "a convolution: semi-structured tensors are 2-D matrix product operands"
        else:
            linear = dense.get_submodule(name)
            try:
                sparse = to_sparse_semi_structured(linear.weight.detach())
            except RuntimeError as error:
                left[name] = str(error)
                continue
            linear.weight = nn.Parameter(sparse, requires_grad=False)
    return dense, left
