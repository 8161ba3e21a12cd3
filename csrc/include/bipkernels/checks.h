// Host-side argument checks shared by the CPU and CUDA entry points. Every message names the op and the
// offending value, so an error deep inside a training run says what was wrong.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "bipkernels/math.h"

namespace bipkernels {

inline void check_floating(const at::Tensor& tensor, const char* op, const char* name) {
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "bipkernels.", op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// The block-score list of a select (topk_threshold and its GPU model), checked and made contiguous:
// k >= 0, floating tensors of one dtype, all on the device of the first, which is of `device_type`.
inline std::vector<at::Tensor> contiguous_score_list(const std::vector<at::Tensor>& block_scores, int64_t k,
                                                     c10::DeviceType device_type, const char* op) {
  TORCH_CHECK(k >= 0, "bipkernels.", op, ": k must be >= 0, got ", k);
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; i < block_scores.size(); ++i) {
    const at::Tensor& tensor = block_scores[i];
    check_floating(tensor, op, "block_scores");
    TORCH_CHECK(tensor.device().type() == device_type && tensor.device() == block_scores[0].device(), "bipkernels.",
                op, ": block_scores[", i, "] is on ", tensor.device(), ", expected ", c10::DeviceTypeName(device_type),
                " tensors on the device of block_scores[0] (", block_scores[0].device(), ")");
    TORCH_CHECK(tensor.scalar_type() == block_scores[0].scalar_type(), "bipkernels.", op, ": block_scores[", i,
                "] has dtype ", tensor.scalar_type(), " but block_scores[0] has ", block_scores[0].scalar_type());
    inputs.push_back(tensor.contiguous());
  }
  return inputs;
}

inline void check_like(const at::Tensor& tensor, const at::Tensor& like, const char* op, const char* name,
                       const char* like_name) {
  TORCH_CHECK(tensor.sizes() == like.sizes(), "bipkernels.", op, ": ", name, " has shape ", tensor.sizes(),
              " but ", like_name, " has shape ", like.sizes());
  TORCH_CHECK(tensor.scalar_type() == like.scalar_type(), "bipkernels.", op, ": ", name, " has dtype ",
              tensor.scalar_type(), " but ", like_name, " has dtype ", like.scalar_type());
  TORCH_CHECK(tensor.device() == like.device(), "bipkernels.", op, ": ", name, " is on ", tensor.device(),
              " but ", like_name, " is on ", like.device());
}

// Whether a mask-consuming op runs over memory order instead of over contiguous copies. An unstructured
// mask decides each element from its own score alone, so when the tensors are dense with identical
// strides (contiguous, channels_last or any permutation) the kernels read and write them where they lie,
// and the results take the weight's layout. Structured blocks are defined in logical order, so those
// (and mixed layouts) run on contiguous copies and give contiguous results. ops.py's fake kernels make
// the same decision.
inline bool runs_in_memory_order(int64_t kind, std::initializer_list<at::Tensor> tensors) {
  const at::Tensor& first = *tensors.begin();
  if (kind != kUnstructured || first.dim() > MemoryOrder::kMaxDims || !first.is_non_overlapping_and_dense()) {
    return false;
  }
  for (const at::Tensor& tensor : tensors) {
    if (tensor.strides() != first.strides()) return false;
  }
  return true;
}

// `tensor` as the kernels read it: itself in memory order, else a contiguous copy (or itself).
inline at::Tensor in_kernel_order(const at::Tensor& tensor, bool memory_order) {
  return memory_order ? tensor : tensor.contiguous();
}

// inv_gamma must be finite in the arithmetic (float32 unless the weight is float64): an infinite one times
// a pruned entry's zero implicit term would give NaN there, not θ ⊙ g. NaN fails the first comparison.
inline void check_hypergrad_args(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores,
                                 double inv_gamma, int64_t implicit) {
  check_like(grad, weight, "hypergrad", "grad", "weight");
  check_like(scores, weight, "hypergrad", "scores", "weight");
  TORCH_CHECK(implicit == kImplicitPaper || implicit == kImplicitReleased,
              "bipkernels.hypergrad: implicit must be 0 (paper) or 1 (released), got ", implicit);
  const bool in_double = weight.scalar_type() == at::kDouble;
  const double largest = in_double ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  TORCH_CHECK(inv_gamma >= 0 && inv_gamma <= largest, "bipkernels.hypergrad: inv_gamma must be a number in [0, ",
              largest, "] (the ", in_double ? "float64" : "float32", " arithmetic of ", weight.scalar_type(),
              " weights), got ", inv_gamma);
}

// The threshold (value, cut) as float64 of shape (2,) beside the scores; ignored (any shape) for N:M.
inline void check_threshold(const at::Tensor& threshold, const at::Tensor& scores, int64_t kind, const char* op) {
  if (kind == kNM) return;
  TORCH_CHECK(threshold.scalar_type() == at::kDouble && threshold.dim() == 1 && threshold.size(0) == 2,
              "bipkernels.", op, ": threshold must be a float64 tensor of shape (2,) = (value, cut), got ",
              threshold.scalar_type(), " of shape ", threshold.sizes());
  TORCH_CHECK(threshold.device() == scores.device(), "bipkernels.", op, ": threshold is on ",
              threshold.device(), " but scores are on ", scores.device());
}

// The (rows, cols) view of a weight-shaped tensor and the block structure over it, validated.
inline BlockLayout make_layout(const at::Tensor& scores, int64_t kind, int64_t a, int64_t b, const char* op) {
  TORCH_CHECK(kind >= kUnstructured && kind <= kTile, "bipkernels.", op, ": unknown structure kind ", kind);
  BlockLayout layout{kind, a, b, 1, 1, 1, 1};
  if (scores.dim() >= 1) layout.rows = scores.size(0);
  if (scores.dim() >= 2) layout.channels = scores.size(1);
  for (int64_t d = 2; d < scores.dim(); ++d) layout.inner *= scores.size(d);
  layout.cols = layout.channels * layout.inner;
  if (kind == kUnstructured) return layout;
  TORCH_CHECK(scores.dim() >= 1, "bipkernels.", op, ": a block structure needs a tensor of at least 1 "
              "dimension, got a 0-dimensional one");
  if (kind == kNM) {
    TORCH_CHECK(b >= 1 && a >= 0 && a <= b, "bipkernels.", op, ": N:M needs 0 <= N <= M and M >= 1, got ",
                a, ":", b);
    TORCH_CHECK(layout.in_channels() % b == 0, "bipkernels.", op, ": N:M with M = ",
                b, " needs the input dimension to be a multiple of M, got ", layout.in_channels());
  }
  if (kind == kTile) {
    TORCH_CHECK(a >= 1 && b >= 1, "bipkernels.", op, ": tile sizes must be positive, got ", a, "x", b);
    // The same blocks with the tile cut to the matrix, and no index past it (ceil_div cannot overflow).
    layout.a = std::min(a, std::max<int64_t>(layout.rows, 1));
    layout.b = std::min(b, std::max<int64_t>(layout.cols, 1));
  }
  return layout;
}

}  // namespace bipkernels
