// group_sample (CUDA): host launcher of csrc/cuda/group_sample.cu. Same contract and the same
// tokens, bit for bit, as detailflow::cpu::group_sample (csrc/cpu/group_sample.cpp); logprobs
// agree up to the last-ulp rounding of the device vs host double log. Plain C++ (no CUDA
// types) so bindings.cpp compiles with any host compiler.
#pragma once
#include <cstdint>

#include "group_sample.h"

namespace detailflow::cuda {

// logits: device pointer of dtype code `dtype` (fp32, bf16, fp16; csrc/include/dispatch.h),
// (R, n_q, V) with element strides (p.stride_row, p.stride_pos, 1); seeds int64 (B,),
// positions int64 (n_q,), tokens int64 (B, n_q) contiguous, logprobs float32 (B, n_q)
// contiguous or nullptr; all on the current device. Runs on `stream` (a cudaStream_t as an
// integer), never synchronizes, allocates nothing: safe to capture in a CUDA graph.
void group_sample(const void* logits, int dtype, const cpu::GroupSampleParams& p,
                  const int64_t* seeds, const int64_t* positions, int64_t* tokens,
                  float* logprobs, uintptr_t stream);

}  // namespace detailflow::cuda
