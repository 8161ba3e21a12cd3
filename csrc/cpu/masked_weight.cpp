// CPU kernels of bipkernels::block_mask and bipkernels::masked_weight: the mask (math.h: MaskRule)
// recomputed from the scores and applied as a select, so a pruned NaN or inf weight gives exactly 0.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "bipkernels/checks.h"
#include "cpu/block_scores.h"

namespace bipkernels::cpu {
namespace {

at::Tensor block_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a, int64_t b,
                      int64_t p) {
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "block_mask");
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  bool* target = mask.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "block_mask", [&] {
    const auto rule = prepared.rule<scalar_t>().loaded();
    with_kind(prepared.layout.kind, [&](auto kind) {
      at::parallel_for(0, scores.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_decision<decltype(kind)::value>(rule, begin, end, [&](int64_t i, bool kept) { target[i] = kept; });
      });
    });
  });
  return mask;
}

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& threshold,
                         int64_t kind, int64_t a, int64_t b, int64_t p) {
  check_like(scores, weight, "masked_weight", "scores", "weight");
  const bool memory_order = runs_in_memory_order(kind, {weight, scores});
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "masked_weight", memory_order);
  const at::Tensor weight_ordered = in_kernel_order(weight, memory_order);
  at::Tensor out = at::empty_like(weight_ordered);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_weight", [&] {
    const auto rule = prepared.rule<scalar_t>().loaded();
    const scalar_t* source = weight_ordered.const_data_ptr<scalar_t>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    with_kind(prepared.layout.kind, [&](auto kind) {
      at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_decision<decltype(kind)::value>(rule, begin, end, [&](int64_t i, bool kept) {
          // N:M and unstructured decide element by element, irregularly: there a jump mispredicts and the bit
          // mask is faster (2:4: 1.5×; the unstructured loop vectorises with it); runs of one decision (the
          // other structures) copy faster with the plain select.
          if constexpr (decltype(kind)::value == kNM || decltype(kind)::value == kUnstructured) {
            target[i] = kept_or_zero(kept, source[i]);
          } else {
            target[i] = kept ? source[i] : scalar_t(0);
          }
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bipkernels, CPU, m) {
  m.impl("block_mask", &block_mask);
  m.impl("masked_weight", &masked_weight);
}

}  // namespace bipkernels::cpu
