"""Export a pruned model to plain PyTorch: dense with zeros, with torch.nn.utils.prune masks, physically
smaller (structured masks), or with 2:4 semi-structured sparse weights (CUDA).

    dense = bipkernels.export_dense(model)                    # nn.Conv2d / nn.Linear, 0 where pruned
    dense = bipkernels.export_dense(model, prune_masks=True)  # + weight_orig / weight_mask (torch prune)
    small, report = bipkernels.export_shrunk(model, example)  # zero filters / channels removed
    fast, left = bipkernels.export_semi_structured(model)     # 2:4 Linear weights as sparse tensors

Every export keeps the exact trained mask (bipkernels.ops.masked_weight), never a per-layer re-pruning,
and never modifies ``model``. Files: dense.py (the first two), spaces.py (the channel spaces of a traced
model), shrink.py (export_shrunk over those spaces), semi_structured.py.
"""

from .dense import apply_prune_masks, export_dense
from .semi_structured import export_semi_structured
from .shrink import ShrinkReport, export_shrunk

__all__ = ["export_dense", "apply_prune_masks", "export_shrunk", "ShrinkReport", "export_semi_structured"]
