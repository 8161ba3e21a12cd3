// CUDA launch plumbing shared by the bipkernels CUDA kernels: grid size, the grid-stride loop, the
// block reduction and the mask preparation. Kept light (no torch/extension.h) so each .cu compiles fast.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

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

// Width consecutive elements moved as one access: 16 bytes (4 floats, 8 halves) when every pointer of
// a kernel is 16-byte aligned (vector_width), else 1.
template <typename T, int Width>
struct alignas(sizeof(T) * Width) Vector {
  T lane[Width];
};

template <typename scalar_t>
int vector_width(std::initializer_list<const void*> pointers) {
  for (const void* pointer : pointers) {
    if (reinterpret_cast<uintptr_t>(pointer) % 16 != 0) return 1;
  }
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Calls body(first, std::integral_constant<int, W>{}) over [0, n): each thread takes runs of W = Width
// elements starting at multiples of Width (so `first` is aligned for a Vector<T, Width> access), and the
// last n % Width elements one at a time (W = 1).
template <int Width, typename Body>
__device__ __forceinline__ void for_each_run(int64_t n, const Body& body) {
  const int64_t runs = n / Width;
  for (int64_t run = first_index(); run < runs; run += grid_stride()) {
    body(run * Width, std::integral_constant<int, Width>{});
  }
  for (int64_t i = runs * Width + first_index(); i < n; i += grid_stride()) body(i, std::integral_constant<int, 1>{});
}

// Calls body(std::integral_constant<int, W>{}) with W = width (1 or 16 / sizeof(scalar_t)).
template <typename scalar_t, typename Body>
inline void with_vector_width(int width, const Body& body) {
  if (width == 1) return body(std::integral_constant<int, 1>{});
  return body(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
}

// Flat block scores (num_blocks,) of contiguous CUDA `scores` (see cpu/block_scores.h).
at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p);

inline PreparedMask prepare_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a,
                                 int64_t b, int64_t p, const char* op, bool memory_order = false) {
  return bipkernels::prepare_mask(scores, threshold, kind, a, b, p, op, memory_order, reduce_blocks);
}

}  // namespace bipkernels::cuda
