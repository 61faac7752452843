// Fused DePT input embedding (forward) and the deterministic segmented sum of its backward.
// The contract is dept_kernels/backends/_torch.py; bindings.cpp prepares the arguments.

#include "common.cuh"

namespace dept_kernels {
namespace {

// Ranks of the factors a block stages in shared memory per step: up to 8 KiB of lora_b, four
// loads per thread, all in flight together, so forming a delta costs one memory latency per
// kStageRanks ranks (r = 40 in bf16: 5, not the 20 of a per-thread loop unrolled twice), and
// the warps of a block, which share their columns, read lora_b from L2 once instead of once
// each. At most 16 ranks: the scalar (VEC = 1) kernels hold their share of the copy in
// registers too. (Twice the ranks per step spilled ForwardSharedDelta<bf16> on sm_90 at 128
// registers, as did unrolling the product loop below; 64 ranks spilled the scalar kernels.)
template <int VEC>
constexpr int kStageRanks = 64 / VEC < 16 ? 64 / VEC : 16;

template <int VEC>
struct LowRankStage {
  float b[kStageRanks<VEC>][kLanes * VEC];  // lora_b[k0 + kk, the block's columns]
  float a[kRowTile][kStageRanks<VEC>];      // lora_a[row of block row x, k0 + kk]
};

// delta[i][j] = sum over k of A_x[k] * lora_b[k, c + j] for this thread's rows x = thread.y *
// kRowsPerThread + i of the block, then delta *= scaling (the reference's order: the product
// first, then the scale). `row_a(x)` is the lora_a row of block row x, null for rows without a
// delta. The factors are staged in shared memory by the whole block: every thread of the block
// calls this, with the same arguments but `thread`. Assigning (not accumulating) lets a
// recomputation reuse delta's registers.
template <int VEC, typename RowA>
DK_INLINE void lowrank_rows(const RowA& row_a, const float* lora_b, int64_t r, int64_t d,
                            int64_t col0, uint3 thread, float scaling,
                            float (&delta)[kRowsPerThread][VEC]) {
  constexpr int kRanks = kStageRanks<VEC>;
  DK_SHARED LowRankStage<VEC> stage;
  const StageShare<kRanks * kLanes> b_share(thread);
  const StageShare<kRowTile * kRanks> a_share(thread);
  const int x0 = int(thread.y) * kRowsPerThread;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) delta[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < r; k0 += kRanks) {
    const int kn = int(min64(kRanks, r - k0));
    // All loads of the copy first, then the shared stores: one memory latency per step.
    Pack<float, VEC> b[decltype(b_share)::kCount];
    float a[decltype(a_share)::kCount];
#pragma unroll
    for (int k = 0; k < decltype(b_share)::kCount; ++k) {
      const int q = b_share.item(k), kk = q / kLanes;
      const int64_t c = col0 + int64_t(q % kLanes) * VEC;
      b[k] = Pack<float, VEC>{};
      if (b_share.has(k) && kk < kn && c < d)
        b[k] = load_pack<float, VEC>(lora_b + (k0 + kk) * d + c);
    }
#pragma unroll
    for (int k = 0; k < decltype(a_share)::kCount; ++k) {
      const int q = a_share.item(k), kk = q % kRanks;
      const float* row = a_share.has(k) ? row_a(q / kRanks) : nullptr;
      a[k] = row != nullptr && kk < kn ? row[k0 + kk] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < decltype(b_share)::kCount; ++k) {
      const int q = b_share.item(k);
      if (b_share.has(k))
        *reinterpret_cast<Pack<float, VEC>*>(&stage.b[q / kLanes][(q % kLanes) * VEC]) = b[k];
    }
#pragma unroll
    for (int k = 0; k < decltype(a_share)::kCount; ++k) {
      const int q = a_share.item(k);
      if (a_share.has(k)) stage.a[q / kRanks][q % kRanks] = a[k];
    }
    DK_SYNC();
#pragma unroll 1
    for (int kk = 0; kk < kn; ++kk) {
      const Pack<float, VEC> bk =
          *reinterpret_cast<const Pack<float, VEC>*>(&stage.b[kk][thread.x * VEC]);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float aik = stage.a[x0 + i][kk];
#pragma unroll
        for (int j = 0; j < VEC; ++j) delta[i][j] += aik * bk.v[j];
      }
    }
    DK_SYNC();  // the next step overwrites the stage
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) delta[i][j] *= scaling;
}

