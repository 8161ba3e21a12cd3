// The test library bipkernels_emulated_cuda: the ops of bipkernels (the same schemas), whose CPU kernels
// are csrc/cuda's CUDA kernels and host code run on the CPU emulation (csrc/cuda/emulator.h), plus the
// emulator's schedule and two kernels that show what it catches. tests/test_cuda_emulated.py builds it
// with the .cu files included (BIPKERNELS_EMULATE_CUDA) and compares every op with the reference.
#include <ATen/ops/empty_like.h>

#include "bipkernels/schemas.h"
#include "cuda/launch.cuh"

namespace bipkernels::cuda {
namespace {

// Reverses x (float32, at most 1024 elements) through shared memory, one thread per element. mode:
// 0 no barrier between the writes and the reads (a race: the result depends on the schedule), 1 every
// thread waits, 2 only the even threads call __syncthreads (a barrier not every thread reaches), 3 as 1,
// but the middle thread throws after the barrier (the error reaches the caller, the block is abandoned),
// 4 the even threads wait at one barrier, the odd ones at another.
__global__ void reverse_kernel(const float* in, float* out, unsigned int n, int64_t mode) {
  __shared__ float staged[1024];
  staged[threadIdx.x] = in[threadIdx.x];
  if (mode == 4 && threadIdx.x % 2 == 1) {
    __syncthreads();
  } else if (mode == 1 || mode == 3 || mode == 4 || (mode == 2 && threadIdx.x % 2 == 0)) {
    __syncthreads();
  }
  TORCH_CHECK(mode != 3 || threadIdx.x != n / 2, "thread ", threadIdx.x, " fails");
  out[threadIdx.x] = staged[n - 1 - threadIdx.x];
}

at::Tensor reverse_through_shared(const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(x.dim() == 1 && x.numel() >= 1 && x.numel() <= 1024 && x.scalar_type() == at::kFloat,
              "_reverse_through_shared: x must be float32 with 1 to 1024 elements, got ", x.sizes());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const auto n = static_cast<unsigned int>(in.numel());
  launch(reverse_kernel, 1, n, current_stream(), in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, mode);
  return out;
}

}  // namespace

TORCH_LIBRARY(bipkernels_emulated_cuda, m) {
  define_ops(m);
  // schedule: 0 forward, 1 reverse, 2 shuffled (seeded): the order of a block's threads between barriers.
  m.def("set_schedule(int schedule, int seed) -> ()", &emulator::set_schedule);
  m.def("_reverse_through_shared(Tensor x, int mode) -> Tensor");
}

BIPKERNELS_CUDA_KERNELS(m) { m.impl("_reverse_through_shared", &reverse_through_shared); }

}  // namespace bipkernels::cuda
