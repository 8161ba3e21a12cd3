// Entry-point plumbing shared by the CPU and CUDA kernels of the mask-consuming ops: validation, the
// block reduction where the structure needs one, and the MaskRule over it. `reduce_blocks` is the
// backend's block reduction: (contiguous scores, layout, p) -> flat block scores (num_blocks,).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "bipkernels/checks.h"
#include "bipkernels/shapes.h"

namespace bipkernels {

inline void check_norm(int64_t p, const char* op) {
  TORCH_CHECK(p == 1 || p == 2, "bipkernels.", op, ": p must be 1 or 2, got ", p);
}

// The block_scores op on any backend.
template <typename Reduce>
at::Tensor block_scores_with(const at::Tensor& scores, int64_t kind, int64_t a, int64_t b, int64_t p,
                             const Reduce& reduce_blocks) {
  check_floating(scores, "block_scores", "scores");
  check_norm(p, "block_scores");
  const BlockLayout layout = make_layout(scores, kind, a, b, "block_scores");
  return reduce_blocks(scores.contiguous(), layout, p).view(block_scores_shape(scores, layout));
}

// The MemoryOrder of a dense tensor (checks.h: runs_in_memory_order holds for it).
inline MemoryOrder memory_order_of(const at::Tensor& tensor) {
  MemoryOrder order;
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    if (tensor.size(d) == 1) continue;
    order.size[order.dims] = tensor.size(d);
    order.stride[order.dims] = tensor.stride(d);
    ++order.dims;
  }
  return order;
}

// The scores (contiguous, or in memory order with where they lie), the threshold and the block scores the structure needs; owns the tensors that
// rule<scalar_t>() points into.
struct PreparedMask {
  at::Tensor scores, threshold, block_scores;
  BlockLayout layout;
  MemoryOrder order;

  template <typename scalar_t>
  MaskRule<scalar_t, at::opmath_type<scalar_t>> rule() const {
    using score_t = at::opmath_type<scalar_t>;
    return {scores.const_data_ptr<scalar_t>(),
            block_scores.defined() ? block_scores.const_data_ptr<score_t>() : nullptr,
            threshold.const_data_ptr<double>(), layout, order};
  }
};

// `memory_order`: the scores are read where they lie (checks.h: runs_in_memory_order), else contiguous.
template <typename Reduce>
PreparedMask prepare_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a,
                          int64_t b, int64_t p, const char* op, bool memory_order, const Reduce& reduce_blocks) {
  check_floating(scores, op, "scores");
  check_norm(p, op);
  check_threshold(threshold, scores, kind, op);
  PreparedMask prepared;
  prepared.layout = make_layout(scores, kind, a, b, op);
  prepared.scores = in_kernel_order(scores, memory_order);
  if (memory_order && !scores.is_contiguous()) prepared.order = memory_order_of(scores);
  // N:M never reads the threshold; the rule still gets a valid pointer.
  prepared.threshold = kind == kNM ? at::empty({2}, scores.options().dtype(at::kDouble)) : threshold.contiguous();
  if (needs_block_scores(kind)) prepared.block_scores = reduce_blocks(prepared.scores, prepared.layout, p);
  return prepared;
}

}  // namespace bipkernels
