// The only pybind11 file: thin entry points that check the invariants the kernels rely on,
// release the GIL and call the kernels in cpu/ and cuda/. Tensors arrive as integer
// addresses + sizes from the Python wrappers (detailflow_engine/ops/), which keep them alive;
// the extension never links libtorch, so one build serves any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <array>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "cache_attention.h"
#include "code_search.h"
#include "decode_gemm.h"
#include "decode_gemm_w4a8.h"
#include "decode_gemm_w8a8.h"
#include "decode_layer.h"
#include "group_sample.h"
#include "prior_step.h"
#include "vq_lookup.h"
#if DETAILFLOW_HAS_CUDA
#include "cache_attention_cuda.h"
#include "code_search_cuda.h"
#include "cuda_info.h"
#include "decode_gemm_cuda.h"
#include "group_sample_cuda.h"
#include "vq_lookup_cuda.h"
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

// The argument checks of each op that its CPU and CUDA bindings share; a binding adds the
// limits of its own kernel.
static void check_cache_attention_args(uintptr_t q, const std::array<int64_t, 4>& q_s, uintptr_t k_new,
                                       const std::array<int64_t, 4>& k_s, uintptr_t v_new,
                                       const std::array<int64_t, 4>& v_s, uintptr_t k_cache,
                                       uintptr_t v_cache, uintptr_t out, const std::array<int64_t, 4>& out_s,
                                       int64_t B, int64_t H, int64_t n_q, int64_t d, int64_t L_max,
                                       int64_t start_pos) {
  DF_CHECK_PTR(q); DF_CHECK_PTR(k_new); DF_CHECK_PTR(v_new); DF_CHECK_PTR(k_cache);
  DF_CHECK_PTR(v_cache); DF_CHECK_PTR(out);
  DF_CHECK_POSITIVE(B); DF_CHECK_POSITIVE(H); DF_CHECK_POSITIVE(n_q); DF_CHECK_POSITIVE(d);
  DF_CHECK_NONNEG(start_pos);
  DF_CHECK(start_pos + n_q <= L_max, "start_pos + n_q must be <= L_max, got " << start_pos
                                         << " + " << n_q << " > " << L_max);
  DF_CHECK(q_s[3] == 1 && k_s[3] == 1 && v_s[3] == 1 && out_s[3] == 1,
           "q, k_new, v_new, out need a unit last stride, got " << q_s[3] << ", " << k_s[3]
                                                                 << ", " << v_s[3] << ", " << out_s[3]);
}

static void check_vq_lookup_args(uintptr_t codes, const std::array<int64_t, 2>& codes_s, int64_t B,
                                 int64_t T, uintptr_t codebook, const std::array<int64_t, 2>& cb_s,
                                 int64_t K, int64_t D, uintptr_t weight, const std::array<int64_t, 2>& w_s,
                                 int64_t C, uintptr_t pos, const std::array<int64_t, 2>& pos_s,
                                 int64_t pos_rows, uintptr_t out) {
  DF_CHECK_PTR(codes); DF_CHECK_PTR(codebook); DF_CHECK_PTR(weight); DF_CHECK_PTR(out);
  DF_CHECK_POSITIVE(B); DF_CHECK_POSITIVE(T); DF_CHECK_POSITIVE(K); DF_CHECK_POSITIVE(D);
  DF_CHECK_POSITIVE(C);
  DF_CHECK(codes_s[1] == 1 && cb_s[1] == 1 && w_s[1] == 1 && (pos == 0 || pos_s[1] == 1),
           "codes, codebook, weight, pos_embed need a unit last stride");
  DF_CHECK(pos == 0 || pos_rows >= T, "pos_embed needs >= T = " << T << " rows, got " << pos_rows);
}

static void check_code_search_args(uintptr_t latents, const std::array<int64_t, 2>& lat_s, int64_t N,
                                   int64_t D, uintptr_t codebook, const std::array<int64_t, 2>& cb_s,
                                   int64_t K, uintptr_t out) {
  DF_CHECK_PTR(latents); DF_CHECK_PTR(codebook); DF_CHECK_PTR(out);
  DF_CHECK_POSITIVE(N); DF_CHECK_POSITIVE(D); DF_CHECK_POSITIVE(K);
  DF_CHECK(lat_s[1] == 1 && cb_s[1] == 1, "latents and codebook need a unit last stride, got "
                                              << lat_s[1] << ", " << cb_s[1]);
}

// cache_attention: q/k_new/v_new/out are (B, H, n_q, d) views with unit last stride,
// k_cache/v_cache contiguous (B, H, L_max, d); see cpu/cache_attention.cpp.
static void cache_attention_cpu(uintptr_t q, std::array<int64_t, 4> q_s, uintptr_t k_new,
                                std::array<int64_t, 4> k_s, uintptr_t v_new,
                                std::array<int64_t, 4> v_s, uintptr_t k_cache, uintptr_t v_cache,
                                uintptr_t out, std::array<int64_t, 4> out_s, int64_t B, int64_t H,
                                int64_t n_q, int64_t d, int64_t L_max, int64_t start_pos,
                                double scale, int dtype, int num_threads) {
  check_cache_attention_args(q, q_s, k_new, k_s, v_new, v_s, k_cache, v_cache, out, out_s, B, H, n_q, d,
                             L_max, start_pos);
  using detailflow::cpu::BhnStrides;
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "cache_attention", [&] {
    using P = const scalar_t*;
    detailflow::cpu::cache_attention<scalar_t>(
        reinterpret_cast<P>(q), BhnStrides{q_s[0], q_s[1], q_s[2]}, reinterpret_cast<P>(k_new),
        BhnStrides{k_s[0], k_s[1], k_s[2]}, reinterpret_cast<P>(v_new),
        BhnStrides{v_s[0], v_s[1], v_s[2]}, reinterpret_cast<scalar_t*>(k_cache),
        reinterpret_cast<scalar_t*>(v_cache), reinterpret_cast<scalar_t*>(out),
        BhnStrides{out_s[0], out_s[1], out_s[2]}, B, H, n_q, d, L_max, start_pos,
        static_cast<float>(scale), num_threads);
  });
}

