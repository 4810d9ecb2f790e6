// Shared by every csrc/cuda/*.cu: the float-dtype switch for CUDA types, fp32 conversion
// helpers, and launch error checks. Kernels run on the caller's stream (an integer handle
// passed from torch.cuda.current_stream().cuda_stream) and never synchronize, so they can be
// captured into CUDA graphs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "checks.h"
#include "dispatch.h"

namespace detailflow::cuda {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detailflow::cuda

// Throws (as a Python RuntimeError via pybind11) when the last launch failed.
#define DF_CUDA_CHECK_LAUNCH(name)                                                        \
  do {                                                                                    \
    cudaError_t df_err_ = cudaGetLastError();                                             \
    if (df_err_ != cudaSuccess) {                                                         \
      std::ostringstream df_msg_;                                                         \
      df_msg_ << name << ": CUDA launch failed: " << cudaGetErrorString(df_err_);        \
      throw std::runtime_error(df_msg_.str());                                            \
    }                                                                                     \
  } while (0)

// DF_DISPATCH_FLOAT for CUDA code: scalar_t is float, __nv_bfloat16 or __half.
#define DF_CUDA_DISPATCH_FLOAT(dtype_code, name, ...)                                     \
  [&] {                                                                                   \
    switch (static_cast<::detailflow::DType>(dtype_code)) {                               \
      DF_DTYPE_CASE(Float32, float, __VA_ARGS__)                                          \
      DF_DTYPE_CASE(BFloat16, __nv_bfloat16, __VA_ARGS__)                                 \
      DF_DTYPE_CASE(Float16, __half, __VA_ARGS__)                                         \
      default:                                                                            \
        DF_CHECK(false, name << ": unsupported dtype code " << (dtype_code)               \
                              << " (expected float32, bfloat16 or float16)");             \
    }                                                                                     \
  }()
