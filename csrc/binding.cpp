// The one pybind11 module of ganengine._C. The ops themselves register in the
// `ganengine_C` torch.library namespace from their own files (TORCH_LIBRARY_FRAGMENT in
// csrc/cpu/<family>.cpp defines the schemas and CPU kernels; TORCH_LIBRARY_IMPL in
// csrc/cuda/<family>.cpp adds the CUDA kernels), so this file only reports build facts.
#include <torch/extension.h>

#ifndef GANENGINE_CPU_FLAGS
#define GANENGINE_CPU_FLAGS "default"
#endif

namespace ganengine::conv_py {
void add_entries(pybind11::module_& m);  // the conv family's eager fast entries (csrc/cpu/conv_py.cpp)
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ganengine compiled kernels (ops live in torch.ops.ganengine_C)";
  ganengine::conv_py::add_entries(m);
  m.def("build_info", []() {
    pybind11::dict d;
    d["cpu_flags"] = GANENGINE_CPU_FLAGS;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef GANENGINE_WITH_CUDA
    d["with_cuda"] = true;
    d["cuda_arch"] = GANENGINE_CUDA_ARCH;
#else
    d["with_cuda"] = false;
#ifdef GANENGINE_CUDA_REASON
    d["cuda_reason"] = GANENGINE_CUDA_REASON;
#endif
#endif
    d["torch_version"] = TORCH_VERSION;
    return d;
  });
}