// Source row q of sample b in the virtual sequence (prompt rows q < m, token rows q = m + t,
// visual rows q = m + seq + j) when it is not a token row: task k's prompt or b's visual row.
template <typename T>
DK_INLINE const T* copied_row(const ForwardParams& p, int64_t b, int64_t k, int64_t q) {
  if (q < p.m) return static_cast<const T*>(p.prompt) + (k * p.m + q) * p.d;
  return static_cast<const T*>(p.visual) + b * p.visual_stride_b +
         (q - p.m - p.seq) * p.visual_stride_v;
}

// One rounding of the fp32 sum, as in the reference.
template <typename T, int VEC>
DK_INLINE Pack<T, VEC> add_delta(const Pack<T, VEC>& e, const float (&delta)[VEC]) {
  Pack<T, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(to_float(e.v[j]) + delta[j]);
  return o;
}

// Row = position, with a low-rank delta: the delta of a (kRowTile positions x kLanes * VEC
// columns) tile is formed once per block, in registers, and added to the tile's rows in every
// batch of the block's chunk, so the low-rank work is s*r*d per batch chunk, not B*s*r*d.
// With tasks the chunk is a range of the task-sorted batch order and the delta is formed
// again only where the task changes: (distinct tasks + chunks)*s*r*d.
// Grid: (ceil((m + s) / kRowTile), ceil(d / (kLanes * VEC)), ceil(B / batch_chunk)); thread
// (lane, warp) owns columns [c, c + VEC) of the rows q0 + i, i < kRowsPerThread, of the
// virtual sequence prompt rows (q < m), token rows (q = m + t), then visual rows (q = m + s + j,
// copied; no delta).
// Minimum traffic: B*s*d*sizeof(T) (embedding rows) + B*(m+s+n_v)*d*sizeof(T) (output)
// + B*n_v*d*sizeof(T) (visual rows)
// + T*m*d*sizeof(T) + 4*T*(s*r + r*d) (prompts and factors of the tasks present, read once).
template <typename T, int VEC>
struct ForwardSharedDelta {
  using Params = ForwardParams;

  static DK_INLINE void run(const Params& p, uint3 block, uint3 thread) {
    const int64_t col0 = int64_t(block.y) * kLanes * VEC;
    const int64_t c = col0 + int64_t(thread.x) * VEC;
    // Threads past d stay for the block's barriers (d % VEC == 0: a pack is in or out).
    const bool live = c < p.d;
    const int64_t width = p.m + p.seq + p.n_v;
    const int64_t qb = int64_t(block.x) * kRowTile;  // the block's first row
    const int64_t q0 = qb + int64_t(thread.y) * kRowsPerThread;
    const int64_t i0 = int64_t(block.z) * p.batch_chunk;
    const int64_t i1 = min64(i0 + p.batch_chunk, p.batch);
    const T* weight = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out);

