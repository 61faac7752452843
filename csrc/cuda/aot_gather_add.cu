// AoT P-tuning gather-add: out[n] = hidden[n] + table[rows[n]], added in fp32. The contract is
// `gather_add` in dept_kernels/backends/_torch.py; bindings.cpp prepares the arguments.

#include "common.cuh"

namespace dept_kernels {
namespace {

struct GatherAddParams {
  const void* hidden;
  const int64_t* rows;
  const void* table;
  int64_t tokens, d;
  void* out;
};

// Grid: (ceil(tokens / kRowTile), ceil(d / (kLanes * VEC))); thread (lane, warp) owns columns
// [c, c + VEC) of the tokens n0 + i, i < kRowsPerThread, whose 2 * kRowsPerThread loads are
// issued together. `hidden` and `out` may be the same memory (in-place): each element is read
// and then written by the same thread, so they are not declared __restrict__.
// Minimum traffic: 2*tokens*d*sizeof(T) + distinct rows*d*sizeof(Table) + 8*tokens.
template <typename T, typename Table, int VEC>
struct GatherAdd {
  using Params = GatherAddParams;

  static DK_INLINE void run(const Params& p, uint3 block, uint3 thread) {
    const int64_t c = (int64_t(block.y) * kLanes + thread.x) * VEC;
    if (c >= p.d) return;
    const int64_t n0 = int64_t(block.x) * kRowTile + int64_t(thread.y) * kRowsPerThread;
    const T* hidden = static_cast<const T*>(p.hidden);
    const Table* table = static_cast<const Table*>(p.table);
    T* out = static_cast<T*>(p.out);

    Pack<T, VEC> h[kRowsPerThread];
    Pack<Table, VEC> e[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t n = n0 + i;
      if (n >= p.tokens) continue;
      h[i] = load_pack<T, VEC>(hidden + n * p.d + c);
      e[i] = load_pack<Table, VEC>(table + p.rows[n] * p.d + c);
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t n = n0 + i;
      if (n >= p.tokens) continue;
      Pack<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        o.v[j] = from_float<T>(to_float(h[i].v[j]) + to_float(e[i].v[j]));
      store_pack<T, VEC>(out + n * p.d + c, o);
    }
  }
};

template <typename T, typename Table, int VEC>
cudaError_t launch_gather_add(const GatherAddParams& p, cudaStream_t stream) {
  return launch<GatherAdd<T, Table, VEC>>(ceil_div(p.tokens, kRowTile),
                                          ceil_div(p.d, kLanes * VEC), 1, p, stream);
}

}  // namespace

cudaError_t gather_add(const GatherAddArgs& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.d == 0) return cudaSuccess;
  const GatherAddParams p{a.hidden, a.rows, a.table, a.tokens, a.d, a.out};
  return dispatch_float(a.dtype, [&](auto hidden_tag) {
    return dispatch_float(a.table_dtype, [&](auto table_tag) {
      using T = decltype(hidden_tag);
      using Table = decltype(table_tag);
      constexpr int kVec = 16 / sizeof(T);
      // Table packs are kVec elements too: 8 to 32 bytes, aligned to at most 16.
      const bool vec = a.d % kVec == 0 && aligned16(a.hidden) && aligned16(a.out) &&
                       aligned_to(a.table, pack_align(sizeof(Table) * kVec));
      return vec ? launch_gather_add<T, Table, kVec>(p, stream)
                 : launch_gather_add<T, Table, 1>(p, stream);
    });
  });
}

}  // namespace dept_kernels
