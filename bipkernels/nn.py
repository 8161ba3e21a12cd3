"""Masked layers, model conversion and the projection to exactly k kept blocks.

A masked layer holds ``weight`` (θ), ``scores`` (s, initialised from |θ|) and a ``threshold`` buffer
(float64 (value, cut), see bipkernels.reference). Its forward uses θ ⊙ m with m recomputed from s, and
its backward gives both levels' gradients in one fused pass:

    weight.grad = m ⊙ g          scores.grad = sign(s) ⊙ (θ ⊙ g − inv_gamma · I)

with g the gradient of the effective weight and I the implicit term (``implicit="paper"``: m ⊙ g ⊙ g,
``"released"``: (θ ⊙ g)²). The mask ranks |s|, so the straight-through gradient carries sign(s) (-1 for
s < 0, else +1): a score that a step took below zero still moves its magnitude the way the loss asks.
``inv_gamma`` (default 0: the straight-through score gradient) and ``implicit`` are plain attributes that
the solver sets.

NaN and ±inf, on every backend:

- A block whose score is NaN is never kept (the top-k keeps min(k, non-NaN blocks); IMP pins pruned
  blocks this way). A block score of +inf (a block reduces |s|, so any ±inf score in it, and no NaN)
  ranks above every finite one: infinite blocks are kept first, among themselves lowest index first.
- A pruned weight contributes exactly 0 to the forward output, to the input's gradient and to
  ``weight.grad``, even where it is NaN or ±inf: the mask is applied by a select, not a multiply.
- ``scores.grad`` is not masked (its direct term θ ⊙ g is what lets a pruned block come back), so a
  non-finite pruned weight makes the score gradient non-finite there.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from . import autograd, ops, reference
from .fx_reads import weights_read_directly
from .reference import score_dtype
from .structures import Structure, parse_structure

SCOPES = ("global", "layer")


def keep_all_threshold(device=None) -> torch.Tensor:
    """The threshold (-inf, +inf): every non-NaN score is kept."""
    return torch.tensor([float("-inf"), float("inf")], dtype=torch.float64, device=device)


class _Recompute(NamedTuple):
    """Where a saved view of θ ⊙ m lies in a recomputed θ ⊙ m."""
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int


def _masked_weight_laid_out(inputs: tuple) -> torch.Tensor:
    """autograd.masked_weight(*inputs) in the memory format of the weight (inputs[0]): a channels_last
    (out, in / groups, kh, kw) weight gives a channels_last θ ⊙ m, other weights their op's result as it is.

    The ops give structured masks' results contiguous (their blocks are in logical order), and a convolution
    picks its algorithm, its output's layout and so the last bits of its values from the weight's layout
    as well as the input's: nn.Conv2d with a channels_last weight and a contiguous input gives a
    channels_last output, and the masked layer must give the same (one copy of the weight where the op's
    result is contiguous). Not under torch.func transforms: a vmapped weight cannot say whether it is
    channels_last (functorch raises), and their results carry no layout of their own.
    """
    masked = autograd.masked_weight(*inputs)
    weight = inputs[0]
    if (weight.dim() == 4 and not torch._C._are_functorch_transforms_active() and not weight.is_contiguous()
            and weight.is_contiguous(memory_format=torch.channels_last)):
        return masked.contiguous(memory_format=torch.channels_last)
    return masked


# The attributes _init_mask gives a masked layer beside the torch layer's: an export leaves them.
MASKED_SETTINGS = ("structure", "inv_gamma", "implicit")


class _Masked:
    """What MaskedConv2d and MaskedLinear share; mixed in before the torch layer."""

    weight: nn.Parameter

    def _init_mask(self, structure: Structure) -> None:
        try:
            structure.check_shape(self.weight.shape, "weight")
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self.structure = structure
        self.scores = nn.Parameter(self.weight.detach().abs().clone())
        self.register_buffer("threshold", keep_all_threshold(self.weight.device))
        self.inv_gamma = 0.0
        self.implicit = "paper"

    def __setattr__(self, name: str, value) -> None:
        # Scores of another kind (class indices, counts) would otherwise fail later, inside an op that cannot
        # say which layer's they are.
        if name == "scores" and isinstance(value, torch.Tensor) and value.dtype not in ops._FLOATING:
            raise TypeError(f"{type(self).__name__}: scores must be float32, float64, float16 or bfloat16, got "
                            f"{value.dtype}")
        super().__setattr__(name, value)

    def reset_parameters(self) -> None:
        """The torch layer's initialisation of weight and bias, then scores |θ| and the keep-all threshold, as
        a new layer starts (to_empty, then reset_parameters, is deferred initialisation)."""
        super().reset_parameters()
        if "scores" in self._parameters:  # not yet while the torch layer's constructor calls this
            with torch.no_grad():
                self.scores.copy_(self.weight.abs())
                self.threshold.copy_(keep_all_threshold())

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before it compiles any, and puts what it returns in
        # the model's place: a plain twin would change the user's model, so the error says what to script.
        raise TypeError(self._not_torchscript("torch.jit.script"))

    def _not_torchscript(self, how: str) -> str:
        return (f"{how} of {self!r}: its forward runs Python that TorchScript cannot hold (the fused autograd "
                "Function, the choice of backend); script or trace bipkernels.export_dense(model) instead (plain "
                "layers holding θ ⊙ m, the deployment form), or torch.export.export the model")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The torch layer's output with θ ⊙ m for its weight: (N, C_in, H, W) -> (N, C_out, H', W') for a
        convolution (or unbatched, without N), (..., in) -> (..., out) for a linear layer."""
        if isinstance(input, fx.Proxy):
            return self._traced_call(input)
        if torch.jit.is_tracing():
            # The graph would hold a Python call it cannot save (and its check fails on the forward's two code
            # paths) instead of saying so.
            raise TypeError(self._not_torchscript("torch.jit.trace"))
        return self._masked_forward(input)

    def _traced_call(self, input: fx.Proxy) -> fx.Proxy:
        """Under torch.fx.symbolic_trace: the graph node ``masked_layer(layer, input)``, the layer a get_attr
        node (a trace hands a module argument so): one call per masked layer.

        The graph then runs the layer's forward as it runs eagerly (backend choice, fused kernels and
        backward, saved-tensor hooks, inv_gamma and implicit read at each call), where tracing through it
        would meet its Python choices on proxies. Not a call_module node: the GraphModule would call the
        layer, running its hooks, which the trace has already recorded around this node (as for any module
        it traces through). TypeError for a bare masked layer traced as the root: a graph cannot take its
        own root as an attribute.
        """
        if input.tracer.root is self:
            raise TypeError(f"torch.fx.symbolic_trace of a bare {type(self).__name__}: a masked layer traces as one "
                            "call of bipkernels.nn.masked_layer on the layer, which the graph takes from the model "
                            "holding it; trace a model holding it (nn.Sequential(layer))")
        return masked_layer(self, input)  # fx.wrap'd: a trace records the call

    def _masked_weight_inputs(self) -> tuple:
        return self.weight, self.scores, self.threshold, self.structure, self.inv_gamma, self.implicit

    def masked_weight(self) -> torch.Tensor:
        """θ ⊙ m in the weight's memory format, differentiable with respect to both ``weight`` and ``scores``."""
        return _masked_weight_laid_out(self._masked_weight_inputs())

    def _with_masked_weight(self, function, input: torch.Tensor) -> torch.Tensor:
        """function(input, θ ⊙ m, bias), keeping no θ ⊙ m for the backward.

        The convolution or matmul would save θ ⊙ m (or a view of it) for its backward: one more
        weight-sized tensor per layer, alive from the forward to the backward, on top of the scores and
        their momentum. Saved-tensor hooks save a note instead and recompute θ ⊙ m from θ, the scores and
        the threshold when the backward asks (one more masked_weight per layer). θ, the scores and the
        threshold must not change in place between the two, as autograd requires of saved tensors.
        Compiled graphs choose what to save themselves, tensor subclasses (fake tensors of a trace,
        quantised types) and torch.func transforms (their wrapped tensors have no storage) keep autograd's
        default, and so does a forward under the caller's own saved-tensor hooks (activation
        checkpointing, offloading): inner hooks would replace them, or where the caller turned such hooks
        off (torch.autograd.graph.disable_saved_tensors_hooks raises on any). The backward recomputes from the
        forward's own tensors and settings, not from the layer's at that time (torch.func.functional_call
        swaps them in for the forward only).
        """
        inputs = self._masked_weight_inputs()
        masked = _masked_weight_laid_out(inputs)
        if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or type(masked) is not torch.Tensor
                or torch._C._are_functorch_transforms_active()
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
                or not torch._C._autograd._saved_tensors_hooks_is_enabled()):
            return function(input, masked, self.bias)
        sources = inputs[:3]
        versions = [source._version for source in sources]
        # pack lives as long as what it saved: it must not hold θ ⊙ m itself.
        device, storage = masked.device, masked.untyped_storage().data_ptr()

        def pack(tensor):
            if (type(tensor) is torch.Tensor and tensor.layout == torch.strided and tensor.device == device
                    and tensor.untyped_storage().data_ptr() == storage):
                return _Recompute(tensor.size(), tensor.stride(), tensor.storage_offset())
            return tensor

        def unpack(saved):
            if not isinstance(saved, _Recompute):
                return saved
            if [source._version for source in sources] != versions:
                raise RuntimeError(f"{type(self).__name__}: weight, scores or threshold changed in place between "
                                   "the forward and the backward, so θ ⊙ m cannot be recomputed (a second backward "
                                   "through a BiP step with step_scores_in_backward=True does this)")
            return _masked_weight_laid_out(inputs).as_strided(saved.size, saved.stride, saved.storage_offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return function(input, masked, self.bias)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The current bool mask, shaped like ``weight``."""
        return ops.block_mask(self.scores, self.threshold, self.structure)

    @torch.no_grad()
    def block_scores(self) -> torch.Tensor:
        return ops.block_scores(self.scores, self.structure)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A plain nn.Conv2d / nn.Linear state has no scores or threshold: start from |θ| and keep-all. A
        # masked layer's state that lacks only its scores is not plain: its threshold cuts trained scores,
        # not |θ|.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and prefix + "scores" not in state_dict and prefix + "threshold" not in state_dict:
            state_dict[prefix + "scores"] = weight.detach().abs()
            # On the weight's device: a layer built on the meta device takes it with assign=True.
            state_dict[prefix + "threshold"] = keep_all_threshold(weight.device)
            state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        scores, threshold = state_dict.get(prefix + "scores"), state_dict.get(prefix + "threshold")
        saved = state_dict.get(prefix + "_extra_state")
        structure = Structure(*saved["structure"]) if isinstance(saved, dict) and "structure" in saved else \
            self.structure
        if (scores is None) != (threshold is None) and structure.uses_threshold:
            # A threshold cuts the scores it was projected from: either alone, beside the layer's own other half
            # (which strict=False would keep), makes a mask of another count. Raised whatever ``strict`` (torch
            # passes True here and sorts missing keys out later); nothing of the layer is copied.
            present, absent = ("threshold", "scores") if scores is None else ("scores", "threshold")
            missing_keys.append(prefix + absent)
            error_msgs.append(f"While loading \"{prefix}{present}\" without \"{prefix}{absent}\": "
                              f"{type(self).__name__}'s mask is its scores cut by its threshold, which go together; "
                              "load both, or neither (a plain layer's state: scores |θ|, keep-all).")
            return
        if isinstance(scores, torch.Tensor) and not scores.is_floating_point():  # nothing of the layer copied
            error_msgs.append(f"While copying the parameter named \"{prefix}scores\", {type(self).__name__}'s scores "
                              f"must be float32, float64, float16 or bfloat16, got {scores.dtype}.")
            return
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Scores saved in another dtype are rounded (or widened) on their way in, as by .half() (_apply).
        if (isinstance(scores, torch.Tensor) and isinstance(threshold, torch.Tensor) and len(error_msgs) == errors
                and scores.dtype != self.scores.dtype):
            self._keep_kept_count(scores, threshold)

    # The structure travels with the state: a threshold means nothing under another structure.
    def get_extra_state(self) -> dict:
        return {"structure": (self.structure.kind, self.structure.a, self.structure.b, self.structure.p)}

    def set_extra_state(self, state: dict) -> None:
        self.structure = Structure(*state["structure"])

    def _apply(self, fn, recurse=True):
        # The threshold must stay float64 (its cut is an exact index) whatever dtype the layer moves to;
        # ``fn`` still reaches it (share_memory, a move). Its device is the scores': reading self.weight
        # would run a parametrization (a power iteration) or find torch.nn.utils.prune's unmoved copy.
        threshold = self._buffers.pop("threshold")
        scores = self.scores.detach()  # the values before a dtype change rounds them
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._buffers["threshold"] = threshold
        if threshold.is_meta:  # no values to move (to_empty): keep-all, as a new layer starts
            self._buffers["threshold"] = keep_all_threshold(self.scores.device)
        else:
            moved = fn(threshold)
            self._buffers["threshold"] = moved if moved.dtype == torch.float64 else threshold.to(moved.device)
        if self.scores.dtype != scores.dtype:
            self._keep_kept_count(scores, threshold)
        return result

    @torch.no_grad()
    def _keep_kept_count(self, scores: torch.Tensor, threshold: torch.Tensor) -> None:
        """After a dtype change (or a load) turned ``scores`` into ``self.scores``: where ``threshold`` no longer keeps
        the blocks it kept, re-project this layer to as many blocks as it kept, the top ones of the new
        scores (ties to the lowest index).

        Rounding to a half type moves scores across the threshold's value (thousands of float32 scores
        share one bfloat16 value) or into ties that its cut splits otherwise, and float64 block sums rank
        against a threshold that is a float32 sum: .half() or .double() of a pruned model kept another
        count. N:M layers (no threshold), scores on the meta device and empty layers are left as they are.
        """
        if not self.structure.uses_threshold or scores.is_meta or self.scores.is_meta or not scores.numel():
            return
        before = reference.kept_blocks(ops.block_scores(scores, self.structure), threshold)
        rounded = ops.block_scores(self.scores, self.structure)
        if torch.equal(reference.kept_blocks(rounded, self.threshold), before.to(rounded.device)):
            return
        self.threshold.copy_(ops.topk_threshold(rounded, int(before.sum())))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure}"


def _constructor_checks(layer: str, structure, dtype) -> Structure:
    """The parsed ``structure``, once ``dtype`` is known to be a floating type (the torch layer's own
    initialisation would fail on an integer type with an error that does not say so)."""
    if dtype is not None and dtype not in ops._FLOATING:
        raise TypeError(f"{layer}: dtype must be float32, float64, float16 or bfloat16, got {dtype!r}")
    return parse_structure(structure, owner=layer)


def check_module(owner: str, model) -> None:
    """TypeError naming ``owner`` (the function called) unless ``model`` is a torch.nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__} {model!r}")


