// CUDA kernel of bipkernels::hypergrad: one pass reads g, θ and s and writes grad_θ and grad_s through
// math.h's MaskRule and hypergrad_element (the functions the CPU kernel runs); 16-byte loads and stores
// where the pointers allow (launch.cuh: for_each_run).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cuda/launch.cuh"

namespace bipkernels::cuda {
namespace {

template <int64_t Kind, int Width, typename scalar_t, typename score_t>
__global__ void hypergrad_kernel(MaskRule<scalar_t, score_t> unloaded, const scalar_t* grad, const scalar_t* theta,
                                 const scalar_t* scores, scalar_t* grad_theta, scalar_t* grad_score,
                                 at::opmath_type<scalar_t> inv_gamma, int64_t implicit, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rule = unloaded.loaded();
  for_each_run<Width>(n, [&](int64_t first, auto width) {
    constexpr int W = decltype(width)::value;
    const auto g = *reinterpret_cast<const Vector<scalar_t, W>*>(grad + first);
    const auto t = *reinterpret_cast<const Vector<scalar_t, W>*>(theta + first);
    const auto s = *reinterpret_cast<const Vector<scalar_t, W>*>(scores + first);
    Vector<scalar_t, W> out_theta, out_score;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const auto element = hypergrad_element<acc_t>(static_cast<acc_t>(g.lane[j]), static_cast<acc_t>(t.lane[j]),
                                                    rule.template kept<Kind>(first + j),
                                                    static_cast<acc_t>(s.lane[j]) < acc_t(0),
                                                    inv_gamma, implicit);
      out_theta.lane[j] = static_cast<scalar_t>(element.grad_theta);
      out_score.lane[j] = static_cast<scalar_t>(element.grad_score);
    }
    *reinterpret_cast<Vector<scalar_t, W>*>(grad_theta + first) = out_theta;
    *reinterpret_cast<Vector<scalar_t, W>*>(grad_score + first) = out_score;
  });
}

std::tuple<at::Tensor, at::Tensor> hypergrad(const at::Tensor& grad, const at::Tensor& weight,
                                             const at::Tensor& scores, const at::Tensor& threshold, int64_t kind,
                                             int64_t a, int64_t b, int64_t p, double inv_gamma, int64_t implicit) {
  check_hypergrad_args(grad, weight, scores, inv_gamma, implicit);
  const DeviceGuard guard(weight.device());
  const bool memory_order = runs_in_memory_order(kind, {weight, scores, grad});
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "hypergrad", memory_order);
  const at::Tensor grad_ordered = in_kernel_order(grad, memory_order);
  const at::Tensor weight_ordered = in_kernel_order(weight, memory_order);
  at::Tensor grad_weight = at::empty_like(weight_ordered), grad_scores = at::empty_like(weight_ordered);
  const int64_t n = weight.numel();
  if (n == 0) return {grad_weight, grad_scores};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "hypergrad", [&] {
    const scalar_t* g = grad_ordered.const_data_ptr<scalar_t>();
    const scalar_t* theta = weight_ordered.const_data_ptr<scalar_t>();
    const scalar_t* s = prepared.scores.const_data_ptr<scalar_t>();  // in the order of g and θ
    scalar_t* out_theta = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* out_score = grad_scores.mutable_data_ptr<scalar_t>();
    with_kind(prepared.layout.kind, [&](auto kind) {
      with_vector_width<scalar_t>(vector_width<scalar_t>({g, theta, s, out_theta, out_score}), [&](auto width) {
        constexpr int W = decltype(width)::value;
        launch(hypergrad_kernel<decltype(kind)::value, W, scalar_t, at::opmath_type<scalar_t>>,
               grid_for(ceil_div(n, W)), kThreads, current_stream(), prepared.rule<scalar_t>(), g, theta, s,
               out_theta, out_score, static_cast<at::opmath_type<scalar_t>>(inv_gamma), implicit, n);
      });
    });
  });
  return {grad_weight, grad_scores};
}

}  // namespace

BIPKERNELS_CUDA_KERNELS(m) { m.impl("hypergrad", &hypergrad); }

}  // namespace bipkernels::cuda