// vq_lookup: codes (B, T) int64; codebook (K, D); weight (C, D); bias (C,) or 0; pos_embed
// (pos_rows >= T, C) or 0; each with (row, last) strides; out contiguous (B, T, C) in the
// weight's dtype; see cpu/vq_lookup.cpp. A code outside [0, K) raises, naming it.
static void vq_lookup_cpu(uintptr_t codes, std::array<int64_t, 2> codes_s, int64_t B, int64_t T,
                          uintptr_t codebook, std::array<int64_t, 2> cb_s, int64_t K, int64_t D,
                          int cb_dtype, uintptr_t weight, std::array<int64_t, 2> w_s, int64_t C,
                          uintptr_t bias, uintptr_t pos, std::array<int64_t, 2> pos_s,
                          int64_t pos_rows, uintptr_t out, int dtype, int num_threads) {
  check_vq_lookup_args(codes, codes_s, B, T, codebook, cb_s, K, D, weight, w_s, C, pos, pos_s, pos_rows, out);
  const auto* c = reinterpret_cast<const int64_t*>(codes);
  int64_t bad = -1;
  {
    py::gil_scoped_release release;
    DF_DISPATCH_FLOAT(cb_dtype, "vq_lookup codebook", [&] {
      using E = scalar_t;
      DF_DISPATCH_FLOAT(dtype, "vq_lookup weight", [&] {
        using P = const scalar_t*;
        bad = detailflow::cpu::vq_lookup<E, scalar_t>(
            c, B, T, codes_s[0], reinterpret_cast<const E*>(codebook), K, D, cb_s[0],
            reinterpret_cast<P>(weight), C, w_s[0], reinterpret_cast<P>(bias),
            reinterpret_cast<P>(pos), pos_s[0], reinterpret_cast<scalar_t*>(out), num_threads);
      });
    });
  }
  DF_CHECK(bad < 0, "codes must be in [0, " << K << "), got " << c[bad / T * codes_s[0] + bad % T]
                        << " at (" << bad / T << ", " << bad % T << ")");
}

// code_search: latents (N, D), codebook (K, D), each with (row, last) strides; out (N,) int64;
// see cpu/code_search.cpp.
static void code_search_cpu(uintptr_t latents, std::array<int64_t, 2> lat_s, int64_t N, int64_t D,
                            int lat_dtype, uintptr_t codebook, std::array<int64_t, 2> cb_s,
                            int64_t K, int cb_dtype, bool codebook_normalized, uintptr_t out,
                            int num_threads) {
  check_code_search_args(latents, lat_s, N, D, codebook, cb_s, K, out);
  DF_CHECK(K <= INT32_MAX - 64, "K must be < 2^31 - 64 (int32 lane indices), got " << K);
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(lat_dtype, "code_search latents", [&] {
    using Z = scalar_t;
    DF_DISPATCH_FLOAT(cb_dtype, "code_search codebook", [&] {
      detailflow::cpu::code_search<Z, scalar_t>(
          reinterpret_cast<const Z*>(latents), N, D, lat_s[0],
          reinterpret_cast<const scalar_t*>(codebook), K, cb_s[0], codebook_normalized,
          reinterpret_cast<int64_t*>(out), num_threads);
    });
  });
}

// group_sample's argument checks and kernel parameters, shared by the CPU and CUDA bindings.
static detailflow::cpu::GroupSampleParams group_sample_params(
    uintptr_t logits, int64_t R, int64_t n_q, int64_t V, const std::array<int64_t, 3>& strides,
    uintptr_t seeds, uintptr_t positions, int64_t B, double cfg_scale, double temperature, int64_t top_k,
    int64_t top_p24, bool greedy, uintptr_t tokens) {
  DF_CHECK_PTR(logits); DF_CHECK_PTR(seeds); DF_CHECK_PTR(positions); DF_CHECK_PTR(tokens);
  DF_CHECK_POSITIVE(B); DF_CHECK_POSITIVE(n_q); DF_CHECK_POSITIVE(V);
  DF_CHECK(R == B || R == 2 * B, "R must be B or 2B (CFG), got R = " << R << ", B = " << B);
  DF_CHECK(V <= detailflow::kGsMaxVocab, "V must be < 2^23, got " << V);
  DF_CHECK(strides[2] == 1, "logits needs a unit last stride, got " << strides[2]);
  DF_CHECK(top_k == 0 || (top_k >= 2 && top_k < V), "top_k must be 0 or in [2, V), got " << top_k);
  DF_CHECK(top_p24 >= 0 && top_p24 <= detailflow::kGsTopPOne, "top_p24 must be in [0, 2^24], got " << top_p24);
  DF_CHECK(temperature > 0.0, "temperature must be > 0, got " << temperature);
  return detailflow::cpu::GroupSampleParams{B, n_q, V, strides[0], strides[1], R == 2 * B,
                                            static_cast<float>(cfg_scale), static_cast<float>(temperature),
                                            top_k, top_p24, greedy};
}

// group_sample: logits (R, n_q, V) with strides (stride_row, stride_pos, 1), R = B or 2B (CFG);
// seeds (B,), positions (n_q,) int64 contiguous; tokens int64 and logprobs float32 (B, n_q)
// contiguous (logprobs may be 0); see cpu/group_sample.cpp.
static void group_sample_cpu(uintptr_t logits, int dtype, int64_t R, int64_t n_q, int64_t V,
                             std::array<int64_t, 3> strides, uintptr_t seeds, uintptr_t positions,
                             int64_t B, double cfg_scale, double temperature, int64_t top_k,
                             int64_t top_p24, bool greedy, uintptr_t tokens, uintptr_t logprobs,
                             int num_threads) {
  const detailflow::cpu::GroupSampleParams p = group_sample_params(
      logits, R, n_q, V, strides, seeds, positions, B, cfg_scale, temperature, top_k, top_p24, greedy, tokens);
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "group_sample", [&] {
    detailflow::cpu::group_sample<scalar_t>(
        reinterpret_cast<const scalar_t*>(logits), p, reinterpret_cast<const int64_t*>(seeds),
        reinterpret_cast<const int64_t*>(positions), reinterpret_cast<int64_t*>(tokens),
        reinterpret_cast<float*>(logprobs), num_threads);
  });
}

