// CUDA launch plumbing shared by the bipkernels CUDA kernels: grid size, the grid-stride loop, the
// launch itself, the block reduction and the mask preparation. Kept light (no torch/extension.h) so each
// .cu compiles fast.
//
// With BIPKERNELS_EMULATE_CUDA the same .cu files compile as C++ for the CPU emulation (emulator.h):
// launches run on the emulator, the ops take CPU tensors and register as CPU kernels of the test library
// bipkernels_emulated_cuda (tests/emulated_cuda). Everything a .cu touches of the CUDA runtime goes
// through the few names below, so the kernels and their host code are the ones the GPU runs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include <ATen/core/Tensor.h>

#if defined(BIPKERNELS_EMULATE_CUDA)
#include "cuda/emulator.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "bipkernels/math.h"
#include "bipkernels/prepared_mask.h"

namespace bipkernels::cuda {

constexpr int kThreads = 256;

// What CUDA can pass to a kernel by value: trivially copyable parameters of at most 4 KiB in all (the
// classic limit; SegmentTable is sized for it).
template <typename... Params>
constexpr bool kKernelParamsFit =
    (std::is_trivially_copyable_v<Params> && ...) && (sizeof(Params) + ... + size_t(0)) <= 4096;

#if defined(BIPKERNELS_EMULATE_CUDA)
#define BIPKERNELS_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(bipkernels_emulated_cuda, CPU, m)
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
constexpr int64_t kMaxGrid = emulator::kMaxEmulatedGrid;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
struct Stream {};
inline Stream current_stream() { return {}; }
inline int multiprocessor_count(int) { return 2; }  // small, so that blocks loop over several chunks

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int threads, Stream, Args&&... args) {
  static_assert(kKernelParamsFit<Params...>);
  emulator::run_grid(grid, threads, [&] { kernel(args...); });
}
#else
#define BIPKERNELS_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(bipkernels, CUDA, m)
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
constexpr int64_t kMaxGrid = int64_t(1) << 16;
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline int multiprocessor_count(int device) {
  int processors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device));
  return processors;
}

// kernel<<<grid, threads, 0, stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int threads, Stream stream, Args&&... args) {
  static_assert(kKernelParamsFit<Params...>);
  kernel<<<grid, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// Enough blocks to fill the device, at most kMaxGrid (the emulation's few make its tests run the loops);
// the kernels loop over the rest (grid-stride, 64-bit indices).
inline unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(n, kThreads), 1, kMaxGrid));
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