def _check_model(op: str, model) -> None:
    check_module(f"bipkernels.{op}", model)


class MaskedConv2d(_Masked, nn.Conv2d):
    """nn.Conv2d with a learned mask; the same constructor arguments plus ``structure``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, *, structure="unstructured"):
        parsed = _constructor_checks("MaskedConv2d", structure, dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        self._init_mask(parsed)

    def _masked_forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._with_masked_weight(self._conv_forward, input)


class MaskedLinear(_Masked, nn.Linear):
    """nn.Linear with a learned mask; the same constructor arguments plus ``structure``."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, structure="unstructured"):
        parsed = _constructor_checks("MaskedLinear", structure, dtype)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_mask(parsed)
        # An nn.TransformerEncoderLayer's inference fast path (eval, no grad) hands linear1/linear2.weight
        # (θ, unmasked) straight to one fused kernel, skipping their forward, unless a submodule has a hook.
        self.register_forward_pre_hook(_keep_forward)

    def _masked_forward(self, input: torch.Tensor) -> torch.Tensor:
        if ops.masked_linear_fused(input, self.weight):  # the mask applied inside the matmuls (triton)
            return autograd.masked_linear(input, self.weight, self.bias, self.scores, self.threshold, self.structure,
                                          self.inv_gamma, self.implicit)
        return self._with_masked_weight(F.linear, input)


