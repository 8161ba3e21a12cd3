// CUDA kernels of bipkernels::block_scores (math.h: block_term, block_score). Small blocks: one thread
// per block, summing in the canonical order, bit-identical to the CPU kernel. Large blocks (a filter, a
// channel, a tile): one CUDA block per score block, its threads summing strided terms in double and then
// a shared-memory tree, so a layer with few blocks still fills the GPU. That double sum can differ from
// the CPU's sequential one in its last bits: a float32 block score then only where they straddle a
// float32 rounding boundary, a float64 one by those bits (exactly summable scores agree in any order).
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

// Average elements per block from which a CUDA block per score block beats a thread per score block.
constexpr int64_t kLargeBlock = 64;

template <typename scalar_t, typename score_t>
__global__ void reduce_large_blocks_kernel(const scalar_t* scores, score_t* out, BlockLayout layout, int64_t p,
                                           int64_t num_blocks) {
  __shared__ double partial[kThreads];
  for (int64_t block = blockIdx.x; block < num_blocks; block += gridDim.x) {
    const int64_t size = layout.block_size(block);
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < size; j += blockDim.x) sum += block_term(scores[layout.element(block, j)], p);
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    // No barrier before the next block: partial[0] is read and next written by thread 0 alone, and the
    // tree's last barrier has passed every other read.
    if (threadIdx.x == 0) out[block] = static_cast<score_t>(partial[0]);
  }
}

at::Tensor block_scores(const at::Tensor& scores, int64_t kind, int64_t a, int64_t b, int64_t p) {
  return block_scores_with(scores, kind, a, b, p, reduce_blocks);
}

}  // namespace

at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p) {
  const DeviceGuard guard(scores.device());
  const bool per_element = layout.kind == kUnstructured || layout.kind == kNM;
  const int64_t num_blocks = per_element ? scores.numel() : layout.num_blocks();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "block_scores", [&] {
    using score_t = at::opmath_type<scalar_t>;
    out = at::empty({num_blocks}, scores.options().dtype(c10::CppTypeToScalarType<score_t>::value));
    if (num_blocks == 0) return;
    const scalar_t* data = scores.const_data_ptr<scalar_t>();
    score_t* result = out.mutable_data_ptr<score_t>();
    if (!per_element && scores.numel() >= kLargeBlock * num_blocks) {
      const auto grid = static_cast<unsigned int>(std::min<int64_t>(num_blocks, kMaxGrid));
      launch(reduce_large_blocks_kernel<scalar_t, score_t>, grid, kThreads, current_stream(), data, result, layout,
             p, num_blocks);
    } else {
      launch(reduce_blocks_kernel<scalar_t, score_t>, grid_for(num_blocks), kThreads, current_stream(), data, result,
             layout, p, num_blocks, per_element);
    }
  });
  return out;
}

BIPKERNELS_CUDA_KERNELS(m) { m.impl("block_scores", &block_scores); }

}  // namespace bipkernels::cuda