    bool valid[kRowsPerThread], token[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t q = q0 + i;
      valid[i] = live && q < width;
      token[i] = valid[i] && q >= p.m && q < p.m + p.seq;
    }
    // Batch position i holds sample order[i] with tasks, else sample i.
    const auto sample = [&](int64_t i) { return p.batch_order != nullptr ? p.batch_order[i] : i; };
    const auto task_of = [&](int64_t b) -> int64_t { return p.task_ids != nullptr ? p.task_ids[b] : 0; };
    const auto form_delta = [&](int64_t k, float(&delta)[kRowsPerThread][VEC]) {
      const auto row_a = [&](int x) -> const float* {
        const int64_t q = qb + x;
        const bool tok = q >= p.m && q < p.m + p.seq && q < width;
        return tok ? p.lora_a + (k * p.lora_rows + (q - p.m)) * p.r : nullptr;
      };
      lowrank_rows<VEC>(row_a, p.lora_b + k * p.r * p.d, p.r, p.d, col0, thread, p.scaling,
                        delta);
    };
    // Token ids of sample b, then b's source rows (embedding, task k's prompt or a visual row)
    // as raw packs.
    const auto load_ids = [&](int64_t b, int64_t(&id)[kRowsPerThread]) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        id[i] = token[i] ? p.ids[b * p.seq + (q0 + i - p.m)] : 0;
    };
    const auto load_src = [&](const int64_t(&id)[kRowsPerThread], int64_t b, int64_t k,
                              Pack<T, VEC>(&src)[kRowsPerThread]) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (!valid[i]) continue;
        const T* row = token[i] ? weight + id[i] * p.weight_stride : copied_row<T>(p, b, k, q0 + i);
        src[i] = load_pack<T, VEC>(row + c);
      }
    };

    // Pipeline: the ids of the next sample are loaded while this one's sources are in
    // flight, and the first sample's ids while the low-rank product is formed (its sources
    // too would take the registers that keep this kernel at 4 blocks per SM without spilling).
    int64_t b = sample(i0);
    int64_t task = task_of(b);
    int64_t id[kRowsPerThread];
    Pack<T, VEC> cur[kRowsPerThread];
    load_ids(b, id);

    float delta[kRowsPerThread][VEC];
    form_delta(task, delta);

    load_src(id, b, task, cur);
    int64_t b_next = 0;
    if (i0 + 1 < i1) {
      b_next = sample(i0 + 1);
      load_ids(b_next, id);
    }

    for (int64_t i = i0; i < i1; ++i) {
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) {
        if (!valid[j]) continue;
        T* o = out + (b * width + q0 + j) * p.d + c;
        // Prompt and visual rows are copied bit for bit, as the reference does.
        store_pack<T, VEC>(o, token[j] ? add_delta<T, VEC>(cur[j], delta[j]) : cur[j]);
      }
      if (i + 1 < i1) {
        // Samples come grouped by task, so this branch is rare, and uniform per block (its
        // barriers are reached by every thread).
        const int64_t next_task = task_of(b_next);
        if (next_task != task) {
          task = next_task;
          form_delta(task, delta);
        }
        load_src(id, b_next, task, cur);
        b = b_next;
        if (i + 2 < i1) {
          b_next = sample(i + 2);
          load_ids(b_next, id);
        }
      }
    }
  }
};

// One output row per (thread, i) of the flattened (B * (m + s + n_v)) rows (prompt, token, then
// visual rows of each sample; prompt and visual rows are copies): prompt tuning without
// a delta (LOWRANK false: a pure gather, rows copied bit for bit) and the per-token rows mode
// (left padding, token mode), whose delta row differs per token, so its work is B*s*r*d.
// Grid: (ceil(B * width / kRowTile), ceil(d / (kLanes * VEC))), width = m + s + n_v. With tasks
// a block instead covers kRowTile rows of one sample, grid (B * ceil(width / kRowTile), ...), so each
// thread's rows share one task and one lora_b slice (short samples leave rows idle).
// The embedding loads are issued before the low-rank loop, so they are in flight while it runs.
// Minimum traffic: B*s*d*sizeof(T) + B*(m+s+n_v)*d*sizeof(T) + T*m*d*sizeof(T) + B*n_v*d*sizeof(T)
// (+ 4*T*r*d and the distinct lora_a rows with LOWRANK).
template <typename T, int VEC, bool LOWRANK>
struct ForwardPerRow {
  using Params = ForwardParams;