// decode_gemm: x (M, K) with row stride ldx, y (M, N) with row stride ldy (unit last strides),
// packed weights of N x K in the layout of decode_gemm.h (packed_numel elements; int8 W also
// takes `scales`, N fp32 per-row scales, else scales = 0); returns the name of the inner loop
// used; see cpu/decode_gemm.cpp.
static const char* decode_gemm_cpu(uintptr_t x, int64_t M, int64_t K, int64_t ldx, int dtype,
                                   uintptr_t packed, int64_t packed_numel, int w_dtype,
                                   uintptr_t scales, int64_t N, uintptr_t y, int64_t ldy,
                                   int num_threads) {
  DF_CHECK_PTR(x); DF_CHECK_PTR(y);
  DF_CHECK_POSITIVE(M);
  DF_CHECK(M == 1 || (ldx >= K && ldy >= N), "row strides must be >= the row lengths, got ldx = "
                                                 << ldx << " (K = " << K << "), ldy = " << ldy
                                                 << " (N = " << N << ")");
  const detailflow::cpu::PackedWeightView w{reinterpret_cast<const void*>(packed), packed_numel,
                                            static_cast<detailflow::DType>(w_dtype),
                                            reinterpret_cast<const float*>(scales), N, K};
  detailflow::cpu::check_packed_weight(w, "decode_gemm");
  const char* variant = nullptr;
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "decode_gemm x", [&] {
    using X = scalar_t;
    variant = detailflow::cpu::decode_gemm_packed<X>(reinterpret_cast<const X*>(x), M, ldx, w,
                                                     reinterpret_cast<X*>(y), ldy, num_threads);
  });
  return variant;
}

// decode_gemm_int4: as decode_gemm for the int4 layout of decode_gemm.h (packed_numel bytes),
// `scales` the (Np, ceil(K / group), 16) fp32 group scales; returns the inner loop's name.
static const char* decode_gemm_int4_cpu(uintptr_t x, int64_t M, int64_t K, int64_t ldx, int dtype,
                                        uintptr_t packed, int64_t packed_numel, uintptr_t scales,
                                        int64_t group, int64_t N, uintptr_t y, int64_t ldy, int num_threads) {
  DF_CHECK_PTR(x); DF_CHECK_PTR(packed); DF_CHECK_PTR(scales); DF_CHECK_PTR(y);
  DF_CHECK_POSITIVE(M); DF_CHECK_POSITIVE(K); DF_CHECK_POSITIVE(N);
  DF_CHECK(group > 0 && group % 2 == 0, "group must be even and > 0, got " << group);
  DF_CHECK(M == 1 || (ldx >= K && ldy >= N), "row strides must be >= the row lengths, got ldx = "
                                                 << ldx << " (K = " << K << "), ldy = " << ldy
                                                 << " (N = " << N << ")");
  const int64_t want = detailflow::cpu::decode_gemm_int4_packed_numel(N, K);
  DF_CHECK(packed_numel == want, "packed must hold " << want << " bytes for N = " << N << ", K = " << K
                                                     << ", got " << packed_numel);
  const char* variant = nullptr;
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "decode_gemm_int4 x", [&] {
    using X = scalar_t;
    detailflow::cpu::decode_gemm_int4<X>(reinterpret_cast<const X*>(x), M, K, ldx,
                                         reinterpret_cast<const detailflow::cpu::int4x2*>(packed),
                                         reinterpret_cast<const float*>(scales), group, N,
                                         reinterpret_cast<X*>(y), ldy, num_threads);
    variant = detailflow::cpu::decode_gemm_variant<X, detailflow::cpu::int4x2>();
  });
  return variant;
}

// decode_gemm_w8a8: x (M, K) rows stride ldx, y (M, N) rows stride ldy (unit last strides), W8A8
// packed weight of decode_gemm_w8a8.h (packed_numel int8) with N fp32 scales and N int32 column
// sums; returns the inner loop's name; see cpu/decode_gemm_w8a8.cpp.
static const char* decode_gemm_w8a8_cpu(uintptr_t x, int64_t M, int64_t K, int64_t ldx, int dtype,
                                        uintptr_t packed, int64_t packed_numel, uintptr_t scales,
                                        uintptr_t colsum, int64_t N, uintptr_t y, int64_t ldy, int num_threads) {
  DF_CHECK_PTR(x); DF_CHECK_PTR(packed); DF_CHECK_PTR(scales); DF_CHECK_PTR(colsum); DF_CHECK_PTR(y);
  DF_CHECK_POSITIVE(M); DF_CHECK_POSITIVE(N);
  DF_CHECK(K > 0 && K <= detailflow::cpu::kW8A8MaxK,
           "K must be in [1, " << detailflow::cpu::kW8A8MaxK << "] (int32 sums), got " << K);
  DF_CHECK(M == 1 || (ldx >= K && ldy >= N), "row strides must be >= the row lengths, got ldx = "
                                                 << ldx << " (K = " << K << "), ldy = " << ldy
                                                 << " (N = " << N << ")");
  const int64_t want = detailflow::cpu::decode_gemm_w8a8_packed_numel(N, K);
  DF_CHECK(packed_numel == want, "packed must hold " << want << " bytes for N = " << N << ", K = " << K
                                                     << ", got " << packed_numel);
  const char* variant = nullptr;
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "decode_gemm_w8a8 x", [&] {
    using X = scalar_t;
    variant = detailflow::cpu::decode_gemm_w8a8<X>(
        reinterpret_cast<const X*>(x), M, K, ldx, reinterpret_cast<const int8_t*>(packed),
        reinterpret_cast<const float*>(scales), reinterpret_cast<const int32_t*>(colsum), N,
        reinterpret_cast<X*>(y), ldy, num_threads);
  });
  return variant;
}

// decode_gemm_w4a8: x (M, K) rows stride ldx, y (M, N) rows stride ldy (unit last strides), W4A8
// packed weight of decode_gemm_w4a8.h (packed_numel bytes) with its (Np, ceil(K / group), 16)
// fp32 group scales; returns the inner loop's name; see cpu/decode_gemm_w4a8.cpp.
static const char* decode_gemm_w4a8_cpu(uintptr_t x, int64_t M, int64_t K, int64_t ldx, int dtype,
                                        uintptr_t packed, int64_t packed_numel, uintptr_t group_scales,
                                        int64_t group, int64_t N, uintptr_t y, int64_t ldy, int num_threads) {
  DF_CHECK_PTR(x); DF_CHECK_PTR(packed); DF_CHECK_PTR(group_scales); DF_CHECK_PTR(y);
  DF_CHECK_POSITIVE(M); DF_CHECK_POSITIVE(N); DF_CHECK_POSITIVE(K);
  DF_CHECK(group >= 8 && group % 8 == 0 && group <= detailflow::cpu::kW4A8MaxGroup,
           "group must be a multiple of 8 in [8, " << detailflow::cpu::kW4A8MaxGroup << "], got " << group);
  DF_CHECK(M == 1 || (ldx >= K && ldy >= N), "row strides must be >= the row lengths, got ldx = "
                                                 << ldx << " (K = " << K << "), ldy = " << ldy
                                                 << " (N = " << N << ")");
  const int64_t want = detailflow::cpu::decode_gemm_w4a8_packed_numel(N, K);
  DF_CHECK(packed_numel == want, "packed must hold " << want << " bytes for N = " << N << ", K = " << K
                                                     << ", got " << packed_numel);
  const char* variant = nullptr;
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "decode_gemm_w4a8 x", [&] {
    using X = scalar_t;
    variant = detailflow::cpu::decode_gemm_w4a8<X>(
        reinterpret_cast<const X*>(x), M, K, ldx, reinterpret_cast<const uint8_t*>(packed),
        reinterpret_cast<const float*>(group_scales), group, N, reinterpret_cast<X*>(y), ldy, num_threads);
  });
  return variant;
}

