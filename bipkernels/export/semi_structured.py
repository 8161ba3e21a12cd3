"""2:4 export: Linear weights as torch.sparse semi-structured tensors (sparse tensor cores, CUDA sm80+)."""

from __future__ import annotations

import warnings

from torch import nn

from ..nn import MaskedConv2d, masked_layers
from .dense import check_exportable, dense_copy


def export_semi_structured(model: nn.Module, *, warn: bool = True) -> tuple[nn.Module, dict[str, str]]:
    """A dense export (export_dense) whose Linear layers with a 2:4 or 1:4 mask hold their weight as a
    torch.sparse semi-structured tensor (to_sparse_semi_structured): half the values stored, and the
    matrix product on the sparse tensor cores of a CUDA GPU of compute capability 8.0 or newer.

    The library's N:M groups run along the input dimension, the rows of a Linear weight (out, in), which
    is the layout those tensors take. Torch's constraints apply: a CUDA tensor, float16 / bfloat16
    (float32 and int8 with the CUTLASS backend), both dimensions multiples of its minimum tile (16 to 64
    by backend and dtype). For inference (the sparse weights do not train). Returns ``(model, left)``:
    ``left`` = {masked layer: why it stays dense}: other structures, convolutions (their N:M groups are
    not rows of a matrix product), and torch's refusal verbatim (e.g. a CPU model); a warning lists them
    too when ``warn``.
    """
    from torch.sparse import to_sparse_semi_structured

    check_exportable("export_semi_structured", model)
    if not isinstance(warn, bool):
        raise TypeError(f"bipkernels.export_semi_structured: warn must be a bool, got {type(warn).__name__} {warn!r}")
    dense = dense_copy("export_semi_structured", model)
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
    if warn and left:
        warnings.warn("bipkernels.export_semi_structured: these masked layers stay dense:\n  "
                      + "\n  ".join(f"{name}: {why}" for name, why in left.items()), stacklevel=2)
    return dense, left
