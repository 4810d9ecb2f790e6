// A packed decode_gemm weight as one descriptor, and the one place that turns its dtype into
// the decode_gemm instantiation that streams it. bindings.cpp (decode_gemm) and
// cpu/decode_layer.cpp (five GEMMs a layer) both go through `decode_gemm_packed`, so a new
// packed format is one more case here.
#pragma once
#include <cstdint>

#include "checks.h"
#include "decode_gemm.h"
#include "dispatch.h"

namespace detailflow::cpu {

struct PackedWeightView {
  const void* data;      // the panel layout of decode_gemm.h
  int64_t numel;         // elements of `data`
  DType dtype;           // float32, bfloat16 or int8 (then `scales` is given)
  const float* scales;   // int8: N per-row scales; else null
  int64_t N, K;          // the (N, K) weight it packs
};

// Throws std::invalid_argument naming `what` when `w` is not a valid packed weight.
inline void check_packed_weight(const PackedWeightView& w, const char* what) {
  DF_CHECK(w.data != nullptr, what << ": packed is a null pointer");
  DF_CHECK(w.N > 0 && w.K > 0, what << ": N and K must be > 0, got " << w.N << ", " << w.K);
  const bool int8_w = w.dtype == DType::Int8;
  DF_CHECK(int8_w || w.dtype == DType::Float32 || w.dtype == DType::BFloat16,
           what << ": unsupported packed dtype code " << static_cast<int>(w.dtype)
                << " (expected float32, bfloat16 or int8)");
  DF_CHECK(int8_w == (w.scales != nullptr), what << ": scales must be given exactly for int8 weights ("
                                                  << (w.scales ? "given" : "null") << ")");
  const int64_t want = decode_gemm_packed_numel(w.N, w.K, w.dtype == DType::BFloat16);
  DF_CHECK(w.numel == want, what << ": packed must hold " << want << " elements for N = " << w.N
                                 << ", K = " << w.K << ", got " << w.numel);
}

// y (M, N) = x (M, K) @ W^T through the decode_gemm instantiation for w's format; returns
// the name of the inner loop (decode_gemm_variant). x rows stride ldx, y rows stride ldy.
template <typename X>
const char* decode_gemm_packed(const X* x, int64_t M, int64_t ldx, const PackedWeightView& w, X* y,
                               int64_t ldy, int num_threads) {
  switch (w.dtype) {
    case DType::Int8:
      decode_gemm<X, int8_t>(x, M, w.K, ldx, static_cast<const int8_t*>(w.data), w.scales, w.N, y, ldy,
                             num_threads);
      return decode_gemm_variant<X, int8_t>();
    case DType::BFloat16:
      decode_gemm<X, bf16>(x, M, w.K, ldx, static_cast<const bf16*>(w.data), nullptr, w.N, y, ldy,
                           num_threads);
      return decode_gemm_variant<X, bf16>();
    default:
      decode_gemm<X, float>(x, M, w.K, ldx, static_cast<const float*>(w.data), nullptr, w.N, y, ldy,
                            num_threads);
      return decode_gemm_variant<X, float>();
  }
}

}  // namespace detailflow::cpu
