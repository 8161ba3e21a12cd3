// CUDA kernel of bipkernels::hypergrad: one pass reads g, θ and s and writes grad_θ and grad_s through
// math.h's MaskRule and hypergrad_element (the functions the CPU kernel runs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cuda/launch.cuh"

namespace bipkernels::cuda {
namespace {

template <int64_t Kind, typename scalar_t, typename score_t>
__global__ void hypergrad_kernel(MaskRule<scalar_t, score_t> unloaded, const scalar_t* grad, const scalar_t* theta,
                                 scalar_t* grad_theta, scalar_t* grad_score, at::opmath_type<scalar_t> inv_gamma,
                                 int64_t implicit, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rule = unloaded.loaded();
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const auto element = hypergrad_element<acc_t>(static_cast<acc_t>(grad[i]), static_cast<acc_t>(theta[i]),
                                                  rule.template kept<Kind>(i), inv_gamma, implicit);
    grad_theta[i] = static_cast<scalar_t>(element.grad_theta);
    grad_score[i] = static_cast<scalar_t>(element.grad_score);
  }
}

std::tuple<at::Tensor, at::Tensor> hypergrad(const at::Tensor& grad, const at::Tensor& weight,
                                             const at::Tensor& scores, const at::Tensor& threshold, int64_t kind,
                                             int64_t a, int64_t b, int64_t p, double inv_gamma, int64_t implicit) {
  check_hypergrad_args(grad, weight, scores, implicit);
  const c10::cuda::CUDAGuard guard(weight.device());
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "hypergrad");
  const at::Tensor grad_contiguous = grad.contiguous(), weight_contiguous = weight.contiguous();
  at::Tensor grad_weight = at::empty_like(weight_contiguous), grad_scores = at::empty_like(weight_contiguous);
  const int64_t n = weight.numel();
  if (n == 0) return {grad_weight, grad_scores};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "hypergrad", [&] {
    with_kind(prepared.layout.kind, [&](auto kind) {
      hypergrad_kernel<decltype(kind)::value><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          prepared.rule<scalar_t>(), grad_contiguous.const_data_ptr<scalar_t>(),
          weight_contiguous.const_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
          grad_scores.mutable_data_ptr<scalar_t>(), static_cast<at::opmath_type<scalar_t>>(inv_gamma), implicit, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_weight, grad_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(bipkernels, CUDA, m) { m.impl("hypergrad", &hypergrad); }

}  // namespace bipkernels::cuda
