// CUDA launch plumbing shared by the bipkernels CUDA kernels: grid size, the grid-stride loop, the
// block reduction and the mask preparation. Kept light (no torch/extension.h) so each .cu compiles fast.
#pragma once

#include <algorithm>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bipkernels/math.h"
#include "bipkernels/prepared_mask.h"

namespace bipkernels::cuda {

constexpr int kThreads = 256;

// Enough blocks to fill the device; the kernels loop over the rest (grid-stride, 64-bit indices).
inline unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(n, kThreads), 1, int64_t(1) << 16));
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Flat block scores (num_blocks,) of contiguous CUDA `scores` (see cpu/block_scores.h).
at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p);

inline PreparedMask prepare_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a,
                                 int64_t b, int64_t p, const char* op) {
  return bipkernels::prepare_mask(scores, threshold, kind, a, b, p, op, reduce_blocks);
}

}  // namespace bipkernels::cuda