MASKED_LAYERS = (MaskedConv2d, MaskedLinear)


# Wrapped for torch.fx (a trace records a call of it, not what it runs) wherever a trace meets it: in a
# masked layer's forward, and in the code of a GraphModule traced again (which unpickling one does).
@fx.wrap
def masked_layer(layer: _Masked, input: torch.Tensor) -> torch.Tensor:
    """``layer``'s forward on ``input`` without its hooks: what a torch.fx graph of a model holding masked
    layers calls for each of them (see _Masked._traced_call; the trace records the hooks around it)."""
    return layer._masked_forward(input)


def masked_layers(model: nn.Module) -> list[tuple[str, _Masked]]:
    """A list of (name, layer), one per masked layer of ``model``, in module order (the global tie order);
    empty for a model without one. A list, not named_modules' generator: a snapshot, which stays valid
    while the caller swaps or converts layers of the model, and which can be counted and tested for
    emptiness."""
    _check_model("masked_layers", model)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MASKED_LAYERS)]


def ranked_layers(model: nn.Module) -> list[tuple[str, _Masked]]:
    """The masked layers that a projection ranks: those with a threshold (not N:M, which keeps N of M by
    itself) and with weights. A layer with a zero-size dimension is left out: its blocks hold nothing yet
    would count towards k (Linear(0, 4) has four empty filters)."""
    return [(name, layer) for name, layer in masked_layers(model)
            if layer.structure.uses_threshold and layer.weight.numel()]


