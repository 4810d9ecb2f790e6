// The only pybind11 file: thin entry points that check the invariants the kernels rely on,
// release the GIL and call the kernels in cpu/ and cuda/. Tensors arrive as integer
// addresses + sizes from the Python wrappers (detailflow_engine/ops/), which keep them alive;
// the extension never links libtorch, so one build serves any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <string>

#include "checks.h"
#include "dispatch.h"
#if DETAILFLOW_HAS_CUDA
#include "cuda_info.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["cpu"] = true;
  info["cuda"] = static_cast<bool>(DETAILFLOW_HAS_CUDA);
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#if defined(__AVX512F__)
  info["compiled_avx512"] = true;
#else
  info["compiled_avx512"] = false;
#endif
  info["compiler"] = std::string(__VERSION__);
#if DETAILFLOW_HAS_CUDA
  info["cuda_runtime_version"] = detailflow::cuda::runtime_version();
  info["cuda_device_count"] = detailflow::cuda::device_count();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "DetailFlow Engine kernels (C++/OpenMP, optional CUDA); see detailflow_engine/ops";
  m.attr("has_cpu") = true;
  m.attr("has_cuda") = static_cast<bool>(DETAILFLOW_HAS_CUDA);
  m.def("build_info", &build_info, "What this extension was built with");
}
