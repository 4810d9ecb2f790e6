// Dtype enum shared with the Python wrappers, and a switch that turns it into a C++ type.
// Instantiate only what DetailFlow uses: fp32, bf16, fp16 (STYLE.md practice 9).
#pragma once
#include <cstdint>
#include <cstring>

#include "checks.h"

namespace detailflow {

// Must match detailflow_engine/ops/_dispatch.py DTYPE_CODES.
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2, Int64 = 3, Int32 = 4, Int8 = 5 };

// bf16 storage type for CPU code: upper 16 bits of an IEEE float.
struct bf16 {
  uint16_t bits;
};
inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, bf16* out) {
  // round-to-nearest-even, as torch does for float -> bfloat16
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a quiet NaN
    out->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = static_cast<uint16_t>(u >> 16);
}

// The same rounding without a branch, so that store loops vectorise (bit for bit from_float).
inline void store_float(float x, float* out) { *out = x; }
inline void store_float(float x, bf16* out) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  out->bits = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

}  // namespace detailflow

// Applies M(A, B) to every pair of CPU float types: the instantiations of two-dtype kernels.
#define DF_FOR_CPU_FLOAT_PAIRS(M) \
  M(float, float) M(float, ::detailflow::bf16) M(::detailflow::bf16, float) M(::detailflow::bf16, ::detailflow::bf16)

// One case of a dtype switch: runs the lambda-like body with `scalar_t` = `type`.
#define DF_DTYPE_CASE(enum_value, type, ...)                                          \
  case ::detailflow::DType::enum_value: {                                             \
    using scalar_t = type;                                                            \
    return __VA_ARGS__();                                                             \
  }

// Expands the lambda-like body once per supported float dtype with `scalar_t` defined.
#define DF_DISPATCH_FLOAT(dtype_code, name, ...)                                      \
  [&] {                                                                               \
    switch (static_cast<::detailflow::DType>(dtype_code)) {                           \
      DF_DTYPE_CASE(Float32, float, __VA_ARGS__)                                      \
      DF_DTYPE_CASE(BFloat16, ::detailflow::bf16, __VA_ARGS__)                        \
      default:                                                                        \
        DF_CHECK(false, name << ": unsupported dtype code " << (dtype_code)           \
                              << " (expected float32 or bfloat16)");                  \
    }                                                                                 \
  }()