def unmasked_layers(model: nn.Module) -> dict[str, str]:
    """{name: type name} of every module that owns a weight of 2+ dimensions (a matrix or a kernel; a
    parameter not named weight counts with 2+ dimensions of size > 1: a per-channel scale shaped
    (C, 1, 1) or a (1, 1, C) token does not) and is not masked: what pruning leaves dense. For example
    nn.MultiheadAttention (its raw in_proj_weight), its out_proj (a Linear subclass that attention reads
    directly, never through its forward, so a mask there would be silently ignored), nn.Embedding,
    nn.Conv1d, and layers excluded from ``convert``. Norms and biases (1-D) are not listed. Empty when
    every such weight is masked."""
    _check_model("unmasked_layers", model)
    # A masked layer's weight parametrized (weight_norm) lies in its parametrizations, which the mask
    # covers; other modules inside a masked layer (an adapter) are its own.
    inside_masked = {id(child) for layer in model.modules() if isinstance(layer, MASKED_LAYERS)
                     and hasattr(layer, "parametrizations") for child in layer.parametrizations.modules()}
    return {name: type(module).__name__ for name, module in model.named_modules()
            if not isinstance(module, MASKED_LAYERS) and id(module) not in inside_masked and any(
                p.dim() >= 2 if key == "weight" else sum(size > 1 for size in p.shape) >= 2
                for key, p in module.named_parameters(recurse=False))}