// A packed weight from Python (ops/decode_gemm.py kernel_descriptor): (packed address, numel,
// dtype code, scales address or 0, N, K, format code, column sums address or 0, int4 group or 0).
using PackedArg = std::tuple<uintptr_t, int64_t, int, uintptr_t, int64_t, int64_t, int, uintptr_t, int64_t>;

static detailflow::cpu::PackedWeightView packed_view(const PackedArg& p, int64_t N, int64_t K,
                                                     const char* what) {
  const detailflow::cpu::PackedWeightView w{
      reinterpret_cast<const void*>(std::get<0>(p)), std::get<1>(p),
      static_cast<detailflow::DType>(std::get<2>(p)), reinterpret_cast<const float*>(std::get<3>(p)),
      std::get<4>(p), std::get<5>(p), static_cast<detailflow::cpu::PackedFormat>(std::get<6>(p)),
      reinterpret_cast<const int32_t*>(std::get<7>(p)), std::get<8>(p)};
  detailflow::cpu::check_packed_weight(w, what);
  DF_CHECK(w.N == N && w.K == K, what << " must be (" << N << ", " << K << "), got (" << w.N << ", "
                                      << w.K << ")");
  return w;
}

// The checks of one decode step's activations that decode_layer and DecodeLayerStack::run share.
static void check_decode_step(uintptr_t h, int64_t ldh, uintptr_t y, int64_t ldy, uintptr_t h_out,
                              uintptr_t y_out, uintptr_t freqs, int64_t B, int64_t n, int64_t H, int64_t d,
                              int64_t L_max, int64_t start, int sum_lanes) {
  DF_CHECK_PTR(h); DF_CHECK_PTR(h_out); DF_CHECK_PTR(y_out); DF_CHECK_PTR(freqs);
  DF_CHECK_POSITIVE(B); DF_CHECK_POSITIVE(n); DF_CHECK_POSITIVE(H); DF_CHECK_POSITIVE(d);
  DF_CHECK_NONNEG(start);
  DF_CHECK(d % 2 == 0, "head dim d must be even (rotary pairs), got " << d);
  DF_CHECK(start + n <= L_max, "start + n must be <= L_max, got " << start << " + " << n << " > " << L_max);
  DF_CHECK(sum_lanes >= 1 && sum_lanes <= 16, "sum_lanes must be in [1, 16], got " << sum_lanes);
  DF_CHECK(ldh >= H * d && ldy >= H * d, "row strides must be >= dim = " << H * d << ", got ldh = " << ldh
                                                                         << ", ldy = " << ldy);
}

// One layer's five packed weights (wqkv, wo, w1, w3, w2), each checked against (dim, F).
struct LayerWeightViews {
  detailflow::cpu::PackedWeightView wqkv, wo, w1, w3, w2;
};

static LayerWeightViews layer_weight_views(const std::array<PackedArg, 5>& weights, int64_t dim) {
  const int64_t F = std::get<4>(weights[2]);
  return {packed_view(weights[0], 3 * dim, dim, "wqkv"), packed_view(weights[1], dim, dim, "wo"),
          packed_view(weights[2], F, dim, "w1"), packed_view(weights[3], F, dim, "w3"),
          packed_view(weights[4], dim, F, "w2")};
}

template <typename T>
static detailflow::cpu::DecodeLayerArgs<T> layer_args(uintptr_t h, int64_t ldh, uintptr_t y, int64_t ldy,
                                                      uintptr_t h_out, uintptr_t y_out, const LayerWeightViews& w,
                                                      uintptr_t ffn_norm, uintptr_t next_norm, uintptr_t freqs,
                                                      uintptr_t k_cache, uintptr_t v_cache, int64_t B, int64_t n,
                                                      int64_t H, int64_t d, int64_t L_max, int64_t start,
                                                      double eps, double scale, int sum_lanes) {
  return {reinterpret_cast<const T*>(h), ldh, reinterpret_cast<const T*>(y), ldy, reinterpret_cast<T*>(h_out),
          reinterpret_cast<T*>(y_out), w.wqkv, w.wo, w.w1, w.w3, w.w2, reinterpret_cast<const T*>(ffn_norm),
          reinterpret_cast<const T*>(next_norm), reinterpret_cast<const float*>(freqs),
          reinterpret_cast<T*>(k_cache), reinterpret_cast<T*>(v_cache), B, n, H, d, L_max, start,
          static_cast<float>(eps), static_cast<float>(scale), sum_lanes};
}

// decode_layer: h, y (M = B * n rows, dim = H * d) with row strides ldh, ldy (unit last
// stride); h_out, y_out contiguous (M, dim); weights = (wqkv, wo, w1, w3, w2) packed; norms
// (dim,); freqs (n, d / 2, 2) fp32 contiguous; caches contiguous (B, H, L_max, d); all float
// tensors of `dtype`; see cpu/decode_layer.cpp.
static void decode_layer_cpu(uintptr_t h, int64_t ldh, uintptr_t y, int64_t ldy, uintptr_t h_out,
                             uintptr_t y_out, std::array<PackedArg, 5> weights, uintptr_t ffn_norm,
                             uintptr_t next_norm, uintptr_t freqs, uintptr_t k_cache, uintptr_t v_cache,
                             int64_t B, int64_t n, int64_t H, int64_t d, int64_t L_max, int64_t start,
                             double eps, double scale, int sum_lanes, int dtype, int num_threads) {
  check_decode_step(h, ldh, y, ldy, h_out, y_out, freqs, B, n, H, d, L_max, start, sum_lanes);
  DF_CHECK_PTR(y); DF_CHECK_PTR(ffn_norm); DF_CHECK_PTR(next_norm); DF_CHECK_PTR(k_cache); DF_CHECK_PTR(v_cache);
  const LayerWeightViews w = layer_weight_views(weights, H * d);
  py::gil_scoped_release release;
  DF_DISPATCH_FLOAT(dtype, "decode_layer", [&] {
    detailflow::cpu::decode_layer(layer_args<scalar_t>(h, ldh, y, ldy, h_out, y_out, w, ffn_norm, next_norm, freqs,
                                                       k_cache, v_cache, B, n, H, d, L_max, start, eps, scale,
                                                       sum_lanes),
                                  num_threads);
  });
}

