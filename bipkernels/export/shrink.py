"""export_shrunk: a physically smaller model, planned over the channel spaces of spaces.py."""

from __future__ import annotations

import reprlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .dense import carry_over, check_exportable, dense_copy, plain_layer
from .spaces import ChannelGraph, Recorder, group_view, is_depthwise, pads_with_zeros, zero_columns


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


@dataclass
class _Plan:
    """One space's decision: which channels stay, why each stays, and per channel its carrier (-1: none),
    the kept constant channel whose column takes its constant where a reader pads with zeros."""

    keep: torch.Tensor
    why: list[str]
    carriers: torch.Tensor


def _frozen(graph: ChannelGraph, nodes: list) -> list[str]:
    """Why a space keeps every channel (empty: it need not)."""
    reasons = sorted(set().union(*(graph.frozen.get(node, set()) for node in nodes)))
    if len({graph.channels(node) for node in nodes}) > 1:
        reasons.append("its tensors disagree on the number of channels")
    return reasons


def _plan(graph: ChannelGraph, nodes: list, readers: list, frozen: list[str]) -> _Plan:
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
        module = graph.readers[reader]
        zero = zero_columns(module, graph.channels(source))[columns]
        constant, value = graph.constants(source)[columns], graph.value(source)[columns]
        free = zero | constant & ((value == 0) | (not pads_with_zeros(module)))
        # A grouped reader would need a carrier inside each group: its constants behind padding stay.
        stays = ~free if getattr(module, "groups", 1) > 1 else ~free & ~constant
        for c in (stays & ~needed).nonzero().flatten().tolist():
            why[c] = f"its constant value meets the zero padding of {reader.target}, a grouped convolution" \
                if constant[c] else f"{reader.target} reads it and it varies with the input"
        needed |= stays
        if (~free & ~stays).any():
            carried[source, offset] = carried.get((source, offset), torch.zeros_like(needed)) | ~free & ~stays
            for c in (~free & ~stays).nonzero().flatten().tolist():
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


