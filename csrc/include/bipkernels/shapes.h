// Output shapes shared by the CPU and CUDA entry points (the fake kernels in bipkernels/ops.py mirror them).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

#include "bipkernels/math.h"

namespace bipkernels {

// Shape of block_scores(scores): the scores' own shape where blocks are elements (unstructured, N:M),
// (out,) for filter, (in,) for channel, (ceil(rows / a), ceil(cols / b)) for tile.
inline std::vector<int64_t> block_scores_shape(const at::Tensor& scores, const BlockLayout& layout) {
  switch (layout.kind) {
    case kFilter: return {layout.rows};
    case kChannel: return {layout.in_channels()};
    case kTile: return {ceil_div(layout.rows, layout.a), layout.tile_cols()};
    default: return scores.sizes().vec();
  }
}

}  // namespace bipkernels