  static DK_INLINE void run(const Params& p, uint3 block, uint3 thread) {
    const int64_t col0 = int64_t(block.y) * kLanes * VEC;
    const int64_t c = col0 + int64_t(thread.x) * VEC;
    const bool live = c < p.d;  // threads past d stay for the block's barriers
    const int64_t width = p.m + p.seq + p.n_v;
    int64_t nb, end, task = 0;  // the block's rows are nb + x < end, of task `task`
    if (p.task_ids != nullptr) {
      const int64_t tiles = (width + kRowTile - 1) / kRowTile;
      const int64_t b = int64_t(block.x) / tiles;
      nb = b * width + (int64_t(block.x) - b * tiles) * kRowTile;
      end = (b + 1) * width;
      task = p.task_ids[b];
    } else {
      nb = int64_t(block.x) * kRowTile;
      end = p.batch * width;
    }
    const int64_t n0 = nb + int64_t(thread.y) * kRowsPerThread;
    const T* weight = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out);

    bool valid[kRowsPerThread], token[kRowsPerThread];
    Pack<T, VEC> src[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t n = n0 + i;
      valid[i] = live && n < end;
      const int64_t b = valid[i] ? n / width : 0;
      const int64_t q = n - b * width;
      token[i] = valid[i] && q >= p.m && q < p.m + p.seq;
      const int64_t tok = b * p.seq + (q - p.m);
      if (valid[i]) {
        const T* row =
            token[i] ? weight + p.ids[tok] * p.weight_stride : copied_row<T>(p, b, task, q);
        src[i] = load_pack<T, VEC>(row + c);
      }
    }
    float delta[kRowsPerThread][VEC];
    if (LOWRANK) {
      // lora_a row of block row x: the row of its token, or null (prompt, visual, past end).
      const auto row_a = [&](int x) -> const float* {
        const int64_t n = nb + x;
        if (n >= end) return nullptr;
        const int64_t b = n / width, q = n - b * width;
        if (q < p.m || q >= p.m + p.seq) return nullptr;
        return p.lora_a + (task * p.lora_rows + p.rows[b * p.seq + (q - p.m)]) * p.r;
      };
      lowrank_rows<VEC>(row_a, p.lora_b + task * p.r * p.d, p.r, p.d, col0, thread, p.scaling,
                        delta);
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (!valid[i]) continue;
      const bool add = LOWRANK && token[i];
      T* o = out + (n0 + i) * p.d + c;
      store_pack<T, VEC>(o, add ? add_delta<T, VEC>(src[i], delta[i]) : src[i]);
    }
  }
};

// Segmented sum, pass 1. The tokens (in segment order) are cut into chunks of
// kSegmentChunk; thread (lane, warp) of block x walks chunk k = x * kWarps + warp over its
// columns [c, c + VEC), summing in token order. A segment piece is written to out[u] by the
// chunk where segment u starts, and to carry[k] when it is the head of chunk k (segment u
// started in an earlier chunk); pass 2 adds the carries. Long segments (a padding row) are so
// split over many threads, and every sum has one fixed order: deterministic.
// Minimum traffic: tokens*d*sizeof(T) + segments*d*4 (+ carry rows, at most 1/kSegmentChunk of
// the input rows, written here and read in pass 2).
constexpr int64_t kSegmentChunk = 32;
constexpr int kSegmentUnroll = 8;  // loads in flight per thread

struct SegmentParams {
  const void* grad;
  const int64_t* src_rows;
  const int64_t* offsets;
  int64_t tokens, segments, d;
  float* out;
  float* carry;
};

template <int VEC>
DK_INLINE void store_floats(float* dst, float (&acc)[VEC]) {
  Pack<float, VEC> o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    o.v[j] = acc[j];
    acc[j] = 0.f;
  }
  store_pack<float, VEC>(dst, o);
}

template <typename T, int VEC>
struct SegmentSumChunks {
  using Params = SegmentParams;

