"""The channel spaces of a traced model, the analysis behind export_shrunk.

The traced graph is cut into channel spaces: tensors whose channel index means the same channel (an
activation, its batch norm and ReLU, the residual add that joins branches). Channels lie in dim 1, or in
the last dim of a space that a Linear layer reads or writes on more than 2 dims (tokens: (B, T, C)); a
space is one or the other, and an op that would mix them keeps its tensors whole. Convolutions
(grouped ones too) and Linear layers ("readers") read one space and write a new one; depthwise
convolutions, batch norms, activations, pools, means over other dims, flatten, and add/sub/mul of tensors
that line up channel for channel (the same shape, or broadcast over positions: an SE block's scale) stay
inside a space. A concatenation along the channels makes a joined space, whose channels are the segments of the
spaces it joins: a channel leaves a space only if it can leave every joined space it is part of too.

Removing channel c from a space removes the rows writing it, every per-channel parameter inside it and
the columns reading it. That is exact when each reader has zero weights for c, or reads a value of c
that is the same at every position for every input ("constant": every layer writing c has a zero
filter, so c is a bias pushed through batch norms and activations). A constant folds into the reader's
bias, unless the reader pads with zeros (the constant stops at the border): then one constant channel
stays and carries the others, their weights merged into its column (linear in the input:
Σ v_c W_c = v_0 · Σ (v_c / v_0) W_c); a grouped convolution would need a carrier in each group, so its
constants behind zero padding stay. Grouped convolutions keep as many channels in each group that stays;
a group goes whole where all its input channels and filters go.
shrink.py plans and applies the removal.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..nn import _HOOK_DICTS, _keep_forward

# One input, channel-wise: elementwise (same shape, channels in any dim), or over dims 2 and up (channels
# in dim 1 only).
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
                          F.hardtanh, F.mish, torch.relu, torch.sigmoid, torch.tanh, "relu", "relu_",
                          "sigmoid", "tanh", "contiguous"}
_CHANNELS_FIRST_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                           nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_CHANNELS_FIRST_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# Over given dims (a constant channel stays constant): channel-wise where neither batch nor channels go.
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
# torch.fx records x += y as operator.add (Proxy has no __iadd__): export_shrunk compares the trace's
# outputs with the forward's for the aliasing that hides.
_BINARY = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, "add", "add_", "sub", "sub_",
           "mul", "mul_"}
_PRODUCTS = {operator.mul, torch.mul, "mul", "mul_"}
# The identity unless their training argument (at this position; True when not given) says otherwise:
# (module, name) of the function as torch.fx records a call of it (torchvision wraps stochastic_depth
# for fx, so a StochasticDepth module's call is one node; a direct call with training=False leaves none).
_DROPOUT_FUNCTIONS = {("torch.nn.functional", "dropout"): 2,
                      ("torchvision.ops.stochastic_depth", "stochastic_depth"): 3}


def _dropout_training(node: fx.Node) -> bool | None:
    """For a call of a dropout-like function (F.dropout, torchvision's stochastic_depth), whether it drops
    values (its training argument; F.dropout(x, p) defaults to training=True even in eval mode); None
    for any other node."""
    function = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
    position = _DROPOUT_FUNCTIONS.get(function) if node.op == "call_function" else None
    if position is None:
        return None
    return bool(node.args[position] if len(node.args) > position else node.kwargs.get("training", True))


def is_depthwise(module) -> bool:
    return type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels > 1


def pads_with_zeros(module) -> bool:
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


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of the user's (forward, forward pre-, backward): not convert's
    _keep_forward, which an export drops."""
    return any(hook is not _keep_forward for hooks in _HOOK_DICTS for hook in getattr(module, hooks, {}).values())


def _has_state(module: nn.Module) -> bool:
    """Whether ``module`` itself holds a parameter or a buffer, which shrinking cuts to one space's channels."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _in_place(node: fx.Node, module) -> bool:
    """Whether ``node`` overwrites its first input: a module or function with inplace=True, or a method
    ending in _ (relu_, add_)."""
    if module is not None:
        return getattr(module, "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.op == "call_function" and node.kwargs.get("inplace") is True


def _is_flatten(node: fx.Node, module) -> bool:
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if node.op != "call_module" and node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def group_view(module, channels: int) -> torch.Tensor:
    """A reader's weight as (groups, filters per group, input channels per group, entries per channel):
    a convolution's kernel positions, or for a Linear layer after a flatten the features made of each
    channel. One group but for grouped convolutions, whose weights outside their group are zero."""
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, channels // groups, -1)


def zero_columns(module, channels: int) -> torch.Tensor:
    """Per input channel of a reader (on the CPU), whether all its weights for the channel are zero."""
    return (group_view(module, channels) == 0).all(3).all(1).flatten().cpu()


class Recorder(fx.Interpreter):
    """Runs the graph once; keeps each tensor's shape and its values at the first position of the first
    sample (the values of constant channels): ``first`` per dim-1 index, ``last`` per last-dim index; and
    the storage each tensor lies in (``storage``: an nn.Identity or an eval-mode dropout returns its input
    itself, so an in-place op after it also rewrites that input)."""

    def __init__(self, module):
        super().__init__(module)
        self.shapes, self.first, self.last, self.storage = {}, {}, {}, {}

    def run_node(self, node):
        out = super().run_node(node)
        if isinstance(out, torch.Tensor) and out.layout == torch.strided:
            self.storage[node] = out.untyped_storage().data_ptr()
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.numel():
            self.shapes[node] = tuple(out.shape)
            # Copies: a later in-place op would rewrite a view of the activation.
            self.first[node] = out[0].reshape(out.shape[1], -1)[:, 0].detach().to("cpu", torch.float64, copy=True)
            self.last[node] = out.reshape(-1, out.shape[-1])[0].detach().to("cpu", torch.float64, copy=True)
        return out


class ChannelGraph:
    """Channel spaces of a traced model (union-find over its nodes) and what shrinking needs per node."""

    def __init__(self, graph_module: fx.GraphModule, recorder: Recorder):
        self.gm, self.shapes, self.first, self.last = graph_module, recorder.shapes, recorder.first, recorder.last
        self.storage = recorder.storage
        self.order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
        self.parent, self.expansion, self.frozen = {}, {}, {}
        self.placed: dict[fx.Node, int] = {}  # space root -> its channel dim, 1 or -1, once an op decides it
        # Joined space (a torch.cat's node, its root) -> its segments: (a node of the space, its channels).
        self.segments: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
        self.readers: dict[fx.Node, nn.Module] = {}  # Conv2d (but depthwise) / Linear nodes
        self.members: dict[fx.Node, nn.Module] = {}  # depthwise convolutions and batch norms
        self.whole: dict[fx.Node, str] = {}  # other Conv2d / Linear layers, which keep every channel: why
        self.constant: dict[fx.Node, torch.Tensor | None] = {}  # bool per channel (None: none), see _analyse
        # A layer with parameters or buffers called twice (a batch norm without affine parameters still has
        # its running statistics), or sharing a parameter with another layer, cannot be cut for one use.
        calls = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
        owners = {}
        for name, module in graph_module.named_modules():
            for parameter in module.parameters(recurse=False):
                owners.setdefault(id(parameter), []).append(name)
        self.entangled = {name: "shares a parameter with another layer" for names in owners.values()
                          if len(names) > 1 for name in names}
        self.entangled.update({target: "called more than once" for target in calls if calls.count(target) > 1
                               and _has_state(graph_module.get_submodule(target))})
        self.entangled.update({node.target.rpartition(".")[0]: "its weights are also read directly"
                               for node in graph_module.graph.nodes if node.op == "get_attr"})
        # The trace does not show what a hook does (a per-channel scale would no longer fit a shrunk output).
        self.entangled.update({target: "it has hooks" for target in calls
                               if has_hooks(graph_module.get_submodule(target))})
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

    def _channel_wise(self, node, axes: set) -> bool:
        """Whether the inputs of ``node``, a binary op, line up channel for channel with its output: all of
        its shape, or (once their space is placed in one of ``axes``) broadcast along dims other than the
        batch's and the channels' only (an SE block's (B, C, 1, 1) scale times (B, C, H, W)). Not where a
        flattened tensor's features meet another's (channels of different sizes)."""
        shape, inputs = self.shapes[node], node.all_input_nodes
        if len({self.expansion[s] for s in inputs}) > 1:
            return False
        if all(self.shapes[s] == shape for s in inputs):
            return True
        if len(axes) != 1 or len(shape) < 3:
            return False
        channel_dims = {0, next(iter(axes)) % len(shape)}
        return all(len(self.shapes[s]) == len(shape) and
                   all(size == full or (size == 1 and dim not in channel_dims)
                       for dim, (size, full) in enumerate(zip(self.shapes[s], shape)))
                   for s in inputs)

    def bases(self, root) -> list[tuple[fx.Node, int]]:
        """(space root, channel offset) of each segment of the space at ``root``: itself, or what it joins."""
        segments = self.segments.get(root)
        if segments is None:
            return [(root, 0)]
        offsets = [0]
        for _, count in segments:
            offsets.append(offsets[-1] + count)
        return [(self.root(part), offset) for (part, _), offset in zip(segments, offsets)]

    def _read_after(self, node, source) -> bool:
        """Whether an op after ``node`` reads a tensor made before it in the storage of ``source``, which
        ``node`` overwrites (``source`` returned its input itself: nn.Identity, eval-mode dropout). A
        storage that an earlier, freed tensor used shows no such reader: all of its read before ``node``."""
        storage = self.storage.get(source)
        return storage is not None and any(
            self.order[user] > self.order[node] for earlier in self.order if self.order[earlier] < self.order[node]
            and self.storage.get(earlier) == storage for user in earlier.users if user is not node)

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
            if kind == "binary" and node.target in _PRODUCTS:  # a zero constant times anything: zero
                zero = torch.stack([self.constants(s) & (self.value(s) == 0) for s in inputs]).any(0)
                carried = zero if carried is None else carried | zero
            # A constant survives zero padding only if it is zero, and a sum only then stays the same for
            # every input size (it multiplies by the number of positions summed).
            summed = kind == "reduction" and node.target in ("sum", torch.sum)
            if carried is not None and (pads_with_zeros(module) or summed):
                carried &= self.value(source) == 0
            if kind == "depthwise":
                self.members[node] = module
                carried = self.zero_filters(module) if carried is None else carried | self.zero_filters(module)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                self.members[node] = module
                if self.expansion[node] > 1:  # on flattened features: each of a channel's has its own affine
                    carried = None
            self.constant[node] = carried

    def _kind(self, node, module) -> tuple[str, str]:
        """How ``node`` treats channels: input, reader, depthwise, flatten, elementwise, channels-first
        (channel-wise over dims 2 and up), reduction (over dims other than the batch's and channels'),
        cat (along the channels), binary (channel-wise: add, sub, mul of tensors that line up channel for
        channel, see _channel_wise) or unknown, with why for unknown."""
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
        if inputs and _in_place(node, module) and (len(source.users) > 1 or self._read_after(node, source)):
            return "unknown", "it overwrites in place a tensor that other ops read"
        across = "its input's channels lie in the last dim" if inputs and not self._fits(source, 1) else ""
        if isinstance(module, nn.Conv2d):
            if type(module) is not nn.Conv2d or rank != 4:
                return "unknown", "a Conv2d subclass or an unbatched input"
            if across:
                return "unknown", across
            return ("depthwise", "") if is_depthwise(module) else ("reader", "")
        if isinstance(module, nn.Linear):
            if type(module) is not nn.Linear:
                return "unknown", "a Linear subclass"
            if not self._fits(source, -1):
                return "unknown", "it reads the last dim of a tensor whose channels lie in dim 1"
            return "reader", ""
        if len(inputs) == 1 and _is_flatten(node, module) and rank > 2 and not across:
            return "flatten", ""
        elementwise = isinstance(module, _ELEMENTWISE_MODULES) or op in _ELEMENTWISE_FUNCTIONS or \
            _dropout_training(node) is False
        if len(inputs) == 1 and elementwise and self.shapes[source] == self.shapes[node]:
            return "elementwise", ""
        # 2-D pools read a 3-D tensor as one unbatched (C, H, W) sample: its dim 1 would be pooled as H.
        batched = rank in (2, 3) if isinstance(module, nn.BatchNorm1d) else rank == 4
        if len(inputs) == 1 and (isinstance(module, _CHANNELS_FIRST_MODULES) or op in _CHANNELS_FIRST_FUNCTIONS) \
                and batched and self.shapes[source][:2] == self.shapes[node][:2] and not across:
            return "channels-first", ""
        if rank > 2 and self._reduction_axis(node, source) is not None:
            return "reduction", ""
        if rank > 2 and op in _REDUCTIONS and self.placed.get(self.root(source)) is None:
            return "unknown", ("a reduction of a tensor whose channel dim no op before it shows (e.g. the output of "
                               "a module torch.fx calls whole): over tokens or over channels")
        if self._cat_parts(node) is not None:
            return "cat", ""
        placed = {self.placed.get(self.root(s)) for s in inputs} - {None}
        roots = {self.root(s) for s in inputs}
        if inputs and op in _BINARY and len(placed) <= 1 and self._channel_wise(node, placed):
            if len(roots) > 1 and roots & self.segments.keys():  # a joined space stays apart
                return "unknown", "it joins a concatenation with another space"
            return "binary", ""
        return "unknown", "an op shrinking does not handle"


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op in ("call_module", "call_method") else getattr(node.target, "__name__",
                                                                                       str(node.target))