// One layer of a DecodeLayerStack: (wqkv, wo, w1, w3, w2) packed, ffn_norm, next_norm, k_cache, v_cache.
using StackLayerArg = std::tuple<std::array<PackedArg, 5>, uintptr_t, uintptr_t, uintptr_t, uintptr_t>;

// decode_layers: every layer of a prior for one decode step in one call (ops/decode_layer.py's
// LayerStack builds it once). The layers' weights, norms and caches are checked here once; a step
// passes only its activations (cpu::decode_layers: layer 0 reads (h, y), the later layers run in
// place on (h_out, y_out)). With a first_norm (its address, else 0), run() may take y = 0: then
// y = rmsnorm(h) * first_norm is computed first, into y_out (the first layer's attention_norm).
class DecodeLayerStack {
 public:
  DecodeLayerStack(int dtype, int64_t B, int64_t H, int64_t d, int64_t L_max, const std::vector<StackLayerArg>& layers,
                   uintptr_t first_norm)
      : dtype_(dtype), B_(B), H_(H), d_(d), L_max_(L_max), scale_(1.0 / std::sqrt(static_cast<double>(d))),
        first_norm_(first_norm) {
    DF_CHECK_POSITIVE(B); DF_CHECK_POSITIVE(H); DF_CHECK_POSITIVE(d); DF_CHECK_POSITIVE(L_max);
    DF_CHECK(!layers.empty(), "layers must not be empty");
    const auto code = static_cast<detailflow::DType>(dtype);
    DF_CHECK(code == detailflow::DType::Float32 || code == detailflow::DType::BFloat16,
             "unsupported dtype code " << dtype << " (expected float32 or bfloat16)");
    for (const auto& [weights, ffn_norm, next_norm, k_cache, v_cache] : layers) {
      DF_CHECK_PTR(ffn_norm); DF_CHECK_PTR(next_norm); DF_CHECK_PTR(k_cache); DF_CHECK_PTR(v_cache);
      const LayerWeightViews w = layer_weight_views(weights, H * d);
      layers_.push_back({w.wqkv, w.wo, w.w1, w.w3, w.w2, reinterpret_cast<const void*>(ffn_norm),
                         reinterpret_cast<const void*>(next_norm), reinterpret_cast<void*>(k_cache),
                         reinterpret_cast<void*>(v_cache)});
    }
  }

  size_t size() const { return layers_.size(); }

  // (h, y) of n positions at [start, start + n) -> (h_out, y_out) after the last layer.
  void run(uintptr_t h, int64_t ldh, uintptr_t y, int64_t ldy, uintptr_t h_out, uintptr_t y_out, uintptr_t freqs,
           int64_t n, int64_t start, double eps, int sum_lanes, int num_threads) const {
    check_decode_step(h, ldh, y, ldy, h_out, y_out, freqs, B_, n, H_, d_, L_max_, start, sum_lanes);
    DF_CHECK(y != 0 || first_norm_ != 0, "y is a null pointer and the stack has no first_norm");
    py::gil_scoped_release release;
    DF_DISPATCH_FLOAT(dtype_, "decode_layers", [&] {
      using T = scalar_t;
      detailflow::cpu::decode_layers<T>(layers_, reinterpret_cast<const T*>(first_norm_), reinterpret_cast<const T*>(h),
                                        ldh, reinterpret_cast<const T*>(y), ldy, reinterpret_cast<T*>(h_out),
                                        reinterpret_cast<T*>(y_out), reinterpret_cast<const float*>(freqs), B_, n, H_,
                                        d_, L_max_, start, static_cast<float>(eps), static_cast<float>(scale_),
                                        sum_lanes, num_threads);
    });
  }

  int dtype() const { return dtype_; }
  int64_t batch() const { return B_; }
  int64_t heads() const { return H_; }
  int64_t head_dim() const { return d_; }
  int64_t max_len() const { return L_max_; }
  double scale() const { return scale_; }
  uintptr_t first_norm() const { return first_norm_; }
  const std::vector<detailflow::cpu::StackLayer>& layers() const { return layers_; }

 private:
  int dtype_;
  int64_t B_, H_, d_, L_max_;
  double scale_;  // softmax 1 / sqrt(d), as the Python wrapper computes it for decode_layer
  uintptr_t first_norm_;
  std::vector<detailflow::cpu::StackLayer> layers_;
};

// prior_step: one decode step of a prior -- embeddings, every layer of a DecodeLayerStack (which
// must have a first_norm), the output head -- in one call (ops/prior_step.py's PriorStepWeights
// builds it once a generation). Tables are (rows, dim) contiguous in the stack's dtype; freqs_cis
// the prior's fp32 (freq_rows, d / 2, 2) rotary table. A step passes its labels, tokens and the
// fp32 logits it fills; every id it reads is checked against its table first.
class PriorStep {
 public:
  PriorStep(const DecodeLayerStack& stack, uintptr_t cls, int64_t cls_rows, uintptr_t tok, int64_t vocab,
            uintptr_t spe, int64_t spe_rows, int64_t causal_num, int64_t group_size, const PackedArg& head,
            uintptr_t freqs_cis, int64_t freq_rows)
      : stack_(stack), cls_(cls), tok_(tok), spe_(spe), cls_rows_(cls_rows), vocab_(vocab), spe_rows_(spe_rows),
        causal_num_(causal_num), group_size_(group_size), freqs_cis_(freqs_cis), freq_rows_(freq_rows),
        head_(packed_view(head, vocab, stack.heads() * stack.head_dim(), "head")) {
    DF_CHECK_PTR(cls); DF_CHECK_PTR(tok); DF_CHECK_PTR(freqs_cis);
    DF_CHECK(stack.first_norm() != 0, "the stack must have a first_norm (layer 0's attention_norm)");
    DF_CHECK_POSITIVE(cls_rows); DF_CHECK_POSITIVE(vocab); DF_CHECK_NONNEG(spe_rows);
    DF_CHECK_NONNEG(causal_num); DF_CHECK_POSITIVE(group_size); DF_CHECK_POSITIVE(freq_rows);
    DF_CHECK(spe_rows >= group_size - 1, "spe_rows must be >= group_size - 1 = " << group_size - 1 << ", got "
                                                                                  << spe_rows);
    DF_CHECK(spe_rows == 0 || spe != 0, "spe is a null pointer");
  }

