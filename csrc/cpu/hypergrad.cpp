// CPU kernel of bipkernels::hypergrad: one pass over g, θ and s writes both levels' gradients
// (math.h: hypergrad_element).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "bipkernels/checks.h"
#include "cpu/block_scores.h"

namespace bipkernels::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> hypergrad(const at::Tensor& grad, const at::Tensor& weight,
                                             const at::Tensor& scores, const at::Tensor& threshold, int64_t kind,
                                             int64_t a, int64_t b, int64_t p, double inv_gamma, int64_t implicit) {
  check_hypergrad_args(grad, weight, scores, inv_gamma, implicit);
  const bool memory_order = runs_in_memory_order(kind, {weight, scores, grad});
  const PreparedMask prepared = prepare_mask(scores, threshold, kind, a, b, p, "hypergrad", memory_order);
  const at::Tensor grad_ordered = in_kernel_order(grad, memory_order);
  const at::Tensor weight_ordered = in_kernel_order(weight, memory_order);
  at::Tensor grad_weight = at::empty_like(weight_ordered), grad_scores = at::empty_like(weight_ordered);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "hypergrad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto rule = prepared.rule<scalar_t>().loaded();
    const scalar_t* g = grad_ordered.const_data_ptr<scalar_t>();
    const scalar_t* theta = weight_ordered.const_data_ptr<scalar_t>();
    const scalar_t* s = prepared.scores.const_data_ptr<scalar_t>();  // in the order of g and θ
    scalar_t* out_theta = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* out_score = grad_scores.mutable_data_ptr<scalar_t>();
    const acc_t inv_gamma_acc = static_cast<acc_t>(inv_gamma);
    with_kind(prepared.layout.kind, [&](auto kind) {
      at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
        // One decision per element, irregular (math.h: hypergrad_element).
        constexpr bool kBranchFree = decltype(kind)::value == kNM || decltype(kind)::value == kUnstructured;
        // inv_gamma by value: by reference, a store of a float result might change it, so the compiler
        // reloaded it for every element and left the loop scalar.
        for_each_decision<decltype(kind)::value>(rule, begin, end, [&, inv_gamma_acc](int64_t i, bool kept) {
          const auto element = hypergrad_element<acc_t, kBranchFree>(
              static_cast<acc_t>(g[i]), static_cast<acc_t>(theta[i]), kept, s[i] < scalar_t(0), inv_gamma_acc,
              implicit);
          out_theta[i] = static_cast<scalar_t>(element.grad_theta);
          out_score[i] = static_cast<scalar_t>(element.grad_score);
        });
      });
    });
  });
  return {grad_weight, grad_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(bipkernels, CPU, m) { m.impl("hypergrad", &hypergrad); }

}  // namespace bipkernels::cpu
