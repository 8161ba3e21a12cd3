// bipkernels._C: importing it runs the op registrations of csrc/ (TORCH_LIBRARY in the same shared
// object); its attributes are the build facts that `bipkernels info` prints.
#include <string>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifndef BIPKERNELS_VERSION
#define BIPKERNELS_VERSION "unknown"
#endif
#ifndef BIPKERNELS_TORCH_VERSION
#define BIPKERNELS_TORCH_VERSION "unknown"
#endif
#ifndef BIPKERNELS_CUDA_ARCHS
#define BIPKERNELS_CUDA_ARCHS ""
#endif

namespace {

// {op name: [dispatch keys with a kernel]} for every bipkernels op, read from the dispatcher itself so
// it reports what was really registered rather than what the build meant to register.
pybind11::dict registered_kernels() {
  pybind11::dict kernels;
  const std::string prefix = "bipkernels::";
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind(prefix, 0) != 0) continue;
    const auto handle = c10::Dispatcher::singleton().findOp(name);
    if (!handle) continue;
    std::vector<std::string> keys;
    for (const auto key : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
      if (handle->hasKernelForDispatchKey(key)) keys.emplace_back(c10::toString(key));
    }
    kernels[pybind11::str(name.name.substr(prefix.size()))] = keys;
  }
  return kernels;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "bipkernels compiled ops and build facts";
  module.attr("__version__") = BIPKERNELS_VERSION;
  module.attr("torch_version") = BIPKERNELS_TORCH_VERSION;
  module.attr("cuda_archs") = BIPKERNELS_CUDA_ARCHS;
#ifdef BIPKERNELS_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  module.def("registered_kernels", &registered_kernels, "{op: [dispatch keys with a kernel]}");
}
