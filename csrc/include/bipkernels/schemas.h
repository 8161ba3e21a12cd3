// The schema of every bipkernels op, in one place: the library bipkernels (csrc/registration.cpp) and
// the test library of the emulated CUDA kernels (tests/emulated_cuda) define the same ops. Kernels
// register per backend in csrc/cpu and csrc/cuda; fake (meta) kernels and autograd live in
// bipkernels/ops.py.
//
// Structure arguments (kind, a, b, p) follow bipkernels/structures.py: kind 0 unstructured, 1 filter,
// 2 channel, 3 N:M (a = N, b = M), 4 tile (a x b); p = 1 or 2 is the norm of the block reduction.
// A threshold is a float64 tensor (value, cut), see csrc/include/bipkernels/math.h.
#pragma once

#include <torch/library.h>

namespace bipkernels {

inline void define_ops(torch::Library& m) {
  m.def("block_scores(Tensor scores, int kind, int a, int b, int p) -> Tensor");
  // absolute: rank |x| (the unstructured block scores, taken straight from the scores).
  m.def("topk_threshold(Tensor[] block_scores, int k, bool absolute=False) -> Tensor");
  m.def("block_mask(Tensor scores, Tensor threshold, int kind, int a, int b, int p) -> Tensor");
  m.def("masked_weight(Tensor weight, Tensor scores, Tensor threshold, int kind, int a, int b, int p) -> Tensor");
  m.def(
      "hypergrad(Tensor grad, Tensor weight, Tensor scores, Tensor threshold, int kind, int a, int b, int p, "
      "float inv_gamma, int implicit) -> (Tensor, Tensor)");
}

}  // namespace bipkernels
