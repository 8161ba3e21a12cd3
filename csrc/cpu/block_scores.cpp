// CPU kernel of bipkernels::block_scores: |s| reduced within each block (math.h: block_score).
#include "cpu/block_scores.h"

#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace bipkernels::cpu {

at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p) {
  const bool per_element = layout.kind == kUnstructured || layout.kind == kNM;
  const int64_t num_blocks = per_element ? scores.numel() : layout.num_blocks();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "block_scores", [&] {
    using score_t = at::opmath_type<scalar_t>;
    out = at::empty({num_blocks}, scores.options().dtype(c10::CppTypeToScalarType<score_t>::value));
    const scalar_t* source = scores.const_data_ptr<scalar_t>();
    score_t* target = out.mutable_data_ptr<score_t>();
    if (per_element) {
      at::parallel_for(0, num_blocks, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) target[i] = std::abs(static_cast<score_t>(source[i]));
      });
      return;
    }
    const int64_t block_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, layout.block_size(0)));
    at::parallel_for(0, num_blocks, block_grain, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        target[block] = static_cast<score_t>(block_score(source, layout, block, p));
      }
    });
  });
  return out;
}

namespace {

at::Tensor block_scores(const at::Tensor& scores, int64_t kind, int64_t a, int64_t b, int64_t p) {
  return block_scores_with(scores, kind, a, b, p, reduce_blocks);
}

}  // namespace

TORCH_LIBRARY_IMPL(bipkernels, CPU, m) { m.impl("block_scores", &block_scores); }

}  // namespace bipkernels::cpu