# Module hooks travel with the layer: the twin takes over these dicts themselves, so the handles that
# registered them still remove them.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _masked_copy(layer: nn.Module, structure: Structure) -> nn.Module:
    """The masked twin of a plain nn.Conv2d / nn.Linear, holding the layer's own Parameter objects (so weight
    ties, requires_grad and optimisers built on them survive), its hooks and training mode; scores |θ| and
    the keep-all threshold. Built on the meta device: nothing is allocated for weights that are replaced."""
    weight = layer.weight
    factory = dict(device="meta", dtype=weight.dtype, structure=structure)
    if type(layer) is nn.Conv2d:
        masked = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory)
    else:
        masked = MaskedLinear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    masked.weight, masked.bias = weight, layer.bias
    masked.scores = nn.Parameter(weight.detach().abs().clone())
    masked.threshold = keep_all_threshold(weight.device)
    for hooks in _HOOK_DICTS:
        if hasattr(layer, hooks):
            setattr(masked, hooks, getattr(layer, hooks))
    masked._is_full_backward_hook = getattr(layer, "_is_full_backward_hook", None)
    taken = carry_attributes(layer, masked)
    if taken:
        warnings.warn(f"bipkernels.convert: the attributes {taken} of a {type(layer).__name__} are not carried "
                      "over to its masked twin, which uses those names itself", stacklevel=3)
    return masked.train(layer.training)


def carry_attributes(old: nn.Module, new: nn.Module, memo: dict | None = None) -> list[str]:
    """``new`` (in place) takes the user's own attributes of ``old``: a tag, a flag, a gain that a hook
    reads (a reference to ``old`` itself becomes one to ``new``), the same objects, or deep copies made
    through ``memo`` (a copy of the model's, which maps ``old`` to ``new``). Not torch's (underscored, or
    settings that ``new`` holds too), nor what is bound to ``old`` (its compiled call, a forward wrapped by
    accelerate's hooks), nor a masked layer's settings (MASKED_SETTINGS). Returns the names left out
    because ``new``'s class, parameters or buffers use them (sorted), for the caller to warn of."""
    settings = MASKED_SETTINGS if isinstance(old, _Masked) else ()
    own = {name: value for name, value in vars(old).items()
           if not name.startswith("_") and name not in vars(new) and name not in settings
           and name != "forward" and getattr(value, "__self__", None) is not old}
    taken = sorted(name for name in own if hasattr(type(new), name) or name in new._parameters
                   or name in new._buffers)
    for name, value in own.items():
        if name not in taken:  # as the layer held it (setattr would register a module)
            new.__dict__[name] = new if value is old else value if memo is None else copy.deepcopy(value, memo)
    return taken


def warn_emptied(owner: str, emptied: list[str]) -> None:
    """Warns, for ``owner`` (the function that projected), that a global projection keeps no block of the
    layers named in ``emptied`` (nothing when it is empty)."""
    if emptied:
        warnings.warn(f"{owner}: the global projection keeps no block of {', '.join(emptied)}: blocks rank by their "
                      "sums of |s| across layers, so a layer of small blocks (few weights per block, or small "
                      "weights) can lose all of them and cut the network; scope='layer' keeps the fraction in every "
                      "layer", stacklevel=3)


def nm_sparsity_ignored(op: str, structure: Structure, sparsity: float) -> str | None:
    """The warning, naming ``op``, where layers of an N:M ``structure`` are pruned at a ``sparsity`` other than
    their own 1 − N/M, which they keep whatever the sparsity asked; None for another structure or that
    sparsity. Sparsity 0 is asked too (prune's target); convert, where it sets no sparsity, does not ask."""
    if structure.kind != "nm" or math.isclose(sparsity, 1 - structure.a / structure.b):
        return None
    return (f"{op}: structure {structure} keeps {structure.a} of every {structure.b} weights (sparsity "
            f"{1 - structure.a / structure.b:g}) whatever the sparsity asked ({sparsity:g}): the sparsity asked "
            "applies to the model's layers of other structures only")


