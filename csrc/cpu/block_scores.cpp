// CPU kernel of bipkernels::block_scores: |s| reduced within each block (math.h: block_score).
#include "cpu/block_scores.h"

#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace bipkernels::cpu {

at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p) {
  if (layout.kind == kUnstructured || layout.kind == kNM) {
    // |s| in the score type: ATen's vectorised abs, then the widening, both exact (a loop of its own ran at
    // half the speed).
    return at::abs(scores).to(at::toOpMathType(scores.scalar_type())).reshape({-1});
  }
  const int64_t num_blocks = layout.num_blocks();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "block_scores", [&] {
    using score_t = at::opmath_type<scalar_t>;
    out = at::empty({num_blocks}, scores.options().dtype(c10::CppTypeToScalarType<score_t>::value));
    const scalar_t* source = scores.const_data_ptr<scalar_t>();
    score_t* target = out.mutable_data_ptr<score_t>();
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
