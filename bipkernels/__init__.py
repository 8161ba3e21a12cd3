"""bipkernels: BiP pruning for PyTorch with fused CPU, CUDA and Triton kernels.

    model = bipkernels.convert(model, sparsity=0.9)   # Conv2d/Linear -> MaskedConv2d/MaskedLinear
    bipkernels.sparsity(model), bipkernels.masks(model)
    plain = bipkernels.export_dense(model)            # nn.Conv2d / nn.Linear with zeros where pruned

Importing never initialises CUDA; without the compiled extension every op runs the PyTorch reference.
"""

from .version import __version__
from .structures import Structure, parse_structure
from .ops import block_mask, block_scores, hypergrad, keep_count, masked_weight, topk_masks, topk_threshold
from .nn import (MaskedConv2d, MaskedLinear, convert, freeze_masks, masked_layers, masks, project, sparsity,
                 unmasked_layers)
from .export import ShrinkReport, apply_prune_masks, export_dense, export_semi_structured, export_shrunk
from .info import build_info
from .solvers import BiP, prune

__all__ = [
    "__version__", "Structure", "parse_structure", "block_scores", "topk_threshold", "topk_masks", "block_mask",
    "masked_weight", "hypergrad", "keep_count", "MaskedConv2d", "MaskedLinear", "convert", "project", "masked_layers",
    "masks", "freeze_masks", "sparsity", "unmasked_layers", "export_dense", "apply_prune_masks", "export_shrunk",
    "ShrinkReport", "export_semi_structured", "build_info", "BiP", "prune",
]