  // logits (B, n, vocab) fp32 contiguous of positions [start, start + n); labels (B,) int64,
  // tokens (B, num_tokens) int64 with rows stride ldt.
  void run(uintptr_t labels, uintptr_t tokens, int64_t ldt, int64_t num_tokens, int64_t start, int64_t n,
           uintptr_t logits, double eps, int sum_lanes, int num_threads) {
    step(labels, tokens, ldt, num_tokens, start, n, logits, eps, sum_lanes, num_threads, nullptr, 0, 0);
  }

  // run(), then the step's tokens drawn from the logits by group_sample (the arguments of
  // group_sample_cpu for `batch` images; the rows are batch or 2 batch with CFG) and written into
  // `tokens` at columns [start, start + n) of every row of each image (start + n <= num_tokens).
  // positions: the step's n positions. last_sample_seconds then holds the draw's time.
  void run_sampled(uintptr_t labels, uintptr_t tokens, int64_t ldt, int64_t num_tokens, int64_t start, int64_t n,
                   uintptr_t logits, double eps, int sum_lanes, int num_threads, uintptr_t seeds,
                   uintptr_t positions, int64_t batch, double cfg_scale, double temperature, int64_t top_k,
                   int64_t top_p24, bool greedy) {
    const int64_t V = vocab_;
    const detailflow::cpu::GroupSampleParams p = group_sample_params(
        logits, stack_.batch(), n, V, {n * V, V, 1}, seeds, positions, batch, cfg_scale, temperature, top_k,
        top_p24, greedy, tokens);
    DF_CHECK(start + n <= num_tokens, "the step's tokens go to columns [" << start << ", " << start + n
                                          << ") but tokens has " << num_tokens << " columns");
    step(labels, tokens, ldt, num_tokens, start, n, logits, eps, sum_lanes, num_threads, &p, seeds, positions);
  }

  double last_sample_seconds() const { return last_sample_seconds_; }

 private:
  void step(uintptr_t labels, uintptr_t tokens, int64_t ldt, int64_t num_tokens, int64_t start, int64_t n,
            uintptr_t logits, double eps, int sum_lanes, int num_threads,
            const detailflow::cpu::GroupSampleParams* sample, uintptr_t seeds, uintptr_t positions) {
    DF_CHECK_PTR(labels); DF_CHECK_PTR(tokens); DF_CHECK_PTR(logits);
    DF_CHECK_POSITIVE(n); DF_CHECK_NONNEG(start); DF_CHECK_NONNEG(num_tokens);
    DF_CHECK_NONNEG(ldt);
    DF_CHECK(start + n <= stack_.max_len(), "start + n must be <= L_max, got " << start << " + " << n << " > "
                                                                                << stack_.max_len());
    DF_CHECK(start + n <= freq_rows_, "start + n must be <= the rotary table's " << freq_rows_ << " rows, got "
                                                                                 << start << " + " << n);
    DF_CHECK(sum_lanes >= 1 && sum_lanes <= 16, "sum_lanes must be in [1, 16], got " << sum_lanes);
    DF_DISPATCH_FLOAT(stack_.dtype(), "prior_step", [&] {
      using T = scalar_t;
      const detailflow::cpu::PriorStepArgs<T> a{
          {reinterpret_cast<const T*>(cls_), cls_rows_, reinterpret_cast<const T*>(tok_), vocab_,
           reinterpret_cast<const T*>(spe_), spe_rows_, causal_num_, group_size_, stack_.heads() * stack_.head_dim()},
          &stack_.layers(), reinterpret_cast<const T*>(stack_.first_norm()), head_,
          reinterpret_cast<const float*>(freqs_cis_), reinterpret_cast<const int64_t*>(labels),
          reinterpret_cast<const int64_t*>(tokens), ldt, num_tokens, reinterpret_cast<float*>(logits),
          stack_.batch(), n, stack_.heads(), stack_.head_dim(), stack_.max_len(), start, static_cast<float>(eps),
          static_cast<float>(stack_.scale()), sum_lanes, sample, reinterpret_cast<const int64_t*>(seeds),
          reinterpret_cast<const int64_t*>(positions), reinterpret_cast<int64_t*>(tokens)};
      const std::string bad = detailflow::cpu::step_index_error(a);
      DF_CHECK(bad.empty(), bad);
      py::gil_scoped_release release;
      last_sample_seconds_ = detailflow::cpu::prior_step(a, num_threads);
    });
  }

  const DecodeLayerStack& stack_;  // kept alive by the Python object (py::keep_alive)
  uintptr_t cls_, tok_, spe_;
  int64_t cls_rows_, vocab_, spe_rows_, causal_num_, group_size_;
  uintptr_t freqs_cis_;
  int64_t freq_rows_;
  detailflow::cpu::PackedWeightView head_;
  double last_sample_seconds_ = 0.0;
};

#if DETAILFLOW_HAS_CUDA  // the CUDA kernels' bindings

// group_sample (CUDA): the arguments of group_sample_cpu, all device pointers on the current
// device, plus the stream handle; same checks. Launches asynchronously (graph-capturable).
static void group_sample_cuda(uintptr_t logits, int dtype, int64_t R, int64_t n_q, int64_t V,
                              std::array<int64_t, 3> strides, uintptr_t seeds, uintptr_t positions,
                              int64_t B, double cfg_scale, double temperature, int64_t top_k,
                              int64_t top_p24, bool greedy, uintptr_t tokens, uintptr_t logprobs,
                              uintptr_t stream) {
  const detailflow::cpu::GroupSampleParams p = group_sample_params(
      logits, R, n_q, V, strides, seeds, positions, B, cfg_scale, temperature, top_k, top_p24, greedy, tokens);
  py::gil_scoped_release release;
  detailflow::cuda::group_sample(reinterpret_cast<const void*>(logits), dtype, p,
                                 reinterpret_cast<const int64_t*>(seeds),
                                 reinterpret_cast<const int64_t*>(positions),
                                 reinterpret_cast<int64_t*>(tokens), reinterpret_cast<float*>(logprobs),
                                 stream);
}

