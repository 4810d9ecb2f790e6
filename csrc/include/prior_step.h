// prior_step: one decode step of the prior in one call -- the input embeddings of its positions,
// every layer (decode_layer), the output head (decode_gemm_packed) -- so that a step crosses
// from Python into the extension once. Kernel in cpu/prior_step.cpp; wrapper and torch
// reference in detailflow_engine/ops/prior_step.py.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "decode_layer.h"
#include "dispatch.h"
#include "group_sample.h"
#include "packed_weight.h"

namespace detailflow::cpu {

// The three embedding tables a step reads, each (rows, dim) contiguous in T, and where each
// sequence position takes its input from (prior.py's table, c = causal_num, g = group_size):
//   q = 0          cls[label]          1 <= q <= c    tok[tokens[q - 1]]
//   c < q < c + g  spe[q - c - 1]      q >= c + g     tok[tokens[q - g]]
template <typename T>
struct StepEmbeddingTables {
  const T* cls;
  int64_t cls_rows;  // num_classes (+ 1: the null class of CFG)
  const T* tok;
  int64_t vocab;
  const T* spe;
  int64_t spe_rows;  // special embeddings (>= g - 1)
  int64_t causal_num, group_size, dim;
};

template <typename T>
struct PriorStepArgs {
  StepEmbeddingTables<T> emb;
  const std::vector<StackLayer>* layers;  // every layer, in order (their norms and caches in T)
  const T* first_norm;      // (dim,): layer 0's attention_norm
  PackedWeightView head;    // (vocab, dim): the output linear
  const float* freqs_cis;   // (>= start + n rows, d / 2, 2) fp32: the prior's rotary table
  const int64_t* labels;    // (B,) class ids of the rows (null rows: the null class)
  const int64_t* tokens;    // (B, num_tokens) tokens so far, rows stride ldt
  int64_t ldt, num_tokens;
  float* logits;            // (B, n, vocab) fp32 out, contiguous
  int64_t B, n, H, d, L_max, start;
  float eps;
  float scale;              // softmax 1 / sqrt(d)
  int sum_lanes;
  // Optional (sample null: logits only): draw the step's tokens from the logits (group_sample
  // with these params; batch = the images, the rows B = batch or 2 batch with CFG) and write
  // each image's into every row of that image (rows b, b + batch) at columns [start, start + n).
  const GroupSampleParams* sample = nullptr;
  const int64_t* seeds = nullptr;      // (batch,) the images' seeds
  const int64_t* positions = nullptr;  // (n,) the step's positions (the draw's counters)
  int64_t* tokens_out = nullptr;       // = tokens (B, num_tokens), rows stride ldt
};

// "" when every label and token the step reads is a valid table row, else what is wrong
// (checked before the step runs: a bad id must not read outside a table).
template <typename T>
std::string step_index_error(const PriorStepArgs<T>& a);

// (B, n, dim) contiguous: the input embeddings of positions [start, start + n).
template <typename T>
void step_embeddings(const StepEmbeddingTables<T>& e, const int64_t* labels, const int64_t* tokens, int64_t ldt,
                     int64_t B, int64_t start, int64_t n, T* out);

// logits = head(final norm after every layer of embed(positions [start, start + n))), as fp32
// (bf16: the head's bf16 outputs widened, as `.float()` does), then the tokens drawn from them
// when a.sample is given. The caches are written as decode_layer writes them. Returns the
// seconds the draw took (0 without one): what `profile` charges to its sampling stage.
template <typename T>
double prior_step(const PriorStepArgs<T>& a, int num_threads);

}  // namespace detailflow::cpu
