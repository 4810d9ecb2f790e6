// prior_step (CPU): one decode step of the prior -- input embeddings, every layer, the output
// head -- in one extension call.
//
// Why: after decode_layers made all layers one call, a batch-1 step of the embedded model
// still crossed into the extension three times more (the embedding gather, the head's
// decode_gemm, the sampler) with Python between: slicing the tokens, torch's embedding (a
// reshape copy of the strided token slice, index_select), a cat for mixed steps, the head
// wrapper's checks, the fp32 cast, the sampler's checks and allocations, the token write.
// That was a fifth of the whole generation in `profile`, and each return to Python let the
// OpenMP team go idle before the next call. Here the step is one call.
//
// Bits: the embedding rows are copies (exact); the layers are decode_layers (the stack's own
// bits); the head is decode_gemm_packed on the final norm's rows, as the prior's DecodeLinear
// calls it, with T outputs, widened to fp32 for bf16 (exact, as `.float()`). So a step is
// bit-identical to the per-op path of ops/prior_step.py's reference whenever decode_layers is,
// and batch-invariant as its kernels are (a row's embedding reads only its own label and tokens).
//
// Sampling (optional, the pipeline's CPU steps): group_sample's own kernel on the fp32 logits,
// then each image's tokens copied into its cond and null rows of the generation's tokens, so
// the step's next call reads them; the same op and bits as sampling after the step.
//
// Test:  python -m pytest tests/ops/test_prior_step.py -q
// Bench: python benchmarks/bench_prior_step.py   (one call vs embedding + decode_layers + head)
#include "prior_step.h"

#include <chrono>
#include <cstring>
#include <sstream>
#include <type_traits>

namespace detailflow::cpu {
namespace {

// The token column position q reads, or -1 for positions that read no token (class, special).
inline int64_t token_column(int64_t q, int64_t c, int64_t g) {
  if (q == 0 || (q > c && q < c + g)) return -1;
  return q <= c ? q - 1 : q - g;
}

}  // namespace

template <typename T>
std::string step_index_error(const PriorStepArgs<T>& a) {
  const StepEmbeddingTables<T>& e = a.emb;
  std::ostringstream msg;
  for (int64_t q = a.start; q < a.start + a.n; ++q) {
    if (q == 0) {
      for (int64_t b = 0; b < a.B; ++b)
        if (a.labels[b] < 0 || a.labels[b] >= e.cls_rows) {
          msg << "labels[" << b << "] = " << a.labels[b] << " is not a class embedding row (0.." << e.cls_rows - 1
              << ")";
          return msg.str();
        }
      continue;
    }
    if (q > e.causal_num && q < e.causal_num + e.group_size) {
      if (q - e.causal_num - 1 >= e.spe_rows) {
        msg << "position " << q << " needs special embedding " << q - e.causal_num - 1 << " of " << e.spe_rows;
        return msg.str();
      }
      continue;
    }
    const int64_t col = token_column(q, e.causal_num, e.group_size);
    if (col >= a.num_tokens) {
      msg << "position " << q << " reads token column " << col << " but tokens has " << a.num_tokens << " columns";
      return msg.str();
    }
    for (int64_t b = 0; b < a.B; ++b) {
      const int64_t t = a.tokens[b * a.ldt + col];
      if (t < 0 || t >= e.vocab) {
        msg << "tokens[" << b << ", " << col << "] = " << t << " is not a token id (0.." << e.vocab - 1 << ")";
        return msg.str();
      }
    }
  }
  return "";
}

template <typename T>
void step_embeddings(const StepEmbeddingTables<T>& e, const int64_t* labels, const int64_t* tokens, int64_t ldt,
                     int64_t B, int64_t start, int64_t n, T* out) {
  const size_t row_bytes = static_cast<size_t>(e.dim) * sizeof(T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t q = start + i;
      const int64_t col = token_column(q, e.causal_num, e.group_size);
      const T* src = q == 0 ? e.cls + labels[b] * e.dim
                     : col < 0 ? e.spe + (q - e.causal_num - 1) * e.dim
                               : e.tok + tokens[b * ldt + col] * e.dim;
      std::memcpy(out + (b * n + i) * e.dim, src, row_bytes);
    }
}

template <typename T>
double prior_step(const PriorStepArgs<T>& a, int num_threads) {
  const int64_t M = a.B * a.n, dim = a.H * a.d, V = a.head.N;
  // Scratch, once per thread and grown as needed: the residual stream h and its norm y (M, dim),
  // and for bf16 the head's bf16 outputs (M, V) before they are widened.
  thread_local std::vector<T> buf;
  const size_t need = static_cast<size_t>(2 * M * dim + (std::is_same_v<T, float> ? 0 : M * V));
  if (buf.size() < need) buf.resize(need);
  T* h = buf.data();
  T* y = h + M * dim;
  step_embeddings(a.emb, a.labels, a.tokens, a.ldt, a.B, a.start, a.n, h);
  decode_layers<T>(*a.layers, a.first_norm, h, dim, nullptr, dim, h, y, a.freqs_cis + a.start * a.d, a.B, a.n, a.H,
                   a.d, a.L_max, a.start, a.eps, a.scale, a.sum_lanes, num_threads);
  if constexpr (std::is_same_v<T, float>) {
    decode_gemm_packed<T>(y, M, dim, a.head, a.logits, V, num_threads);
  } else {
    T* out = y + M * dim;
    decode_gemm_packed<T>(y, M, dim, a.head, out, V, num_threads);
    for (int64_t i = 0; i < M * V; ++i) a.logits[i] = to_float(out[i]);
  }
  if (a.sample == nullptr) return 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  const GroupSampleParams& p = *a.sample;
  thread_local std::vector<int64_t> drawn;  // (batch, n): group_sample's contiguous tokens
  if (drawn.size() < static_cast<size_t>(p.batch * a.n)) drawn.resize(p.batch * a.n);
  group_sample<float>(a.logits, p, a.seeds, a.positions, drawn.data(), nullptr, num_threads);
  for (int64_t r = 0; r < a.B; ++r)
    std::memcpy(a.tokens_out + r * a.ldt + a.start, drawn.data() + (r % p.batch) * a.n, a.n * sizeof(int64_t));
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#define DF_PRIOR_STEP(T)                                                                                    \
  template std::string step_index_error<T>(const PriorStepArgs<T>&);                                      \
  template void step_embeddings<T>(const StepEmbeddingTables<T>&, const int64_t*, const int64_t*, int64_t, \
                                   int64_t, int64_t, int64_t, T*);                                         \
  template double prior_step<T>(const PriorStepArgs<T>&, int);
DF_PRIOR_STEP(float)
DF_PRIOR_STEP(bf16)
#undef DF_PRIOR_STEP

}  // namespace detailflow::cpu