// vq_lookup on CUDA: the arguments of vq_lookup_cpu as device pointers, and the stream handle
// instead of a thread count; see cuda/vq_lookup.cu. Codes live in device memory, so they are not
// range-checked here (the wrapper does it outside graph capture); the kernel never reads the
// row of a code outside [0, K) and writes NaN for it instead.
static void vq_lookup_cuda(uintptr_t codes, std::array<int64_t, 2> codes_s, int64_t B, int64_t T,
                           uintptr_t codebook, std::array<int64_t, 2> cb_s, int64_t K, int64_t D,
                           int cb_dtype, uintptr_t weight, std::array<int64_t, 2> w_s, int64_t C,
                           uintptr_t bias, uintptr_t pos, std::array<int64_t, 2> pos_s,
                           int64_t pos_rows, uintptr_t out, int dtype, uintptr_t stream) {
  check_vq_lookup_args(codes, codes_s, B, T, codebook, cb_s, K, D, weight, w_s, C, pos, pos_s, pos_rows, out);
  DF_CHECK(D <= detailflow::cuda::kVqLookupMaxD,
           "D must be <= " << detailflow::cuda::kVqLookupMaxD << " on CUDA, got " << D);
  py::gil_scoped_release release;
  detailflow::cuda::vq_lookup(reinterpret_cast<const int64_t*>(codes), B, T, codes_s[0],
                              reinterpret_cast<const void*>(codebook), cb_dtype, K, D, cb_s[0],
                              reinterpret_cast<const void*>(weight), dtype, C, w_s[0],
                              reinterpret_cast<const void*>(bias), reinterpret_cast<const void*>(pos),
                              pos_s[0], reinterpret_cast<void*>(out), stream);
}

// code_search on CUDA: the arguments of code_search_cpu as device pointers, and the stream
// handle instead of a thread count; see cuda/code_search.cu.
static void code_search_cuda(uintptr_t latents, std::array<int64_t, 2> lat_s, int64_t N, int64_t D,
                             int lat_dtype, uintptr_t codebook, std::array<int64_t, 2> cb_s,
                             int64_t K, int cb_dtype, bool codebook_normalized, uintptr_t out,
                             uintptr_t stream) {
  check_code_search_args(latents, lat_s, N, D, codebook, cb_s, K, out);
  DF_CHECK(K <= INT32_MAX, "K must be < 2^31 (int32 indices), got " << K);
  DF_CHECK(D <= detailflow::cuda::kCodeSearchMaxD,
           "D must be <= " << detailflow::cuda::kCodeSearchMaxD << " on CUDA, got " << D);
  py::gil_scoped_release release;
  detailflow::cuda::code_search(reinterpret_cast<const void*>(latents), lat_dtype, N, D, lat_s[0],
                                reinterpret_cast<const void*>(codebook), cb_dtype, K, cb_s[0],
                                codebook_normalized, reinterpret_cast<int64_t*>(out), stream);
}

// cache_attention (CUDA): the CPU entry's contract plus float16; num_splits > 1 splits the keys
// of each head across blocks and then needs `scratch` (fp32, scratch_elems long, allocated by
// the wrapper); launches on `stream`; see cuda/cache_attention.cu.
static void cache_attention_cuda(uintptr_t q, std::array<int64_t, 4> q_s, uintptr_t k_new,
                                 std::array<int64_t, 4> k_s, uintptr_t v_new,
                                 std::array<int64_t, 4> v_s, uintptr_t k_cache, uintptr_t v_cache,
                                 uintptr_t out, std::array<int64_t, 4> out_s, int64_t B, int64_t H,
                                 int64_t n_q, int64_t d, int64_t L_max, int64_t start_pos,
                                 double scale, int dtype, int64_t num_splits, uintptr_t scratch,
                                 int64_t scratch_elems, uintptr_t stream) {
  namespace dc = detailflow::cuda;
  check_cache_attention_args(q, q_s, k_new, k_s, v_new, v_s, k_cache, v_cache, out, out_s, B, H, n_q, d,
                             L_max, start_pos);
  DF_CHECK_POSITIVE(num_splits);
  DF_CHECK(d <= dc::kCacheAttnMaxHeadDim, "head dim d must be <= " << dc::kCacheAttnMaxHeadDim
                                                                   << ", got " << d);
  // grid = (B*H, ceil(n_q / 8), splits); the combine grid has B*H*n_q blocks
  DF_CHECK(B * H * n_q <= 0x7fffffff, "B*H*n_q must be < 2^31, got " << B * H * n_q);
  DF_CHECK(num_splits <= 65535, "num_splits must be <= 65535, got " << num_splits);
  DF_CHECK((n_q + 7) / 8 <= 65535, "n_q must be <= 524280, got " << n_q);
  const int64_t splits = dc::cache_attention_splits(start_pos + n_q, num_splits);
  const int64_t need = dc::cache_attention_scratch_elems(splits, B, H, n_q, d);
  DF_CHECK(need == 0 || (scratch != 0 && scratch_elems >= need),
           "scratch must hold " << need << " floats for " << splits << " splits, got "
                                << scratch_elems << (scratch == 0 ? " (null pointer)" : ""));
  using dc::CacheAttnStrides;
  py::gil_scoped_release release;
  dc::cache_attention(reinterpret_cast<const void*>(q), CacheAttnStrides{q_s[0], q_s[1], q_s[2]},
                      reinterpret_cast<const void*>(k_new), CacheAttnStrides{k_s[0], k_s[1], k_s[2]},
                      reinterpret_cast<const void*>(v_new), CacheAttnStrides{v_s[0], v_s[1], v_s[2]},
                      reinterpret_cast<void*>(k_cache), reinterpret_cast<void*>(v_cache),
                      reinterpret_cast<void*>(out), CacheAttnStrides{out_s[0], out_s[1], out_s[2]},
                      B, H, n_q, d, L_max, start_pos, static_cast<float>(scale), dtype, splits,
                      reinterpret_cast<float*>(scratch), stream);
}

