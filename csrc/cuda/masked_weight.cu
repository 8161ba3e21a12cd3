// CUDA kernels of bipkernels::block_mask and bipkernels::masked_weight: the thread mapping around
// math.h's MaskRule (the same decision the CPU kernels make).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cuda/launch.cuh"

namespace bipkernels::cuda {
namespace {

template <int64_t Kind, typename scalar_t, typename score_t>
__global__ void block_mask_kernel(MaskRule<scalar_t, score_t> unloaded, bool* mask, int64_t n) {
  const auto rule = unloaded.loaded();
  for (int64_t i = first_index(); i < n; i += grid_stride()) mask[i] = rule.template kept<Kind>(i);
}

template <int64_t Kind, int Width, typename scalar_t, typename score_t>
__global__ void masked_weight_kernel(MaskRule<scalar_t, score_t> unloaded, const scalar_t* weight, scalar_t* out,
                                     int64_t n) {
  const auto rule = unloaded.loaded();
  for_each_run<Width>(n, [&](int64_t first, auto width) {
    constexpr int W = decltype(width)::value;
    const auto theta = *reinterpret_cast<const Vector<scalar_t, W>*>(weight + first);
    Vector<scalar_t, W> result;
#pragma unroll
    for (int j = 0; j < W; ++j) result.lane[j] = rule.template kept<Kind>(first + j) ? theta.lane[j] : scalar_t(0);
    *reinterpret_cast<Vector<scalar_t, W>*>(out + first) = result;
  });
}

at::Tensor block_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a, int64_t b,
                      int64_t p) {
  const DeviceGuard guard(scores.device());
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "block_mask");
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t n = scores.numel();
  if (n == 0) return mask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "block_mask", [&] {
    with_kind(prepared.layout.kind, [&](auto kind) {
      launch(block_mask_kernel<decltype(kind)::value, scalar_t, at::opmath_type<scalar_t>>, grid_for(n), kThreads,
             current_stream(), prepared.rule<scalar_t>(), mask.mutable_data_ptr<bool>(), n);
    });
  });
  return mask;
}

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& threshold,
                         int64_t kind, int64_t a, int64_t b, int64_t p) {
  check_like(scores, weight, "masked_weight", "scores", "weight");
  const DeviceGuard guard(weight.device());
  const bool memory_order = runs_in_memory_order(kind, {weight, scores});
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "masked_weight", memory_order);
  const at::Tensor weight_ordered = in_kernel_order(weight, memory_order);
  at::Tensor out = at::empty_like(weight_ordered);
  const int64_t n = weight.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_weight", [&] {
    const scalar_t* theta = weight_ordered.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    with_kind(prepared.layout.kind, [&](auto kind) {
      with_vector_width<scalar_t>(vector_width<scalar_t>({theta, result}), [&](auto width) {
        constexpr int W = decltype(width)::value;
        launch(masked_weight_kernel<decltype(kind)::value, W, scalar_t, at::opmath_type<scalar_t>>,
               grid_for(ceil_div(n, W)), kThreads, current_stream(), prepared.rule<scalar_t>(), theta, result, n);
      });
    });
  });
  return out;
}

}  // namespace

BIPKERNELS_CUDA_KERNELS(m) {
  m.impl("block_mask", &block_mask);
  m.impl("masked_weight", &masked_weight);
}

}  // namespace bipkernels::cuda
