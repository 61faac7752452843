// Raw-pointer launchers of the CUDA backend. Plain C++ (no torch, no CUDA device code), so
// the torch binding (bindings.cpp, host compiler) and the kernels (*.cu, nvcc) share it, and
// the kernels build with `nvcc -c` on machines whose torch has no CUDA headers.
//
// Every launcher validates nothing about values (the Python layer did), launches nothing for
// empty work, picks 16-byte vector access where sizes and pointers allow it (scalar access
// otherwise), and returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dept_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[b, :m] = prompt; out[b, m + t] = weight[ids[b, t]] + scaling * lora_a[row(b, t)] @ lora_b;
// out[b, m + seq + j] = visual[b, j] (rows copied, any batch and row strides).
// With `task_ids` the parameters are stacked per task and sample b reads task_ids[b]'s slice.
// One struct from the binding to the kernels (as flash-attention's params): the caller fills
// the arguments, `dept_forward` the launch fields below them.
struct ForwardParams {
  const int64_t* ids;     // (batch, seq)
  const void* weight;     // (V, d) of `dtype`, rows `weight_stride` elements apart
  int64_t weight_stride;
  const void* prompt;     // ([T,] m, d) contiguous, of `dtype`; null when m == 0
  const float* lora_a;    // ([T,] L, r) contiguous, or null for no low-rank delta
  const float* lora_b;    // ([T,] r, d) contiguous
  const int64_t* rows;    // (batch, seq) row of lora_a per token, or null: row = position
  const int64_t* task_ids;     // (batch,) task of each sample in [0, T), or null: no tasks
  const int64_t* batch_order;  // (batch,) the samples grouped by task; with task_ids only
  const void* visual;     // (batch, n_v, d) of `dtype`, unit last stride; null when n_v == 0
  int64_t n_v, visual_stride_b, visual_stride_v;  // visual rows per sample, strides (elements)
  float scaling;
  int64_t batch, seq, m, d, r;
  int64_t lora_rows;      // L: rows of lora_a per task
  DType dtype;
  void* out;              // (batch, m + seq + n_v, d) contiguous, of `dtype`
  // Launch fields, set by dept_forward.
  int64_t batch_chunk;    // batch positions per block along grid z (shared-delta kernel)
};

cudaError_t dept_forward(const ForwardParams& params, cudaStream_t stream);

// out[u] = sum over j in [offsets[u], offsets[u + 1]) of grad[src_rows[j]], in fp32, in the
// order of j. Deterministic: a fixed split of the tokens into chunks, no atomics.
struct SegmentSumArgs {
  const void* grad;         // rows of d elements of `dtype`, contiguous
  DType dtype;
  const int64_t* src_rows;  // (tokens,) row of `grad` of each token, grouped by segment
  const int64_t* offsets;   // (segments + 1,), offsets[0] = 0, offsets[segments] = tokens
  int64_t tokens, segments, d;
  float* out;               // (segments, d)
  float* carry;             // (segment_sum_carry_rows(tokens), d) workspace
};

int64_t segment_sum_carry_rows(int64_t tokens);
cudaError_t segment_sum(const SegmentSumArgs& args, cudaStream_t stream);

// out[n] = hidden[n] + table[rows[n]], added in fp32; `out` may be `hidden`.
struct GatherAddArgs {
  const void* hidden;  // (tokens, d) contiguous, of `dtype`
  DType dtype;
  const int64_t* rows;  // (tokens,)
  const void* table;    // (R, d) contiguous, of `table_dtype`
  DType table_dtype;
  int64_t tokens, d;
  void* out;  // (tokens, d) contiguous, of `dtype`
};

cudaError_t gather_add(const GatherAddArgs& args, cudaStream_t stream);

}  // namespace dept_kernels