def convert(model: nn.Module, sparsity: float = 0.0, structure: str | Structure | None = None,
            scope: str = "global", exclude=()) -> nn.Module:
    """Swap every nn.Conv2d and nn.Linear of ``model`` (in place) for its masked twin and prune it.

    Weights, biases, device, dtype and training mode are kept; scores start as |θ|; the thresholds are then
    set so that exactly keep_count(blocks, sparsity) blocks are kept (see ``project``). ``structure``
    (None: unstructured) is the new layers'; layers already masked keep theirs (a warning names those
    whose structure differs from one given). ``exclude`` names
    modules (qualified names, a str for one) to leave dense, each with everything inside it. Subclasses of
    Conv2d / Linear (e.g. attention's output projection), attention's raw projection weights and other
    layer types stay dense, and a warning lists them (``unmasked_layers``, less the excluded ones).
    Grouped and depthwise convolutions are converted (their weight is (out, in / groups, kh, kw): a
    channel block is an input channel of every group). Every MaskedLinear has a no-op forward pre-hook,
    which keeps an nn.TransformerEncoderLayer holding one off its inference fast path (that path reads
    linear1/linear2.weight directly, unmasked); the plain nn.Linear it replaces holds it too, since the
    twin takes over its hook dicts (so that their handles keep working). torch.fx.symbolic_trace of the
    converted model shows each masked layer as one call ``masked_layer(layer, input)`` (the layer a get_attr
    node), which runs the layer's own forward and fused backward. Returns ``model``; a bare
    nn.Conv2d / nn.Linear cannot be swapped in place, so for one the masked twin is returned (holding the
    same Parameter objects): assign the result.

    Every argument is checked before the model is touched: a bad one (or a structure that does not fit
    one of the layers, named in the error) leaves ``model`` as it was.
    """
    op = "bipkernels.convert"
    _check_model("convert", model)
    ops.check_sparsity(sparsity, op)
    if scope not in SCOPES:
        raise ValueError(f"{op}: scope must be one of {SCOPES}, got {scope!r}")
    parsed = parse_structure("unstructured" if structure is None else structure, owner=op)
    lazy = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
            if nn.parameter.is_lazy(tensor)]
    if lazy:
        raise ValueError(f"{op}: {lazy} are not initialised yet (a lazy module's): run one forward pass first, so "
                         "that their shapes are known")
    if type(model) in (nn.Conv2d, nn.Linear):
        if isinstance(exclude, str) or exclude:
            raise ValueError(f"{op}: exclude names modules inside the model, but a bare {type(model).__name__} holds "
                             f"none: {exclude!r}")
        return convert(_BareLayer({"layer": model}), sparsity, structure, scope, exclude)["layer"]
    excluded = _excluded(model, exclude)
    other_structures = {} if structure is None else \
        {name: layer.structure for name, layer in masked_layers(model) if layer.structure != parsed
         and name not in excluded}
    # Every place a layer sits, shared layers included (one object under two names or two parents gets one
    # masked twin, set in every place), unless one of its names is excluded.
    places, names = {}, {}  # (parent, name in it): the place; id(child): every qualified name of the child
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                places[id(parent), child_name] = (parent, child_name, child)
                names.setdefault(id(child), []).append(f"{parent_name}.{child_name}" if parent_name else child_name)
    kept_dense = {key for key, qualified in names.items() if excluded.intersection(qualified)}
    candidates = [(parent, child_name, child) for parent, child_name, child in places.values()
                  if type(child) in (nn.Conv2d, nn.Linear) and id(child) not in kept_dense]
    read_directly = weights_read_directly(model, {id(child) for _, _, child in candidates}, MASKED_LAYERS)
    swaps = [place for place in candidates if id(place[2]) not in read_directly]
    for parent, child_name, child in swaps:
        qualified = names[id(child)][0]
        if "weight" not in child._parameters:
            raise ValueError(f"{op}: layer {qualified!r} ({type(child).__name__}) computes its weight from "
                             f"{sorted(child._parameters)} (torch.nn.utils.prune or weight_norm): make it a plain "
                             "parameter first (torch.nn.utils.prune.remove(layer, 'weight') keeps the zeros)")
        extra = sorted({*child._parameters, *child._buffers, *child._modules} - {"weight", "bias"})
        if extra:  # the masked twin has no place for them
            raise ValueError(f"{op}: layer {qualified!r} ({type(child).__name__}) carries {extra} beside its weight "
                             "and bias: exclude it, or move them to a module of their own")
        if child.weight.dtype not in ops._FLOATING:
            raise TypeError(f"{op}: layer {qualified!r} ({type(child).__name__}) has weights of dtype "
                            f"{child.weight.dtype}; masked layers are float32, float64, float16 or bfloat16: "
                            "exclude it")
        try:
            parsed.check_shape(child.weight.shape, "weight")
        except ValueError as error:
            raise ValueError(f"{op}: layer {qualified!r} ({type(child).__name__}): {error}") from None
    tied = {}
    for _, _, child in swaps:
        tied.setdefault(id(child.weight), {})[id(child)] = names[id(child)][0]
    tied = [sorted(layers.values()) for layers in tied.values() if len(layers) > 1]
    if tied:
        warnings.warn(f"{op}: {'; '.join(' and '.join(layers) for layers in tied)} share one weight: each gets its "
                      "own scores and mask, and the weight counts once per layer", stacklevel=2)
    if scope == "global":
        _check_one_ranking_dtype(op, [(name, layer.scores.dtype) for name, layer in ranked_layers(model)] +
                                 [(names[id(child)][0], child.weight.dtype) for _, _, child in swaps
                                  if parsed.uses_threshold and child.weight.numel()])
    # A model built on the meta device has no values to rank: it is converted keeping everything, to be
    # projected once its weights are loaded (a plain state_dict loads into the masked layers).
    meta = any(child.weight.is_meta for _, _, child in swaps) or \
        any(layer.scores.is_meta for _, layer in masked_layers(model))
    if meta and sparsity > 0:
        raise ValueError(f"{op}: the model's weights are on the meta device, with no values to rank: convert at "
                         f"sparsity 0, load the weights, then call bipkernels.project(model, {sparsity})")
    if other_structures:
        warnings.warn(f"{op}: layers already masked keep their structure, not {parsed}: "
                      f"{', '.join(f'{name} ({kept})' for name, kept in other_structures.items())}; convert swaps "
                      "plain layers only (export_dense, then convert, to change a layer's structure)", stacklevel=2)
    nm_layers = swaps or any(layer.structure == parsed for _, layer in masked_layers(model))
    ignored = nm_sparsity_ignored(op, parsed, sparsity) if sparsity else None  # 0: convert asks no sparsity
    if nm_layers and ignored:
        warnings.warn(ignored, stacklevel=2)
    already = [] if meta else list(masks(model).items())
    twins = {}
    try:
        for parent, child_name, child in swaps:
            if id(child) not in twins:
                twins[id(child)] = _masked_copy(child, parsed)
            setattr(parent, child_name, twins[id(child)])
        if not meta and masked_layers(model):
            project(model, sparsity, scope)
    except BaseException:  # leave the model as it was
        for parent, child_name, child in swaps:
            setattr(parent, child_name, child)
        raise
    # A twin took the plain layer's hook dicts in place of its own, which held MaskedLinear's _keep_forward.
    # (Registered last: those dicts are the plain layer's, which a failed convert leaves as it was.)
    for twin in twins.values():
        if isinstance(twin, MaskedLinear):
            twin.register_forward_pre_hook(_keep_forward)
    after = masks(model) if already or (scope == "global" and sparsity < 1 and not meta) else {}
    changed = [name for name, mask in already if not torch.equal(after[name], mask)]
    if changed:
        warnings.warn(f"bipkernels.convert: the masks of the layers already masked changed ({', '.join(changed)}): "
                      f"convert projects every masked layer of the model to sparsity {sparsity}; to add layers to "
                      "a pruned model and keep its masks, convert the new part alone", stacklevel=2)
    if scope == "global" and sparsity < 1:
        warn_emptied(op, [_shown(model, name) for name, _ in ranked_layers(model)
                          if name in after and not after[name].any()])
    if scope == "layer" and sparsity > 0 and not meta:
        whole = [_shown(model, name) for name, layer in ranked_layers(model) if layer.mask().all()]
        if whole:
            warnings.warn(f"{op}: scope='layer' prunes nothing of {', '.join(whole)}: too few blocks of their "
                          f"structure to drop one at sparsity {sparsity:g} (a depthwise convolution has one channel "
                          "block)", stacklevel=2)
    skipped = [f"{name or 'the model itself'} ({kind})" for name, kind in unmasked_layers(model).items()
               if name not in excluded and id(model.get_submodule(name)) not in kept_dense | read_directly]
    if skipped:
        warnings.warn("bipkernels.convert: left dense (not handled): " + ", ".join(skipped), stacklevel=2)
    if not masked_layers(model):
        warnings.warn("bipkernels.convert: nothing to mask: the model holds no nn.Conv2d or nn.Linear that convert "
                      "handles (outside exclude)", stacklevel=2)
    if read_directly:
        direct = [names[key][0] for key in read_directly]
        warnings.warn(f"bipkernels.convert: left dense, as the model reads their weights directly, not through "
                      f"their forward (a mask would not apply): {', '.join(sorted(direct))}", stacklevel=2)
    return model


