// A packed decode_gemm weight as one descriptor, and the one place that turns its format and
// dtype into the kernel that streams it. bindings.cpp (decode_gemm) and
// cpu/decode_layer.cpp (five GEMMs a layer) both go through `decode_gemm_packed`, so a new
// packed format is one more case here.
#pragma once
#include <cstdint>

#include "checks.h"
#include "decode_gemm.h"
#include "decode_gemm_w4a8.h"
#include "decode_gemm_w8a8.h"
#include "dispatch.h"

namespace detailflow::cpu {

// Which kernel streams a packed weight (= detailflow_engine/ops/decode_gemm.py PACKED_FORMATS).
enum class PackedFormat : int {
  Dense = 0,  // decode_gemm: float32 / bfloat16 panels, or int8 weight-only with per-row scales
  Int4 = 1,   // decode_gemm_int4: nibble panels (bytes, dtype int8) with group scales
  W8A8 = 2,   // decode_gemm_w8a8: int8 VNNI panels, per-row scales and column sums
  W4A8 = 3,   // decode_gemm_w4a8: int4 nibble VNNI panels with group scales
};

struct PackedWeightView {
  const void* data;      // the panel layout of decode_gemm.h / decode_gemm_w8a8.h
  int64_t numel;         // elements of `data` (bytes for int4 and w8a8)
  DType dtype;           // float32, bfloat16 or int8 (then `scales` is given)
  const float* scales;   // int8 / w8a8: N per-row scales; int4 / w4a8: the panel group scales; else null
  int64_t N, K;          // the (N, K) weight it packs
  PackedFormat format = PackedFormat::Dense;
  const int32_t* colsum = nullptr;  // w8a8: N column sums
  int64_t group = 0;                // int4 / w4a8: k per group scale
};

// Throws std::invalid_argument naming `what` when `w` is not a valid packed weight.
inline void check_packed_weight(const PackedWeightView& w, const char* what) {
  DF_CHECK(w.data != nullptr, what << ": packed is a null pointer");
  DF_CHECK(w.N > 0 && w.K > 0, what << ": N and K must be > 0, got " << w.N << ", " << w.K);
  if (w.format == PackedFormat::W4A8) {
    DF_CHECK(w.dtype == DType::Int8, what << ": w4a8 panels are bytes (dtype code " << static_cast<int>(DType::Int8)
                                          << "), got dtype code " << static_cast<int>(w.dtype));
    DF_CHECK(w.scales != nullptr, what << ": group scales must be given for w4a8 weights");
    DF_CHECK(w.group >= 8 && w.group % 8 == 0 && w.group <= kW4A8MaxGroup,
             what << ": w4a8 group must be a multiple of 8 in [8, " << kW4A8MaxGroup << "], got " << w.group);
    const int64_t want = decode_gemm_w4a8_packed_numel(w.N, w.K);
    DF_CHECK(w.numel == want, what << ": packed must hold " << want << " bytes for N = " << w.N << ", K = " << w.K
                                   << ", got " << w.numel);
    return;
  }
  if (w.format == PackedFormat::Int4 || w.format == PackedFormat::W8A8) {
    const bool int4 = w.format == PackedFormat::Int4;
    DF_CHECK(w.dtype == DType::Int8, what << ": " << (int4 ? "int4" : "w8a8") << " panels are bytes (dtype code "
                                          << static_cast<int>(DType::Int8) << "), got dtype code "
                                          << static_cast<int>(w.dtype));
    DF_CHECK(w.scales != nullptr, what << ": scales must be given for " << (int4 ? "int4" : "w8a8") << " weights");
    DF_CHECK(int4 ? (w.group > 0 && w.group % 2 == 0) : (w.colsum != nullptr && w.K <= kW8A8MaxK),
             what << (int4 ? ": int4 group must be even and > 0, got " : ": w8a8 needs column sums and K <= ")
                  << (int4 ? w.group : kW8A8MaxK));
    const int64_t want = int4 ? decode_gemm_int4_packed_numel(w.N, w.K) : decode_gemm_w8a8_packed_numel(w.N, w.K);
    DF_CHECK(w.numel == want, what << ": packed must hold " << want << " bytes for N = " << w.N << ", K = " << w.K
                                   << ", got " << w.numel);
    return;
  }
  DF_CHECK(w.format == PackedFormat::Dense, what << ": unknown packed format " << static_cast<int>(w.format));
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
  if (w.format == PackedFormat::W4A8)
    return decode_gemm_w4a8<X>(x, M, w.K, ldx, static_cast<const uint8_t*>(w.data), w.scales, w.group, w.N, y,
                               ldy, num_threads);
  if (w.format == PackedFormat::W8A8)
    return decode_gemm_w8a8<X>(x, M, w.K, ldx, static_cast<const int8_t*>(w.data), w.scales, w.colsum, w.N, y,
                               ldy, num_threads);
  if (w.format == PackedFormat::Int4) {
    decode_gemm_int4<X>(x, M, w.K, ldx, static_cast<const int4x2*>(w.data), w.scales, w.group, w.N, y, ldy,
                        num_threads);
    return decode_gemm_variant<X, int4x2>();
  }
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