def _live_groups(keeps: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Per group of a grouped convolution, (groups,) bool: whether the group stays, given ``keeps``, the
    keep masks (channels,) of its input and output spaces. A group none of whose input channels and
    filters stay goes whole; a space that keeps every channel (also one whose tensors disagree on their
    number) keeps every group."""
    if any(keep.all() for keep in keeps):
        return torch.ones(groups, dtype=torch.bool, device=keeps[0].device)
    return torch.stack([keep.view(groups, -1).any(1) for keep in keeps]).any(0)


def _even_groups(graph: ChannelGraph, plans: dict) -> None:
    """Keeps more channels, in place in ``plans`` (by space root, joined spaces not yet built), until every
    grouped convolution keeps as many input channels and as many filters in each of its groups that stay
    (a Conv2d's groups are equal); a group goes whole where none of its input channels and filters stay
    (_live_groups). The lowest-numbered removable channels of a short group stay."""
    grouped = [(node, module.groups) for node, module in graph.readers.items() if getattr(module, "groups", 1) > 1]
    changed = True
    while changed:  # keeping a channel can unbalance another grouped layer of the same space, or keep a group
        changed = False
        for node, groups in grouped:
            sides = {what: [(plans[base], offset) for base, offset in graph.bases(root)] for what, root in
                     (("input channels", graph.root(node.all_input_nodes[0])), ("filters", graph.root(node)))}
            keeps = {what: torch.cat([plan.keep for plan, _ in segments]) for what, segments in sides.items()}
            live = _live_groups(list(keeps.values()), groups)
            for (what, segments), other in zip(sides.items(), reversed(sides)):  # other: the opposite side
                changed |= _keep_evenly(node.target, segments, keeps[what], live, other)


def _keep_evenly(target: str, segments: list, keep: torch.Tensor, live: torch.Tensor, other: str) -> bool:
    """Keeps, in place in the plans of ``segments`` ((plan, channel offset) of one space of the grouped
    convolution ``target``, whose keep mask (channels,) is ``keep``), the lowest-numbered removable
    channels of each group in ``live`` (groups,) that keeps fewer than another; whether any channel was
    added. A group that keeps none on this side is live for its ``other`` (the reason says so). Some group
    is live: every space keeps a channel (_plan)."""
    if keep.all():
        return False
    per_group = keep.view(len(live), -1)
    counts = per_group.sum(1)
    most = counts[live].max()
    short = (live & (counts < most)).nonzero().flatten().tolist()
    for group in short:
        why = f"{target} keeps as many channels in each of its groups"
        if counts[group] == 0:
            why += f"; its group {group} cannot go whole, some of its {other} stay"
        removed = (~per_group[group]).nonzero().flatten() + group * per_group.shape[1]
        for channel in removed[:int(most - counts[group])].tolist():
            plan, offset = next((plan, offset) for plan, offset in reversed(segments) if offset <= channel)
            plan.keep[channel - offset] = True
            plan.why[channel - offset] = why
    return bool(short)


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
def _shrunk_norm(norm, index: torch.Tensor) -> nn.Module:
    tensors = dict(norm.named_parameters(recurse=False)) | dict(norm.named_buffers(recurse=False))
    floating = [t for t in tensors.values() if t.is_floating_point()]
    factory = dict(device=floating[0].device, dtype=floating[0].dtype) if floating else {}
    new = type(norm)(len(index), norm.eps, norm.momentum, norm.affine, norm.track_running_stats, **factory)
    for name, tensor in tensors.items():  # num_batches_tracked is a 0-dim count
        getattr(new, name).copy_(tensor if tensor.dim() == 0 else tensor[index.to(tensor.device)])
    return new


@torch.no_grad()
def _shrink_reader(graph: ChannelGraph, node, plans: dict) -> nn.Module:
    """The reader at ``node`` without the removed rows and columns; the removed constant input channels
    folded into its bias, or behind zero padding into the carrier's column (sums in float64). A grouped
    convolution loses the groups that keep neither input channels nor filters, keeps as many of each in
    the others (_even_groups) and no carrier (_plan)."""
    module = graph.readers[node]
    source = node.all_input_nodes[0]
    plan_in, plan_out = plans[graph.root(source)], plans[graph.root(node)]
    channels = graph.channels(source)
    weight = group_view(module, channels)  # (groups, filters, channels, entries) per group
    groups, device = weight.shape[0], weight.device
    keep_in, keep_out = plan_in.keep.to(device), plan_out.keep.to(device)
    live = int(_live_groups([keep_in, keep_out], groups).sum())  # the others hold no kept row or column
    value = graph.value(source).to(device)
    fold = ~keep_in & graph.constants(source).to(device) & (value != 0) & ~zero_columns(module, channels).to(device)
    columns = keep_in.view(groups, -1).nonzero()[:, 1].view(live, -1)  # kept channels, each group's own
    kept = weight[keep_out.view(groups, -1)].view(live, -1, weight.shape[2], weight.shape[3])
    kept = kept.gather(2, columns[:, None, :, None].expand(-1, kept.shape[1], -1, kept.shape[3]))
    bias = None if module.bias is None else module.bias.detach()[keep_out].double()
    if fold.any() and pads_with_zeros(module):  # one group
        carriers = plan_in.carriers.to(device)[fold]
        merged = weight[0][keep_out][:, fold].double() * (value[fold] / value[carriers])[:, None]
        kept[0].index_add_(1, (keep_in.cumsum(0) - 1)[carriers], merged.to(kept.dtype))  # carriers among the kept
    elif fold.any():
        constants = torch.where(fold, value, 0.0).view(groups, 1, -1, 1)
        folded = (weight.double() * constants).sum((2, 3)).flatten()[keep_out]
        bias = folded if bias is None else bias + folded
    kept = kept.reshape((live * kept.shape[1], -1) + tuple(module.weight.shape[2:]))
    return plain_layer(module, kept, None if bias is None else bias.to(kept.dtype), live)


def export_shrunk(model: nn.Module, example_inputs, *, warn: bool = True) -> tuple[nn.Module, ShrinkReport]:
    """A physically smaller copy of ``model``: zero filters and zero input channels removed, with the
    batch norms, depthwise convolutions and next layers that share their channels.

    ``model``: masked (exported first, see export_dense) or plain with zeros; traced with torch.fx.
    ``example_inputs``: a tensor or a tuple of the forward's arguments, not empty, floating ones finite
    (their shapes matter; values are recorded once to read the constant outputs of pruned filters).
    Returns ``(smaller, report)``: ``smaller`` is the model's own class in eval mode and gives the masked
    model's eval-mode outputs up to float rounding (batch norms use their running statistics; fine-tuning
    it in train mode is a new model). A channel is removed only where that is exact:

    - residual streams (tensors joined by add) lose a channel only if every layer writing the stream
      has that filter at zero, or every layer reading it has that input channel at zero;
    - a pruned filter's output is a constant (its bias through batch norm and activation); it folds
      into the next layer's bias, or behind zero padding, into one kept carrier channel;
    - Linear layers on more than 2 dims (tokens: (B, T, C)) read and write channels in the last dim;
      an op that mixes that layout with channels in dim 1 keeps its tensors' channels (the first op in
      graph order to read a tensor decides its layout: a later reader of the other layout stays whole);
    - a torch.cat along the channels joins its inputs' channels end to end: a channel goes only if it
      can go from its own space and from every concatenation it is part of (DenseNet, Inception);
    - add/sub/mul broadcast over positions stay channel-wise (an SE block's scale times its input): a
      product is constant where both factors are, or where one is a zero constant;
    - a group of a grouped convolution goes whole (the layer has fewer groups) where all its input
      channels and filters can go; the other groups keep as many input channels and filters each (the
      lowest-numbered removable ones of a short group stay), and the layer keeps its input's nonzero
      constants behind zero padding (a carrier would be needed in each group);
    - a sum over positions keeps only zero constants (it scales them by the input's size); 2-D pools
      and batch norms only take batched inputs; dropout and torchvision's stochastic depth are the
      identity where their training argument is False (F.dropout's default is True);
    - tensors that reach the output or come from the input, layers called twice, in-place ops on
      tensors other ops read, and ops outside the known channel-wise set keep every channel; layers
      inside a module that torch.fx calls whole (torch.nn's, e.g. nn.TransformerEncoderLayer) or not
      called as modules stay whole.

    Removal repeats until nothing more goes (a filter that read only removed channels is zero after).
    ``report.kept`` lists each layer whose zero filters or channels stay in the smaller model and why
    (also a warning when ``warn``); ``report.shapes`` every module that shrank (first and last shape).
    A model with nothing to remove comes back as an unchanged copy. ValueError if torch.fx cannot trace
    the model, or if its trace computes other outputs than the forward on ``example_inputs`` (``x *= y``
    on a tensor another name still reads: torch.fx records a new tensor). RuntimeError if the smaller
    model's outputs there differ from the model's by more than rounding (2·√eps relative), a guard that
    no model should reach.
    """
    check_exportable("export_shrunk", model)
    meta = next((name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta), None)
    if meta is not None:
        raise ValueError(f"bipkernels.export_shrunk: {meta} is on the meta device: finding zero filters needs the "
                         "values (load the weights first)")
    if not isinstance(warn, bool):
        raise TypeError(f"bipkernels.export_shrunk: warn must be a bool, got {type(warn).__name__} {warn!r}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"bipkernels.export_shrunk: example_inputs must be a tensor or a tuple of the forward's "
                        f"arguments, got {type(example_inputs).__name__} {reprlib.repr(example_inputs)}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 0:
            raise ValueError(f"bipkernels.export_shrunk: example_inputs[{index}] is empty (shape "
                             f"{tuple(tensor.shape)}): the export is checked against the model's outputs on them")
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:  # the finiteness check below reads values
            raise ValueError(f"bipkernels.export_shrunk: example_inputs[{index}] is on the meta device: the constant "
                             "outputs of pruned filters are recorded from the values")
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            raise ValueError(f"bipkernels.export_shrunk: example_inputs[{index}] holds NaN or inf: a pruned filter's "
                             "constant output is recorded from them and folded into the next layer's bias, so every "
                             "output of the smaller model would carry it")
    dense = dense_copy("export_shrunk", model).eval()
    try:
        _outputs(dense, inputs)  # forked: a forward that draws random numbers leaves the caller's stream alone
    except Exception as error:  # the user's input, not a fault of the export: say so before tracing
        raise ValueError(f"bipkernels.export_shrunk: the model does not run on example_inputs "
                         f"({type(error).__name__}: {error})") from error
    report = ShrinkReport()
    while True:  # removing channels can zero more filters (those that read only removed channels)
        step = _shrink_once(dense, inputs, type(model).__name__)
        for name, (before, after) in step.shapes.items():
            report.shapes[name] = (report.shapes.get(name, (before,))[0], after)
        report.kept = step.kept  # the last round's: what the smaller model still holds
        if not step.shapes:
            break
    if warn and report.kept:
        warnings.warn("bipkernels.export_shrunk: zero filters or channels stay in:\n  "
                      + "\n  ".join(f"{name}: {why}" for name, why in report.kept.items()), stacklevel=2)
    return dense, report


def _shrink_once(dense: nn.Module, inputs: tuple, name: str) -> ShrinkReport:
    """One round of export_shrunk on ``dense`` (plain layers, eval mode), in place: every channel the
    analysis of its current weights lets go goes, and the report says what changed and what stays."""
    try:
        traced = fx.symbolic_trace(dense)
    except Exception as error:  # fx raises many types for untraceable Python
        raise ValueError(f"bipkernels.export_shrunk: torch.fx cannot trace {name} ({error}); "
                         "export_dense gives the same model without removing channels") from error
    expected = _outputs(dense, inputs)
    tolerance = max((_tolerance(tensor.dtype) for tensor in expected), default=0.0)
    recorder = Recorder(traced)
    if _difference(_outputs(recorder.run, inputs), expected) > tolerance:
        raise ValueError(f"bipkernels.export_shrunk: torch.fx's trace of {name} computes other outputs than "
                         "its forward on the example input: an augmented assignment to a tensor that is also read "
                         "elsewhere (x *= y, x += y: torch.fx records x * y, a new tensor) or other aliasing it "
                         "cannot see; export_dense gives the same model without removing channels")
    graph = ChannelGraph(traced, recorder)
    plans = _plans(graph)
    report = ShrinkReport()
    whole = {node.target: why for node, why in graph.whole.items()} | _untraced_layers(dense, traced)
    for layer, why in whole.items():
        zeros = _zero_parts(dense.get_submodule(layer))
        if zeros:
            report.kept[layer] = f"{zeros} ({why}: shrinking leaves it whole)"
    for node, module in graph.readers.items():
        source, plan_in = node.all_input_nodes[0], plans[graph.root(node.all_input_nodes[0])]
        zero = zero_columns(module, graph.channels(source))
        notes = _kept_notes("filter", graph.constant[node], plans[graph.root(node)]) + \
            _kept_notes("input channel", zero, plan_in)
        if graph.expansion[source] > 1:  # after a flatten a channel feeds several features
            features = (group_view(module, graph.channels(source))[0] == 0).all(0).cpu()
            partial = int((features & (plan_in.keep & ~zero)[:, None]).sum())
            if partial:
                notes.append(f"{partial} zero input feature{'s' if partial > 1 else ''} (each channel feeds "
                             f"{features.shape[1]} features; a channel goes only whole)")
        if not (plans[graph.root(node)].keep.all() and plan_in.keep.all()):
            _replace(dense, node.target, _shrink_reader(graph, node, plans), report)
        if notes:
            report.kept[node.target] = ", ".join(notes)
    for node, module in graph.members.items():
        plan = plans[graph.root(node)]
        notes = _kept_notes("filter", graph.zero_filters(module), plan) if is_depthwise(module) else []
        if notes:
            report.kept[node.target] = ", ".join(notes)
        if plan.keep.all():
            continue
        index = _index(plan.keep, graph.expansion[node])
        if is_depthwise(module):
            index = index.to(module.weight.device)
            bias = None if module.bias is None else module.bias.detach()[index]
            weight = module.weight.detach()[index]  # one group per kept channel
            _replace(dense, node.target, plain_layer(module, weight, bias, len(index)), report)
        else:
            _replace(dense, node.target, _shrunk_norm(module, index), report)
    # Each rule above is exact; this guards the whole against a model that breaks one unseen.
    difference = _difference(_outputs(dense, inputs), expected)
    if difference > tolerance:
        raise RuntimeError(f"bipkernels.export_shrunk: the smaller {name} gives other outputs than the model "
                           f"on the example input (relative difference {difference:.3g}): a bug, please report "
                           "it with the model; export_dense gives the same model without removing channels")
    return report


def _plans(graph: ChannelGraph) -> dict:
    """{space root: _Plan} of every space of ``graph``, joined ones included."""
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
    _even_groups(graph, plans)
    for root in graph.segments:
        plans[root] = _joined_plan([plans[base] for base, _ in graph.bases(root)])
    return plans


def _outputs(run, inputs: tuple) -> list[torch.Tensor]:
    """The output tensors of run(*inputs), flattened, drawn from one fixed random state: ops that draw
    random numbers in eval mode (F.dropout(x, p) defaults to training=True) draw the same in each run
    compared. The caller's random state (CPU, and CUDA where initialised) is left as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(0)
        out = run(*inputs)
    return [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def _tolerance(dtype: torch.dtype) -> float:
    """Relative rounding a shrunk model may add (folded constants change the order of sums), and a GPU's
    nondeterministic sums between two runs: 2·√eps (float32: 7e-4, float64: 3e-8)."""
    return 2 * torch.finfo(dtype).eps ** 0.5 if dtype.is_floating_point else 0.0


def _difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest |got − expected| / (1 + max |expected|) over the output tensors; inf where their number,
    shapes or NaN places differ, 0 for equal outputs."""
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, expected):
        a, b = a.detach().double(), b.detach().double()
        infinite = b.isinf()
        if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), infinite) and
                torch.equal(a[infinite], b[infinite])):
            return float("inf")
        regular = ~(infinite | b.isnan())
        if regular.any():
            worst = max(worst, (a[regular] - b[regular]).abs().max().item() / (1 + b[regular].abs().max().item()))
    return worst


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
    """'N zero filters, M zero input channels' of a Conv2d / Linear weight ('' if none; a grouped
    convolution's input channel is zero where its group's weights for it are)."""
    weight = module.weight.detach()
    counts = {"filter": int((weight.reshape(weight.shape[0], -1) == 0).all(1).sum()),
              "input channel": int(zero_columns(module, weight.shape[1] * getattr(module, "groups", 1)).sum())}
    return ", ".join(f"{n} zero {what}{'s' if n > 1 else ''}" for what, n in counts.items() if n)


def _replace(model: nn.Module, name: str, new: nn.Module, report: ShrinkReport) -> None:
    """``new`` in the place of the module ``name``, and under every other name of that module (an alias,
    such as self.head = self.layers[-1]: the trace names one of them)."""
    old = model.get_submodule(name)
    new = carry_over(old, new)
    for alias in [alias for alias, module in model.named_modules(remove_duplicate=False) if module is old]:
        model.set_submodule(alias, new)
    report.shapes[name] = (_channels_shape(old), _channels_shape(new))


def _channels_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape (a batch norm without affine parameters: its running mean's)."""
    tensor = module.weight if getattr(module, "weight", None) is not None else module.running_mean
    return tuple(tensor.shape) if tensor is not None else (module.num_features,)