  static DK_INLINE void run(const Params& p, uint3 block, uint3 thread) {
    const int64_t c = (int64_t(block.y) * kLanes + thread.x) * VEC;
    const int64_t k = int64_t(block.x) * kWarps + thread.y;
    const int64_t j0 = k * kSegmentChunk;
    if (c >= p.d || j0 >= p.tokens) return;
    const int64_t j1 = min64(j0 + kSegmentChunk, p.tokens);
    const T* grad = static_cast<const T*>(p.grad);

    // The segment holding token j0: offsets[u] <= j0 < offsets[u + 1] (it is not empty).
    int64_t u = 0, hi = p.segments;
    while (hi - u > 1) {
      const int64_t mid = u + (hi - u) / 2;
      if (p.offsets[mid] <= j0) {
        u = mid;
      } else {
        hi = mid;
      }
    }
    bool head = p.offsets[u] < j0;
    int64_t end = p.offsets[u + 1];
    int64_t count = 0;  // tokens in the current piece
    float acc[VEC] = {};

    int64_t idx[kSegmentUnroll];
    const auto load_idx = [&](int64_t j) {
#pragma unroll
      for (int x = 0; x < kSegmentUnroll; ++x) idx[x] = j + x < j1 ? p.src_rows[j + x] : 0;
    };
    load_idx(j0);
    for (int64_t j = j0; j < j1; j += kSegmentUnroll) {
      Pack<T, VEC> v[kSegmentUnroll];
#pragma unroll
      for (int x = 0; x < kSegmentUnroll; ++x)
        if (j + x < j1) v[x] = load_pack<T, VEC>(grad + idx[x] * p.d + c);
      if (j + kSegmentUnroll < j1) load_idx(j + kSegmentUnroll);
#pragma unroll
      for (int x = 0; x < kSegmentUnroll; ++x) {
        if (j + x >= j1) break;
        // Close the pieces that end here; the loop also steps over empty segments.
        while (j + x == end) {
          if (count > 0) store_floats<VEC>((head ? p.carry + k * p.d : p.out + u * p.d) + c, acc);
          head = false;
          count = 0;
          ++u;
          end = p.offsets[u + 1];
        }
        add_to<T, VEC>(acc, v[x]);
        ++count;
      }
    }
    store_floats<VEC>((head ? p.carry + k * p.d : p.out + u * p.d) + c, acc);
  }
};

// Segmented sum, pass 2: out[u] += carry[k] for the chunks k after the one where segment u
// starts, up to the one where it ends, in chunk order; empty segments get zeros.
// Grid: (ceil(segments / kWarps), ceil(d / (kLanes * VEC))).
// Minimum traffic: 4*d*(2 * segments spanning chunks + carry rows read).
template <int VEC>
struct SegmentSumCarry {
  using Params = SegmentParams;

  static DK_INLINE void run(const Params& p, uint3 block, uint3 thread) {
    const int64_t c = (int64_t(block.y) * kLanes + thread.x) * VEC;
    const int64_t u = int64_t(block.x) * kWarps + thread.y;
    if (c >= p.d || u >= p.segments) return;
    const int64_t lo = p.offsets[u], hi = p.offsets[u + 1];
    float acc[VEC] = {};
    float* dst = p.out + u * p.d + c;
    if (lo == hi) {
      store_floats<VEC>(dst, acc);
      return;
    }
    const int64_t k0 = lo / kSegmentChunk, k1 = (hi - 1) / kSegmentChunk;
    if (k1 == k0) return;
    add_to<float, VEC>(acc, load_pack<float, VEC>(dst));
    for (int64_t k = k0 + 1; k <= k1; ++k)
      add_to<float, VEC>(acc, load_pack<float, VEC>(p.carry + k * p.d + c));
    store_floats<VEC>(dst, acc);
  }
};

constexpr int64_t kWaves = 2;

int sm_count() {
#ifdef DEPT_KERNELS_EMULATE
  return 1;  // small, so that the emulation exercises the batch split and long chunks
#else
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // a failed query is not the launch's error
    return 1;
  }
  return count;
#endif
}