// decode_gemm_cuda: x (M, K) rows with stride ldx, w (N, K) contiguous of x's dtype or int8 with
// N fp32 scales (else scales = 0), y (M, N) rows with stride ldy; `splits` K splits need
// `scratch` of scratch_numel >= splits' * M * N floats (splits' = decode_gemm_cuda_splits);
// see cuda/decode_gemm.cu. Device pointers; runs on `stream`.
static void decode_gemm_cuda(uintptr_t x, int64_t M, int64_t K, int64_t ldx, int dtype, uintptr_t w,
                             int w_dtype, uintptr_t scales, int64_t N, uintptr_t y, int64_t ldy,
                             uintptr_t scratch, int64_t scratch_numel, int64_t splits, uintptr_t stream) {
  DF_CHECK_PTR(x); DF_CHECK_PTR(w); DF_CHECK_PTR(y);
  DF_CHECK_POSITIVE(M); DF_CHECK_POSITIVE(K); DF_CHECK_POSITIVE(N); DF_CHECK_POSITIVE(splits);
  DF_CHECK(M == 1 || (ldx >= K && ldy >= N), "row strides must be >= the row lengths, got ldx = "
                                                 << ldx << " (K = " << K << "), ldy = " << ldy
                                                 << " (N = " << N << ")");
  const bool int8_w = static_cast<detailflow::DType>(w_dtype) == detailflow::DType::Int8;
  DF_CHECK(int8_w || w_dtype == dtype, "w_dtype must equal the x dtype or be int8, got " << w_dtype
                                                                                        << " vs " << dtype);
  DF_CHECK(int8_w == (scales != 0), "scales must be given exactly for int8 weights");
  const int64_t used = detailflow::cuda::decode_gemm_cuda_splits(K, splits);
  DF_CHECK(used == 1 || (scratch != 0 && scratch_numel >= used * M * N),
           "scratch must hold " << used << " * M * N = " << used * M * N << " floats, got "
                                << (scratch ? scratch_numel : 0));
  py::gil_scoped_release release;
  detailflow::cuda::decode_gemm_cuda(reinterpret_cast<const void*>(x), M, K, ldx, dtype,
                                     reinterpret_cast<const void*>(w), w_dtype,
                                     reinterpret_cast<const float*>(scales), N, reinterpret_cast<void*>(y), ldy,
                                     reinterpret_cast<float*>(scratch), used, stream);
}

// decode_gemm_int4_cuda: x (M, K) rows stride ldx, w (N, ceil(K / 2)) uint8 nibbles, group
// scales (Np, ceil(K / group), 16) fp32, y (M, N) rows stride ldy; device pointers, on `stream`.
static void decode_gemm_int4_cuda(uintptr_t x, int64_t M, int64_t K, int64_t ldx, int dtype, uintptr_t w,
                                  uintptr_t scales, int64_t group, int64_t N, uintptr_t y, int64_t ldy,
                                  uintptr_t stream) {
  DF_CHECK_PTR(x); DF_CHECK_PTR(w); DF_CHECK_PTR(scales); DF_CHECK_PTR(y);
  DF_CHECK_POSITIVE(M); DF_CHECK_POSITIVE(K); DF_CHECK_POSITIVE(N);
  DF_CHECK(M == 1 || (ldx >= K && ldy >= N), "row strides must be >= the row lengths, got ldx = "
                                                 << ldx << " (K = " << K << "), ldy = " << ldy);
  py::gil_scoped_release release;
  detailflow::cuda::decode_gemm_int4_cuda(reinterpret_cast<const void*>(x), M, K, ldx, dtype,
                                          reinterpret_cast<const uint8_t*>(w), reinterpret_cast<const float*>(scales),
                                          group, N, reinterpret_cast<void*>(y), ldy, stream);
}
#endif  // DETAILFLOW_HAS_CUDA

PYBIND11_MODULE(_C, m) {
  m.doc() = "DetailFlow Engine kernels (C++/OpenMP, optional CUDA); see detailflow_engine/ops";
  m.attr("has_cpu") = true;
  m.attr("has_cuda") = static_cast<bool>(DETAILFLOW_HAS_CUDA);
  m.def("build_info", &build_info, "What this extension was built with");
  m.def("cache_attention", &cache_attention_cpu, "Append K/V to a static cache, attend (CPU)");
  m.def("vq_lookup", &vq_lookup_cpu, "Gather + normalize codebook rows, project, + bias + pos (CPU)");
  m.def("code_search", &code_search_cpu, "Nearest normalized codeword per normalized latent (CPU)");
  m.def("decode_gemm", &decode_gemm_cpu, "y = x @ W^T for few rows, W pre-packed (CPU)");
  m.def("decode_gemm_int4", &decode_gemm_int4_cpu, "decode_gemm for int4 group-quantized W (CPU)");
  m.def("decode_gemm_force_portable", &detailflow::cpu::decode_gemm_force_portable,
        "Force decode_gemm's portable CPU loops (tests)");
  m.def("decode_gemm_w8a8", &decode_gemm_w8a8_cpu, "decode_gemm with int8 W and per-row int8 x, VNNI (CPU)");
  m.def("decode_gemm_w8a8_force_portable", &detailflow::cpu::decode_gemm_w8a8_force_portable,
        "Force decode_gemm_w8a8's portable CPU loops (tests)");
  m.def("decode_gemm_w4a8", &decode_gemm_w4a8_cpu, "decode_gemm with int4 W and per-row int8 x, VNNI (CPU)");
  m.def("decode_gemm_w4a8_force_portable", &detailflow::cpu::decode_gemm_w4a8_force_portable,
        "Force decode_gemm_w4a8's portable CPU loops (tests)");
  m.def("decode_layer", &decode_layer_cpu, "One prior layer for one decode step (CPU)");
  py::class_<DecodeLayerStack>(m, "DecodeLayerStack", "A prior's layers for decode steps, one call a step (CPU)")
      .def(py::init<int, int64_t, int64_t, int64_t, int64_t, const std::vector<StackLayerArg>&, uintptr_t>())
      .def("__len__", &DecodeLayerStack::size)
      .def("run", &DecodeLayerStack::run, "One decode step through every layer");
  py::class_<PriorStep>(m, "PriorStep", "A prior's decode step: embeddings, every layer, the head, one call (CPU)")
      .def(py::init<const DecodeLayerStack&, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, int64_t,
                    int64_t, const PackedArg&, uintptr_t, int64_t>(),
           py::keep_alive<1, 2>())
      .def("run", &PriorStep::run, "One decode step: fp32 logits of its positions")
      .def("run_sampled", &PriorStep::run_sampled, "One decode step, its tokens drawn and written")
      .def_property_readonly("last_sample_seconds", &PriorStep::last_sample_seconds);
  m.def("group_sample", &group_sample_cpu, "CFG + temperature + top-k/top-p + Philox draw (CPU)");
#if DETAILFLOW_HAS_CUDA
  m.def("decode_gemm_cuda", &decode_gemm_cuda, "y = x @ W^T for few rows, W row-major or int8 (CUDA)");
  m.def("decode_gemm_int4_cuda", &decode_gemm_int4_cuda, "decode_gemm for int4 group-quantized W (CUDA)");
  m.def("vq_lookup_cuda", &vq_lookup_cuda, "Gather + normalize codebook rows, project, + bias + pos (CUDA)");
  m.def("code_search_cuda", &code_search_cuda, "Nearest normalized codeword per normalized latent (CUDA)");
  m.def("group_sample_cuda", &group_sample_cuda, "CFG + temperature + top-k/top-p + Philox draw (CUDA)");
  m.def("cache_attention_cuda", &cache_attention_cuda, "Append K/V to a static cache, attend (CUDA)");
#endif
}