class _BareLayer(nn.ModuleDict):
    """The holder in which convert swaps a bare nn.Conv2d / nn.Linear (which has no parent to swap it in)."""


def _shown(model: nn.Module, name: str) -> str:
    """A layer's name as convert's warnings give it: a bare layer's holder is not the user's."""
    return "the layer itself" if isinstance(model, _BareLayer) else name


def _keep_forward(module: nn.Module, args) -> None:
    """A forward pre-hook that changes nothing: it keeps a parent's fused fast path from bypassing the
    masked layer's forward (see convert)."""


def _excluded(model: nn.Module, exclude) -> set[str]:
    """The qualified names of the modules in ``exclude`` and of every module inside them; ValueError for a
    name that is no module of ``model``."""
    names = (exclude,) if isinstance(exclude, str) else exclude
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"bipkernels.convert: exclude must be a module name or a list of them, got {exclude!r}") \
            from None
    modules = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"bipkernels.convert: exclude names no module of the model: {unknown!r}")
    return {module for module in modules for name in names if module == name or module.startswith(name + ".")}


def _check_one_ranking_dtype(op: str, layers: list[tuple[str, torch.dtype]]) -> None:
    """ValueError naming ``op`` unless the (name, scores dtype) ``layers`` rank their block scores in one
    dtype, as a global projection does."""
    ranked_as = {}  # block-score dtype: the first layer ranking in it
    for name, dtype in layers:
        ranked_as.setdefault(score_dtype(dtype), name)
    if len(ranked_as) > 1:
        raise ValueError(f"{op}: a global projection ranks the block scores of all layers together in one dtype, "
                         "but " + " and ".join(f"layer {name!r} ranks in {dtype}" for dtype, name in ranked_as.items())
                         + ": give the masked layers one dtype (float16, bfloat16 and float32 rank together, as "
                           "float32) or use scope='layer'")


