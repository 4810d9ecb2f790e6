// decode_layer: one transformer layer of the prior for one decode step, in one call.
// Kernel in cpu/decode_layer.cpp; wrapper and torch reference in detailflow_engine/ops/decode_layer.py.
#pragma once
#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "packed_weight.h"

namespace detailflow::cpu {

// M = B * n rows (batch rows x the step's n positions), dim = H * d, F = w1.N.
template <typename T>
struct DecodeLayerArgs {
  const T* h;                    // (M, dim) residual stream in, rows stride ldh
  int64_t ldh;
  const T* y;                    // (M, dim) its attention_norm, rows stride ldy
  int64_t ldy;
  T* h_out;                      // (M, dim) contiguous: the residual after the layer
  T* y_out;                      // (M, dim) contiguous: its next norm (next_norm weights)
  PackedWeightView wqkv, wo, w1, w3, w2;  // (3 dim, dim), (dim, dim), (F, dim) x 2, (dim, F)
  const T* ffn_norm;             // (dim,)
  const T* next_norm;            // (dim,): the next layer's attention_norm or the final norm
  const float* freqs;            // (n, d / 2, 2) [cos, sin] of the step's positions, contiguous
  T* k_cache;                    // contiguous (B, H, L_max, d); rows [start, start + n) written
  T* v_cache;
  int64_t B, n, H, d, L_max, start;
  float eps;                     // RMSNorm epsilon
  float scale;                   // softmax scale (1 / sqrt(d))
  int sum_lanes;                 // lanes of torch's fp32 row sum (the wrapper probes torch: 8 or 16)
};

// (h, y) -> (h_out, y_out) with, in T (float or bf16) as the per-op path rounds:
//   q, k, v = rope(y @ wqkv^T); attn = cache_attention(q, k, v, caches, start)
//   h1 = h + attn @ wo^T;        y1 = rmsnorm(h1) * ffn_norm
//   h_out = h1 + (silu(y1 @ w1^T) * (y1 @ w3^T)) @ w2^T;   y_out = rmsnorm(h_out) * next_norm
template <typename T>
void decode_layer(const DecodeLayerArgs<T>& a, int num_threads);

// One layer as decode_layers reads it: the arguments of decode_layer that stay fixed between
// steps; norms and caches hold the stack's T.
struct StackLayer {
  PackedWeightView wqkv, wo, w1, w3, w2;
  const void* ffn_norm;
  const void* next_norm;
  void* k_cache;
  void* v_cache;
};

// Every layer of `layers` in turn on a step's n positions: layer 0 reads (h, y) and writes
// (h_out, y_out), the later layers run in place on (h_out, y_out) (decode_layer reads each row
// of h in full before writing it, and y only in its first GEMM), so the bits are those of one
// decode_layer call a layer; h may be h_out. y null: y = rmsnorm(h) * first_norm first, into
// y_out (the first layer's attention_norm). freqs: the step's (n, d / 2, 2) rotary rows.
template <typename T>
void decode_layers(const std::vector<StackLayer>& layers, const T* first_norm, const T* h, int64_t ldh, const T* y,
                   int64_t ldy, T* h_out, T* y_out, const float* freqs, int64_t B, int64_t n, int64_t H, int64_t d,
                   int64_t L_max, int64_t start, float eps, float scale, int sum_lanes, int num_threads);

// y (M, dim) contiguous = rmsnorm(h) * weight, h's rows stride ldh: the first layer's
// attention_norm of the embeddings, rounded as decode_layer's norms (add_rmsnorm without a residual).
template <typename T>
void rmsnorm_rows(const T* h, int64_t ldh, const T* weight, int64_t M, int64_t dim, float eps, int sum_lanes, T* y);

}  // namespace detailflow::cpu
