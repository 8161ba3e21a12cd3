// CPU block reduction, shared by every CPU kernel that needs a structured mask.
#pragma once

#include <ATen/core/Tensor.h>

#include "bipkernels/math.h"
#include "bipkernels/prepared_mask.h"

namespace bipkernels::cpu {

// Work size of a parallel chunk: big enough to amortise the thread hand-off.
constexpr int64_t kGrain = 32768;

// Flat block scores (num_blocks,) of contiguous `scores` in the score type (float, or double for double
// scores). For unstructured and N:M, |s| itself.
at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p);

inline PreparedMask prepare_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a,
                                 int64_t b, int64_t p, const char* op) {
  return bipkernels::prepare_mask(scores, threshold, kind, a, b, p, op, reduce_blocks);
}

}  // namespace bipkernels::cpu