@torch.no_grad()
def project(model: nn.Module, sparsity: float, scope: str = "global") -> None:
    """Set every masked layer's threshold so exactly keep_count(blocks, sparsity) blocks stay (Proj_k).

    ``scope="global"`` ranks the blocks of all layers together (ties: module order, then flat index);
    ``"layer"`` keeps that fraction in each layer. Only ranked_layers take part: not N:M, not weightless.
    ValueError for a model without masked layers (one never converted: there is nothing to project).
    """
    _check_model("project", model)
    if not masked_layers(model):
        raise ValueError(f"bipkernels.project: the {type(model).__name__} holds no masked layer (MaskedConv2d, "
                         "MaskedLinear) to project: convert it first (bipkernels.convert(model, sparsity))")
    if scope not in SCOPES:
        raise ValueError(f"bipkernels.project: scope must be one of {SCOPES}, got {scope!r}")
    ops.check_sparsity(sparsity, "bipkernels.project")
    named = ranked_layers(model)
    meta = [name for name, layer in named if layer.scores.is_meta]
    if meta:
        raise ValueError(f"bipkernels.project: the scores of {', '.join(meta)} are on the meta device, with no values "
                         "to rank: load the weights (load_state_dict(..., assign=True), or to_empty and load) first")
    if not named:
        return
    if scope == "global":
        _check_one_ranking_dtype("bipkernels.project", [(name, layer.scores.dtype) for name, layer in named])
    layers = [layer for _, layer in named]
    # Unstructured block scores are |s|: the select then reads the scores themselves (absolute=True),
    # which saves writing |s| out and reading it back.
    absolute = all(layer.structure.kind == "unstructured" for layer in layers) and \
        len({layer.scores.dtype for layer in layers}) == 1
    ranked = [layer.scores.detach() if absolute else layer.block_scores() for layer in layers]
    if scope == "global":
        total = sum(scores.numel() for scores in ranked)
        thresholds = ops.topk_threshold(ranked, ops.keep_count(total, sparsity), absolute=absolute)
    else:
        thresholds = [ops.topk_threshold(scores, ops.keep_count(scores.numel(), sparsity), absolute=absolute)
                      for scores in ranked]
    for layer, threshold in zip(layers, thresholds):
        layer.threshold.copy_(threshold)


def freeze_masks(model: nn.Module) -> nn.Module:
    """Stops the masked layers' scores from training (requires_grad False; returns ``model``), so that an
    optimiser built on model.parameters() to fine-tune a pruned model keeps its masks: the thresholds are
    fixed numbers, so scores that an optimiser (or its weight decay) moves would change which blocks pass
    them, and the sparsity with them. (The fused backward still computes the score gradient: autograd
    drops it.) BiP and HYDRA train the scores: a model frozen so is refused by neither, but its masks will
    not move (requires_grad_(True) on the scores undoes it)."""
    _check_model("freeze_masks", model)
    for _, layer in masked_layers(model):
        layer.scores.requires_grad_(False)
    return model


@torch.no_grad()
def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: bool mask shaped like its weight} for every masked layer."""
    _check_model("masks", model)
    return {name: layer.mask() for name, layer in masked_layers(model)}


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Pruned fraction of the masked layers' weights, all layers together (0.0 without masked layers).
    ValueError for scores on the meta device, which hold no values to count."""
    _check_model("sparsity", model)
    kept = total = 0
    for name, layer in masked_layers(model):
        if layer.scores.is_meta:
            raise ValueError(f"bipkernels.sparsity: the scores of {name!r} are on the meta device, with no values: "
                             "load the weights (and project) first")
        kept += int(layer.mask().sum())
        total += layer.weight.numel()
    return 1.0 - kept / total if total else 0.0
