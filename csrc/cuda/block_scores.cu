// CUDA kernel of bipkernels::block_scores (math.h: block_score). One thread per block, summing in the
// canonical order, so the block scores are bit-identical to the CPU kernel's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/launch.cuh"

namespace bipkernels::cuda {
namespace {

template <typename scalar_t, typename score_t>
__global__ void reduce_blocks_kernel(const scalar_t* scores, score_t* out, BlockLayout layout, int64_t p,
                                     int64_t num_blocks, bool per_element) {
  for (int64_t block = first_index(); block < num_blocks; block += grid_stride()) {
    out[block] = per_element ? static_cast<score_t>(fabs(static_cast<double>(scores[block])))
                             : static_cast<score_t>(block_score(scores, layout, block, p));
  }
}

at::Tensor block_scores(const at::Tensor& scores, int64_t kind, int64_t a, int64_t b, int64_t p) {
  return block_scores_with(scores, kind, a, b, p, reduce_blocks);
}

}  // namespace

at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const bool per_element = layout.kind == kUnstructured || layout.kind == kNM;
  const int64_t num_blocks = per_element ? scores.numel() : layout.num_blocks();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "block_scores", [&] {
    using score_t = at::opmath_type<scalar_t>;
    out = at::empty({num_blocks}, scores.options().dtype(c10::CppTypeToScalarType<score_t>::value));
    if (num_blocks == 0) return;
    reduce_blocks_kernel<<<grid_for(num_blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.const_data_ptr<scalar_t>(), out.mutable_data_ptr<score_t>(), layout, p, num_blocks, per_element);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(bipkernels, CUDA, m) { m.impl("block_scores", &block_scores); }

}  // namespace bipkernels::cuda