template <typename T, int VEC>
cudaError_t launch_forward(ForwardParams p, cudaStream_t stream) {
  const int64_t width = p.m + p.seq + p.n_v;
  const int64_t col_tiles = ceil_div(p.d, kLanes * VEC);
  const int64_t row_tiles = p.task_ids != nullptr ? p.batch * ceil_div(width, kRowTile)
                                               : ceil_div(p.batch * width, kRowTile);
  if (p.lora_a == nullptr || p.r == 0) {
    return launch<ForwardPerRow<T, VEC, false>>(row_tiles, col_tiles, 1, p, stream);
  }
  if (p.rows != nullptr) {
    return launch<ForwardPerRow<T, VEC, true>>(row_tiles, col_tiles, 1, p, stream);
  }
  // Split the batch over grid z until the grid holds kWaves full waves of resident blocks
  // (kMinBlocksPerSm per SM), so the last, partial wave is a small part of the work: each
  // split recomputes its tile's delta.
  const int64_t tiles = ceil_div(width, kRowTile) * col_tiles;
  const int64_t resident = int64_t(kMinBlocksPerSm) * sm_count();
  const int64_t want = min64(ceil_div(kWaves * resident, tiles), p.batch);
  p.batch_chunk = ceil_div(p.batch, want);
  return launch<ForwardSharedDelta<T, VEC>>(ceil_div(width, kRowTile), col_tiles,
                                            ceil_div(p.batch, p.batch_chunk), p, stream);
}

template <typename T, int VEC>
cudaError_t launch_segment_sum(const SegmentParams& p, cudaStream_t stream) {
  const cudaError_t err =
      launch<SegmentSumChunks<T, VEC>>(ceil_div(ceil_div(p.tokens, kSegmentChunk), kWarps),
                                       ceil_div(p.d, kLanes * VEC), 1, p, stream);
  if (err != cudaSuccess) return err;
  // The carry pass reads fp32 rows only: 16-byte packs when d allows.
  const bool vec = p.d % 4 == 0 && aligned16(p.out) && aligned16(p.carry);
  return vec ? launch<SegmentSumCarry<4>>(ceil_div(p.segments, kWarps), ceil_div(p.d, kLanes * 4),
                                          1, p, stream)
             : launch<SegmentSumCarry<1>>(ceil_div(p.segments, kWarps), ceil_div(p.d, kLanes), 1,
                                          p, stream);
}

}  // namespace

cudaError_t dept_forward(const ForwardParams& a, cudaStream_t stream) {
  if (a.batch == 0 || a.d == 0 || a.m + a.seq + a.n_v == 0) return cudaSuccess;
  ForwardParams p = a;
  if (p.task_ids == nullptr) p.batch_order = nullptr;
  p.batch_chunk = p.batch;
  const bool lowrank = a.lora_a != nullptr && a.r > 0;
  return dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = a.d % kVec == 0 && (a.weight_stride * sizeof(T)) % 16 == 0 &&
                     aligned16(a.weight) && aligned16(a.out) &&
                     (a.m == 0 || aligned16(a.prompt)) && (!lowrank || aligned16(a.lora_b)) &&
                     (a.n_v == 0 || (aligned16(a.visual) && (a.visual_stride_b * sizeof(T)) % 16 == 0 &&
                                     (a.visual_stride_v * sizeof(T)) % 16 == 0));
    return vec ? launch_forward<T, kVec>(p, stream) : launch_forward<T, 1>(p, stream);
  });
}

int64_t segment_sum_carry_rows(int64_t tokens) { return ceil_div(tokens, kSegmentChunk); }

cudaError_t segment_sum(const SegmentSumArgs& a, cudaStream_t stream) {
  if (a.segments == 0 || a.d == 0) return cudaSuccess;
  const SegmentParams p{a.grad, a.src_rows, a.offsets, a.tokens, a.segments, a.d, a.out, a.carry};
  return dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = a.d % kVec == 0 && aligned16(a.grad) && aligned16(a.out) &&
                     aligned16(a.carry);
    return vec ? launch_segment_sum<T, kVec>(p, stream) : launch_segment_sum<T, 1>(p, stream);
  });
}

}  // namespace dept_kernels
