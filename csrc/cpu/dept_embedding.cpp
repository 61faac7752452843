// Fused DePT input embedding, CPU backend. The contract (shapes, dtypes, semantics) is
// `dept_kernels/backends/_torch.py`; the Python layer validates every input before calling
// in here, so the checks below are only a last line of defence.
//
// Forward, one pass over memory: every output row is written once, straight from its
// embedding row plus the low-rank delta, which lives in a small per-thread buffer (eight
// rows of d floats). With row = position the delta of position t is formed once and reused
// for the whole batch (work s*r*d, not B*s*r*d); so is each row's with per-sample rows, in a
// table of L rows, when the tokens outnumber the rows enough (`write_row_deltas`). With
// per-task parameters the batch is walked in the op's task-sorted order and the delta is
// formed again only when the task changes, so the work is (distinct tasks)*s*r*d.
//
// An output larger than the last-level cache is written with streaming stores, which skip
// reading each line before writing it (`stream_threshold`; bf16 and fp16 with AVX-512 only).
//
// Visual rows (CLIP-T5) follow the token rows: copied row by row from their (strided) source
// by the same forward, so no concatenated copy of the output is ever made.
//
// Gather-add (AoT P-tuning): hidden plus one table row per token, one pass.
//
// Reduce: deterministic batch / segment sums of the output gradient, fp32 accumulators in
// registers, a fixed summation order and no atomics.

#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <torch/extension.h>

#include "../common/forward_args.h"
#include "lanes.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

namespace lanes = dept_kernels::lanes;

// Column tile of the gradient sums: 64 fp32 accumulators fill 8 AVX2 (4 AVX-512)
// registers, so a tile stays in registers while its token loop runs.
constexpr int64_t kTile = 64;

// Column block of the segmented sums: the same register tile. With each segment's blocks
// summed one after another (`reduce_kernel`), 64, 128 and 256 columns measured alike at
// T5-base, and 64 and 128 within 6% of each other at LLaMA-7B width, one thread (AVX-512);
// 64 keeps the accumulators in registers under AVX2 too.
constexpr int64_t kSegCols = kTile;

// Register block of the low-rank product: kBlockRows positions x 32 columns.
// Eight positions share every load of `b`: a (r, d) block at LLaMA-7B width (655 KB) does
// not stay in L1, so the loads of `b` bound the tile. Standalone, one thread, the delta of
// s = 512 positions at r = 40, d = 4096 took 11.7 ms with two positions per block and 1.8 ms
// with eight (AVX-512; 7.1 and 2.7 ms with AVX2 only); at T5-base (s = 256, r = 45,
// d = 768) 0.22 and 0.17 ms (AVX2: 0.23 and 0.26). 8 x 32 accumulators fit AVX-512's
// registers; narrower column tiles measured several times slower.
constexpr int64_t kBlockRows = 8;
constexpr int64_t kBlockCols = 32;

// Per-sample rows use a table of every row's delta when the tokens are at least this many
// times the rows (`write_row_deltas`).
constexpr int64_t kTokensPerTableRow = 4;

// Position mode (single task, batch >= kTokensPerTableRow) forms the s rows' deltas into a
// table first when it holds at most this many bytes, then gathers; larger, it forms each block
// of kBlockRows positions' deltas just before applying them to the batch. The table measured
// faster at T5-base (0.8 MB table: forward 1.84 against 2.12 ms) and GPT-2 dims (1.5 MB: 2.06
// against 2.35 ms), the blocks at LLaMA-7B width (8 MB: 9.6 against 10.3 ms; one thread,
// no_grad). In one sweep the blocks share `b` from the cache, where between gathers the
// gathered rows evict it; a large table is evicted by them in turn.
constexpr int64_t kMaxPositionTableBytes = int64_t{4} << 20;

// Aim for at least this many output elements per parallel task, so that the thread
// start-up cost of a parallel region is amortised.
constexpr int64_t kGrainElems = 1 << 15;

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// Gathered rows (embedding rows by token id, AoT table rows) are requested this many tokens
// before they are read, one cache line per kPrefetchStride bytes of the row. The ids are
// random, so neither the hardware prefetcher nor the TLB sees a row coming; touching one line
// per KiB starts the page walk and the DRAM accesses early and lets the streamer take the
// rest. Standalone (fp32 gather-add of 4096 uniform ids out of 50257 rows, one thread,
// AVX-512 VM): d = 768 1.83 ms against 2.36 ms without, d = 4096 8.2 ms against 9.4 ms; a
// line every 64 or 256 bytes measured no better, and 2 and 4 tokens ahead alike. In the op
// (GPT-2 dims, position mode, no_grad) 2.45 and 2.38 ms against 2.80 and 2.67 ms with one
// thread; with two threads the difference was within the noise.
constexpr int64_t kPrefetchAhead = 2;
constexpr size_t kPrefetchStride = 1024;

inline void prefetch_row(const void* row, size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* p = static_cast<const char*>(row);
  for (size_t c = 0; c < bytes; c += kPrefetchStride) {
    __builtin_prefetch(p + c);
  }
#else
  (void)row;
  (void)bytes;
#endif
}

// delta[p, j] = scaling * sum_k a[p, k] * b[k, j] for P rows of `a` (row stride r) and the
// columns [0, w) of `b` (row stride d); `delta` has row stride d. W bounds w at compile
// time, so full tiles (w == W) unroll into registers.
template <int64_t P, int64_t W>
inline void lowrank_block(
    const float* __restrict a,
    const float* __restrict b,
    int64_t r,
    int64_t d,
    int64_t w,
    float scaling,
    float* __restrict delta) {
  float acc[P][W] = {};
  for (int64_t k = 0; k < r; ++k) {
    const float* __restrict bk = b + k * d;
    for (int64_t p = 0; p < P; ++p) {
      const float apk = a[p * r + k];
      for (int64_t j = 0; j < (w == W ? W : w); ++j) {
        acc[p][j] += apk * bk[j];
      }
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t j = 0; j < w; ++j) {
      delta[p * d + j] = scaling * acc[p][j];
    }
  }
}

// delta (P, d) = scaling * a (P, r) @ b (r, d).
template <int64_t P>
void lowrank_rows(
    const float* a, const float* b, int64_t r, int64_t d, float scaling, float* delta) {
  int64_t c = 0;
  for (; c + kBlockCols <= d; c += kBlockCols) {
    lowrank_block<P, kBlockCols>(a, b + c, r, d, kBlockCols, scaling, delta + c);
  }
  if (c < d) {
    lowrank_block<P, kBlockCols>(a, b + c, r, d, d - c, scaling, delta + c);
  }
}

// Streaming (non-temporal) stores of output rows, for outputs larger than the last-level
// cache: an ordinary store first reads the line it writes (read for ownership), so a gather-add
// moved three bytes per byte written; a streaming store writes the line without reading it.
// At LLaMA-7B width (75 MB fp32 output, 16 KB rows), one thread, a standalone gather-add of
// 4096 rows took 10.4 and 6.6 ms streamed against 15.9 and 7.9 ms with ordinary stores (two
// runs, a busy VM; an output-sized memcpy 9.8 and 6.2 ms); in the op at LLaMA-7B dims
// (position mode, no_grad, freed memory kept) 9.51 against 11.67 ms with one thread, 5.47
// against 6.73 ms with two. bf16 and fp16 rows stream through `lanes.h` (AVX-512 only):
// at LLaMA-7B dims in bf16 (37.5 MB output, two threads, no_grad) 4.00 and 4.07 ms against
// 4.41 and 4.33 ms with ordinary stores (processes alternated, 40 interleaved rounds each).
// Outputs that fit in the cache keep ordinary stores: the model's first layer reads them
// next, from the cache.
#if defined(__AVX512F__)
constexpr int64_t kStreamFloats = 16;
inline void stream_floats(float* out, const float* e, const float* delta) {
  const __m512 v = _mm512_loadu_ps(e);
  _mm512_stream_ps(out, delta == nullptr ? v : _mm512_add_ps(v, _mm512_loadu_ps(delta)));
}
#elif defined(__AVX__)
constexpr int64_t kStreamFloats = 8;
inline void stream_floats(float* out, const float* e, const float* delta) {
  const __m256 v = _mm256_loadu_ps(e);
  _mm256_stream_ps(out, delta == nullptr ? v : _mm256_add_ps(v, _mm256_loadu_ps(delta)));
}
#elif defined(__SSE2__)
constexpr int64_t kStreamFloats = 4;
inline void stream_floats(float* out, const float* e, const float* delta) {
  const __m128 v = _mm_loadu_ps(e);
  _mm_stream_ps(out, delta == nullptr ? v : _mm_add_ps(v, _mm_loadu_ps(delta)));
}
#else
constexpr int64_t kStreamFloats = 0;  // no streaming stores on this target
inline void stream_floats(float*, const float*, const float*) {}
#endif

// Elements of T per streamed vector; 0: T is never streamed on this target (fp64, or bf16
// and fp16 without AVX-512).
template <typename T>
constexpr int64_t kStreamWidth =
    std::is_same_v<T, float> ? kStreamFloats : (lanes::kHas<T> ? lanes::kWidth : 0);

// One vector of `out` = e + delta (delta null: a copy of e's bits), streamed.
template <typename T>
inline void stream_vector(T* out, const T* e, const float* delta) {
  if constexpr (std::is_same_v<T, float>) {
    stream_floats(out, e, delta);
  } else {
#if DEPT_KERNELS_LANES
    if constexpr (lanes::kHas<T>) {
      if (delta == nullptr) {
        lanes::stream_copy(out, e);
      } else {
        lanes::stream(out, _mm512_add_ps(lanes::load(e), lanes::load(delta)));
      }
    }
#endif
  }
}

// Streaming stores are weakly ordered: each thread fences them before its chunk ends.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// out[j] = T(float(e[j]) + delta[j]) (delta null: e[j]), the vector-aligned body with
// streaming stores, the ends with ordinary ones. The bits of `add_row` and `memcpy`.
template <typename T>
inline void stream_row(T* __restrict out, const T* __restrict e, const float* __restrict delta,
                       int64_t d) {
  constexpr int64_t width = kStreamWidth<T>;
  const auto value = [&](int64_t j) {
    return delta == nullptr ? e[j] : static_cast<T>(static_cast<float>(e[j]) + delta[j]);
  };
  // (Never 0, so the modulo stays defined for a type that is not streamed.)
  const uintptr_t align = std::max<uintptr_t>(width, 1) * sizeof(T);
  int64_t j = 0;
  for (; j < d && reinterpret_cast<uintptr_t>(out + j) % align != 0; ++j) {
    out[j] = value(j);
  }
  for (; j + width <= d && width > 0; j += width) {
    stream_vector(out + j, e + j, delta == nullptr ? nullptr : delta + j);
  }
  for (; j < d; ++j) {
    out[j] = value(j);
  }
}

// Outputs of more bytes than this are written with streaming stores (-1: never): the
// last-level cache as glibc reports it, at most 32 MiB. (A thread sees its own slice of a
// large L3: glibc reports 320 MiB on the 2-core AMD VM, whose core complex has 32 MiB.)
// Asked of the OS once per process, not on every forward.
int64_t stream_threshold() {
  static const int64_t threshold = [] {
    if (kStreamFloats == 0) return int64_t{-1};
    constexpr int64_t kMaxCache = int64_t{32} << 20;
    int64_t cache = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    cache = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return cache > 0 ? std::min(cache, kMaxCache) : kMaxCache;
  }();
  return threshold;
}

// out[j] = T(float(a[j]) + float(b[j])): the fp32 sum is rounded once, as in the reference.
// Sixteen lanes at a time where the target has them (`lanes.h`: the compiler leaves bf16
// stores and fp16 either way scalar), then element by element. `out` may be `a` (the AoT
// gather-add in place): each element is read before it is written, so no `__restrict`.
template <typename T, typename U>
inline void add_row(T* out, const T* a, const U* b, int64_t d) {
  int64_t j = 0;
#if DEPT_KERNELS_LANES
  if constexpr (lanes::kHas<T> && lanes::kHas<U>) {
    for (; j + lanes::kWidth <= d; j += lanes::kWidth) {
      lanes::store(out + j, _mm512_add_ps(lanes::load(a + j), lanes::load(b + j)));
    }
  }
#endif
  for (; j < d; ++j) {
    out[j] = static_cast<T>(static_cast<float>(a[j]) + static_cast<float>(b[j]));
  }
}

// The forward's arguments and its steps. Per-task parameters (`tasks` non-null): prompt
// (T, m, d), a (T, L, r), b (T, r, d), all contiguous; `order` lists the samples grouped by
// task. Without tasks, T = 1 and task 0. `visual` (B, n_v, d) rows are `visual_stride_v`
// elements apart, samples `visual_stride_b`; null when n_v = 0.
template <typename T>
struct Forward {
  const int64_t* ids;
  const T* weight;
  int64_t weight_stride;
  const T* prompt;
  const float* lora_a;
  const float* lora_b;
  const int64_t* rows;
  const int64_t* tasks;
  const int64_t* order;
  const T* visual;
  int64_t visual_stride_b, visual_stride_v;
  float scaling;
  int64_t batch, seq, m, d, r, max_len, n_v;
  bool lowrank;
  T* out;
  bool stream;  // output rows written with streaming stores (`stream_threshold`)

  int64_t task_of(int64_t b) const { return tasks == nullptr ? 0 : tasks[b]; }
  // Output row q of sample b: prompt rows q < m, token rows q = m + t, then visual rows
  // q = m + seq + j.
  T* out_row(int64_t b, int64_t q) const { return out + (b * (m + seq + n_v) + q) * d; }
  // Embedding row of token n = b * seq + t.
  const T* embedding(int64_t n) const { return weight + ids[n] * weight_stride; }
  size_t row_bytes() const { return static_cast<size_t>(d) * sizeof(T); }
  // Requests the embedding row of token n + kPrefetchAhead when it is before `end`.
  void prefetch_ahead(int64_t n, int64_t end) const {
    if (n + kPrefetchAhead < end) {
      prefetch_row(embedding(n + kPrefetchAhead), row_bytes());
    }
  }

  // Output row `dst` = e + delta (delta null: a copy of e, as for prompt and visual rows).
  void write_row(T* dst, const T* e, const float* delta) const {
    if constexpr (kStreamWidth<T> > 0) {
      if (stream) {
        stream_row(dst, e, delta, d);
        return;
      }
    }
    if (delta == nullptr) {
      std::memcpy(dst, e, row_bytes());
    } else {
      add_row(dst, e, delta, d);
    }
  }
  void end_chunk() const {
    if (stream) stream_fence();
  }

  void run() const {
    if (m > 0) write_prompts();
    if (n_v > 0) write_visual();
    if (!lowrank) {
      write_embeddings();
    } else if (rows == nullptr) {
      const bool table = tasks == nullptr && batch >= kTokensPerTableRow &&
                         seq * d * static_cast<int64_t>(sizeof(float)) <= kMaxPositionTableBytes;
      if (table) {
        write_row_deltas_from_table(seq);
      } else {
        write_position_deltas();
      }
    } else {
      write_row_deltas();
    }
  }

  void write_prompts() const {
    at::parallel_for(0, batch * m, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / m;
        const int64_t p = i % m;
        write_row(out_row(b, p), prompt + (task_of(b) * m + p) * d, nullptr);
      }
      end_chunk();
    });
  }

  void write_visual() const {
    at::parallel_for(0, batch * n_v, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / n_v;
        const int64_t j = i % n_v;
        write_row(out_row(b, m + seq + j), visual + b * visual_stride_b + j * visual_stride_v,
                    nullptr);
      }
      end_chunk();
    });
  }

  // No low-rank delta: the token rows are copies of their embedding rows.
  void write_embeddings() const {
    at::parallel_for(0, batch * seq, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        prefetch_ahead(n, end);
        write_row(out_row(n / seq, m + n % seq), embedding(n), nullptr);
      }
      end_chunk();
    });
  }

  // Row = position. Parallel over positions: each thread's chunk forms the delta of its
  // positions, kBlockRows at a time, and applies it to all B tokens at those positions. The
  // batch is walked in task order, so the delta is formed once per (DePT) task present.
  void write_position_deltas() const {
    at::parallel_for(0, seq, grain_for(batch * d), [&](int64_t begin, int64_t end) {
      std::vector<float> delta(kBlockRows * d);
      for (int64_t t0 = begin; t0 < end; t0 += kBlockRows) {
        const int64_t rows_here = std::min(kBlockRows, end - t0);
        int64_t cached = -1;
        for (int64_t i = 0; i < batch; ++i) {
          const int64_t b = order == nullptr ? i : order[i];
          const int64_t task = task_of(b);
          if (task != cached) {
            form_delta(task, t0, rows_here, delta.data());
            cached = task;
          }
          for (int64_t p = 0; p < rows_here; ++p) {
            // The token kPrefetchAhead steps on in this walk: later in the block, or in the
            // next sample of the batch order.
            const int64_t ahead = i * rows_here + p + kPrefetchAhead;
            if (ahead < batch * rows_here) {
              const int64_t i_next = ahead / rows_here;
              const int64_t b_next = order == nullptr ? i_next : order[i_next];
              prefetch_row(embedding(b_next * seq + t0 + ahead % rows_here), row_bytes());
            }
            const int64_t t = t0 + p;
            write_row(out_row(b, m + t), embedding(b * seq + t), delta.data() + p * d);
          }
        }
      }
      end_chunk();
    });
  }

  // Arbitrary rows (left padding, token mode). Single-task with at least 4 tokens per row
  // of lora_a: the delta of every row is formed once, in blocks, into a table (at most a
  // quarter of the output's size), then gathered. Else one delta per token, except that a
  // run of tokens sharing a (task, row) (padding, repeated ids) reuses the one just formed.
  // (Per token, `b` streams through the cache once per token: at LLaMA-7B width that cost
  // ~30 us a token, the table ~3.5 us a row. Token mode has L = V rows, so its tokens rarely
  // outnumber them.)
  void write_row_deltas() const {
    if (tasks == nullptr && batch * seq >= kTokensPerTableRow * max_len) {
      write_row_deltas_from_table(max_len);
      return;
    }
    at::parallel_for(0, batch * seq, grain_for(d), [&](int64_t begin, int64_t end) {
      std::vector<float> delta(d);
      int64_t cached_row = -1, cached_task = -1;
      for (int64_t n = begin; n < end; ++n) {
        prefetch_ahead(n, end);
        const int64_t b = n / seq;
        const int64_t task = task_of(b);
        if (rows[n] != cached_row || task != cached_task) {
          form_delta(task, rows[n], 1, delta.data());
          cached_row = rows[n];
          cached_task = task;
        }
        write_row(out_row(b, m + n % seq), embedding(n), delta.data());
      }
      end_chunk();
    });
  }

  // The deltas of rows [0, table_rows) into a table, then every token's row from it: its
  // row in `rows`, or its position when `rows` is null (table_rows = seq then).
  void write_row_deltas_from_table(int64_t table_rows) const {
    std::vector<float> table(table_rows * d);
    const int64_t blocks = (table_rows + kBlockRows - 1) / kBlockRows;
    at::parallel_for(0, blocks, grain_for(kBlockRows * r * d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i * kBlockRows;
        form_delta(0, row, std::min(kBlockRows, table_rows - row), table.data() + row * d);
      }
    });
    at::parallel_for(0, batch * seq, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        prefetch_ahead(n, end);
        const int64_t row = rows == nullptr ? n % seq : rows[n];
        write_row(out_row(n / seq, m + n % seq), embedding(n), table.data() + row * d);
      }
      end_chunk();
    });
  }

  // delta (count, d) = scaling * lora_a[task, row : row + count] @ lora_b[task],
  // count <= kBlockRows: a full block at once, a partial one row by row.
  void form_delta(int64_t task, int64_t row, int64_t count, float* delta) const {
    const float* a = lora_a + (task * max_len + row) * r;
    const float* b = lora_b + task * r * d;
    if (count == kBlockRows) {
      lowrank_rows<kBlockRows>(a, b, r, d, scaling, delta);
      return;
    }
    for (int64_t p = 0; p < count; ++p) {
      lowrank_rows<1>(a + p * r, b, r, d, scaling, delta + p * d);
    }
  }
};

// dst[0, W) = the fp32 sums over the tokens `src(i)`, i in [0, count), of their columns
// [0, W), each rounded once to O (fp32, or bf16 for `reduce_lowrank`'s GEMMs).
template <int64_t W, typename T, typename O, typename Src>
inline void sum_tile(const Src& src, int64_t count, O* __restrict dst) {
#if DEPT_KERNELS_LANES
  if constexpr (lanes::kHas<T>) {
    // The same sums (each column's tokens in order) in vector registers: fp16 loads are
    // left scalar by the compiler (`lanes.h`).
    static_assert(W % lanes::kWidth == 0, "a tile is whole vectors");
    constexpr int64_t kVectors = W / lanes::kWidth;
    __m512 vacc[kVectors];
    for (int64_t k = 0; k < kVectors; ++k) {
      vacc[k] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < count; ++i) {
      const T* __restrict g = src(i);
      for (int64_t k = 0; k < kVectors; ++k) {
        vacc[k] = _mm512_add_ps(vacc[k], lanes::load(g + k * lanes::kWidth));
      }
    }
    for (int64_t k = 0; k < kVectors; ++k) {
      lanes::store(dst + k * lanes::kWidth, vacc[k]);
    }
    return;
  }
#endif
  float acc[W] = {};
  for (int64_t i = 0; i < count; ++i) {
    const T* __restrict g = src(i);
    for (int64_t j = 0; j < W; ++j) {
      acc[j] += static_cast<float>(g[j]);
    }
  }
  for (int64_t j = 0; j < W; ++j) {
    dst[j] = static_cast<O>(acc[j]);
  }
}

template <int64_t MaxW, typename T, typename O, typename Src>
inline void sum_tail(const Src& src, int64_t count, int64_t w, O* __restrict dst) {
  float acc[MaxW] = {};
  for (int64_t i = 0; i < count; ++i) {
    const T* __restrict g = src(i);
    for (int64_t j = 0; j < w; ++j) {
      acc[j] += static_cast<float>(g[j]);
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    dst[j] = static_cast<O>(acc[j]);
  }
}

// Column tile `c` of one output row: the sum over `count` token rows given by `row(i)`.
template <typename T, typename O, typename Row>
inline void sum_column_tile(const Row& row, int64_t count, int64_t c, int64_t d, O* dst) {
  const int64_t c0 = c * kTile;
  const auto src = [&](int64_t i) { return row(i) + c0; };
  if (c0 + kTile <= d) {
    sum_tile<kTile, T>(src, count, dst + c0);
  } else {
    sum_tail<kTile, T>(src, count, d - c0, dst + c0);
  }
}

// Sums into `out` of element type O: fp32, or (position mode only, `reduce_lowrank`) bf16.
template <typename T, typename O>
void reduce_kernel(
    const T* grad,
    const int64_t* order,
    const int64_t* offsets,
    int64_t batch,
    int64_t seq,
    int64_t m,
    int64_t d,
    int64_t segments,
    int64_t out_seq,  // rows per sample of `grad` (m + s, or more for a view of a wider output)
    O* out) {
  const int64_t tiles = (d + kTile - 1) / kTile;
  if (order == nullptr) {
    // Position-major tasks: each reads the B rows of its positions, a uniform amount of
    // work per task. `_grads.py` passes m = 0 when it wants the prompt rows' sums too, so
    // the output gradient is read once. (Tiles of several rows with fp32 accumulators in L1
    // measured 11-17% slower than these register tiles at T5-base with one thread, at the
    // LLaMA-7B width and in bf16, and within the noise at T5-base with two threads.)
    at::parallel_for(0, seq * tiles, grain_for(batch * kTile), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / tiles;
        const auto row = [&](int64_t b) { return grad + (b * out_seq + m + t) * d; };
        sum_column_tile<T>(row, batch, i % tiles, d, out + t * d);
      }
    });
    return;
  }
  // Segments: tasks are (a range of whole segments holding about equal token counts) x (a
  // group of kSegCols-column blocks). Within a task each segment's token rows are summed
  // block after block, so a row's next piece is read while the row is still in cache
  // and the prefetcher streams it; the token-balanced ranges keep threads equally busy under
  // skewed segment sizes (Zipf-distributed ids, a padding row). Columns are split into
  // groups only when there are too few segment ranges for the threads (a single huge
  // segment). (One 1 KiB block per task, every segment's rows swept once per block, took
  // 1.2x-1.5x the time at T5-base and 1.4x at LLaMA-7B width with per-sample rows, one
  // thread: each sweep found the rows evicted.)
  const int64_t tokens = batch * seq;
  const int64_t col_blocks = (d + kSegCols - 1) / kSegCols;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(segments, 4 * threads));
  const int64_t groups = std::min(col_blocks, (4 * threads + chunks - 1) / chunks);
  const int64_t blocks_per_group = (col_blocks + groups - 1) / groups;
  std::vector<int64_t> bounds(chunks + 1, segments);
  bounds[0] = 0;
  for (int64_t k = 1; k < chunks; ++k) {
    // First segment starting at or after token k * tokens / chunks.
    bounds[k] = std::lower_bound(offsets, offsets + segments, k * tokens / chunks) - offsets;
  }
  at::parallel_for(0, chunks * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t chunk = i / groups;
      const int64_t first = (i % groups) * blocks_per_group;
      const int64_t last = std::min(col_blocks, first + blocks_per_group);
      for (int64_t u = bounds[chunk]; u < bounds[chunk + 1]; ++u) {
        const int64_t* seg = order + offsets[u];
        const int64_t count = offsets[u + 1] - offsets[u];
        for (int64_t block = first; block < last; ++block) {
          const int64_t c0 = block * kSegCols;
          const int64_t w = std::min(kSegCols, d - c0);
          const auto src = [&](int64_t j) {
            const int64_t n = seg[j];
            return grad + ((n / seq) * out_seq + m + n % seq) * d + c0;
          };
          if (w == kSegCols) {
            sum_tile<kSegCols, T>(src, count, out + u * d + c0);
          } else {
            sum_tail<kSegCols, T>(src, count, w, out + u * d + c0);
          }
        }
      }
    }
  });
}

// AoT gather-add: out[n] = T(float(hidden[n]) + float(table[rows[n]])). `out` may alias
// `hidden` (in-place inference), which is safe since row n is read before it is written.
template <typename T, typename U>
void gather_add_kernel(
    const T* hidden, const int64_t* rows, const U* table, int64_t tokens, int64_t d, T* out) {
  at::parallel_for(0, tokens, grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (n + kPrefetchAhead < end) {
        prefetch_row(table + rows[n + kPrefetchAhead] * d, static_cast<size_t>(d) * sizeof(U));
      }
      add_row(out + n * d, hidden + n * d, table + rows[n] * d, d);
    }
  });
}

// Dense row `out` (d elements of T) = T(src[j]), or zeros when `src` is null; streamed
// (vector-aligned body) when `stream`.
template <typename T>
inline void write_dense_row(T* out, const float* src, int64_t d, bool stream) {
  const auto value = [&](int64_t j) { return static_cast<T>(src == nullptr ? 0.0f : src[j]); };
  int64_t j = 0;
#if DEPT_KERNELS_LANES
  if constexpr (lanes::kHas<T>) {
    const auto vector = [&](int64_t at) {
      return src == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(src + at);
    };
    if (stream) {
      const uintptr_t align = lanes::kWidth * sizeof(T);
      for (; j < d && reinterpret_cast<uintptr_t>(out + j) % align != 0; ++j) {
        out[j] = value(j);
      }
      for (; j + lanes::kWidth <= d; j += lanes::kWidth) {
        lanes::stream(out + j, vector(j));
      }
    } else {
      for (; j + lanes::kWidth <= d; j += lanes::kWidth) {
        lanes::store(out + j, vector(j));
      }
    }
  }
#endif
  for (; j < d; ++j) {
    out[j] = value(j);
  }
}

// out (R, d) of T: row used[u] = T(sums[u]), for the first u of each key, and zeros in every
// other row. `used` is ascending; `segments` (ops/_grads.py) repeats a key only in trailing
// empty segments, whose sums are zero, so the first is the row's sum. Each row is written
// once, where zero-filling the output and then adding the sums in wrote the used rows twice
// and read them once. Rows are written only in [0, R): a `used` out of order or out of range
// gives wrong rows, never a write out of bounds.
template <typename T>
void scatter_rows_kernel(
    const int64_t* used, int64_t count, const float* sums, int64_t rows, int64_t d, T* out,
    bool stream) {
  at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
    int64_t k = std::lower_bound(used, used + count, begin) - used;
    for (int64_t row = begin; row < end; ++row) {
      const float* src = nullptr;
      if (k < count && used[k] == row) {
        src = sums + k * d;
        while (k < count && used[k] == row) ++k;
      }
      write_dense_row(out + row * d, src, d, stream);
    }
    if (stream) stream_fence();
  });
}

at::Tensor forward(
    const at::Tensor& input_ids,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& prompt,
    const std::optional<at::Tensor>& lora_a,
    const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& rows,
    double scaling,
    const std::optional<at::Tensor>& task_ids,
    const std::optional<at::Tensor>& batch_order,
    const std::optional<at::Tensor>& visual) {
  dept_kernels::check_on(at::Device(at::kCPU), weight, "weight");
  const auto t = dept_kernels::normalize_forward(input_ids, weight, prompt, lora_a, lora_b, rows,
                                                 task_ids, batch_order, visual);
  auto out = at::empty({t.batch, t.width(), t.d}, weight.options());
  if (out.numel() == 0) {
    return out;
  }
  using dept_kernels::ptr_or_null;
  const int64_t threshold = stream_threshold();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dept_embedding_forward", [&] {
        const bool stream = kStreamWidth<scalar_t> > 0 && threshold >= 0 &&
                            static_cast<int64_t>(out.nbytes()) > threshold;
        const Forward<scalar_t> step{t.ids.data_ptr<int64_t>(),
                                     weight.data_ptr<scalar_t>(),
                                     weight.stride(0),
                                     ptr_or_null<scalar_t>(t.prompt),
                                     ptr_or_null<float>(t.lora_a),
                                     ptr_or_null<float>(t.lora_b),
                                     ptr_or_null<int64_t>(t.rows),
                                     ptr_or_null<int64_t>(t.task_ids),
                                     ptr_or_null<int64_t>(t.batch_order),
                                     ptr_or_null<scalar_t>(t.visual),
                                     t.visual_stride_b,
                                     t.visual_stride_v,
                                     static_cast<float>(scaling),
                                     t.batch,
                                     t.seq,
                                     t.m,
                                     t.d,
                                     t.r,
                                     t.max_len,
                                     t.n_v,
                                     t.lora_a.defined() && t.r > 0,
                                     out.data_ptr<scalar_t>(),
                                     stream};
        step.run();
      });
  return out;
}

at::Tensor reduce(
    const at::Tensor& grad_out,
    int64_t m,
    const std::optional<at::Tensor>& order,
    const std::optional<at::Tensor>& offsets) {
  const at::Device cpu(at::kCPU);
  dept_kernels::check_on(cpu, grad_out, "grad_out");
  dept_kernels::check_on(cpu, order, "order");
  dept_kernels::check_on(cpu, offsets, "offsets");
  const int64_t batch_rows = dept_kernels::grad_batch_rows(grad_out);
  TORCH_CHECK(order.has_value() == offsets.has_value(), "order and offsets go together");
  const int64_t batch = grad_out.size(0);
  const int64_t seq = grad_out.size(1) - m;
  const int64_t d = grad_out.size(2);
  TORCH_CHECK(seq >= 0, "m exceeds the sequence length of grad_out");
  at::Tensor ord, off;
  int64_t segments = seq;
  if (order.has_value()) {
    ord = order->to(at::kLong).contiguous();
    off = offsets->to(at::kLong).contiguous();
    TORCH_CHECK(ord.numel() == batch * seq, "order must list all B*s tokens");
    TORCH_CHECK(off.dim() == 1 && off.numel() >= 1, "offsets must be (R + 1,)");
    segments = off.numel() - 1;
  }
  auto out = at::empty({segments, d}, grad_out.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "dept_embedding_reduce", [&] {
        reduce_kernel<scalar_t, float>(
            grad_out.data_ptr<scalar_t>(), ord.defined() ? ord.data_ptr<int64_t>() : nullptr,
            off.defined() ? off.data_ptr<int64_t>() : nullptr, batch, seq, m, d, segments,
            batch_rows, out.data_ptr<float>());
      });
  return out;
}

// (prompt sums (m, d) fp32, dA (L, r), dB (r, d) in the factors' dtype) in position mode: the
// batch sums of the rows of grad_out (B, m + s, d) and, from the token rows' sums S (s, d),
// dA[:s] = scaling * S @ B^T and dB = scaling * A[:s]^T @ S, with A (L, r) and B (r, d) both
// fp32 or both bf16; rows s.. of dA are zero. With bf16 factors the GEMMs take S rounded to
// bf16, as PyTorch's autograd of the formula does, and accumulate in fp32 (one rounding of
// each result, scaling included): on a CPU with bf16 dot products that is twice fp32's rate
// (AVX512-BF16 VM, with S's conversion: LLaMA-7B dims 1.21 against 2.60 ms, two threads;
// T5-base 0.17 against 0.25 ms). The two GEMMs are independent, so with two threads they
// run at once, one thread each, rather than each split over both threads in turn (at
// LLaMA-7B dims each of these narrow fp32 GEMMs ran 1.2x-1.5x faster, not 2x, with a second
// thread; in bf16 at once and in turn measured alike). Forward+backward
// with two threads against `reduce` and two matmuls, in the same rounds (bench/results/
// cpu-2core-2026-11-30-backward-floor-parts.txt, three runs): LLaMA-7B dims 1.04x-1.08x
// faster (11.38 against 11.81 ms in the last), GPT-2 dims 1.04x where quiet. Otherwise they
// run one after the other, as before (one thread: within 1-2% of `reduce` and two matmuls at
// all three shapes). (Two alternatives measured no better: with one thread, forming S in
// L2-sized chunks and multiplying each chunk at once, from 4% slower to 2% faster at GPT-2
// and LLaMA-7B dims; with two, a pipeline in which one thread multiplied chunks while the
// other summed them, 5-9% slower.)
std::vector<at::Tensor> reduce_lowrank(
    const at::Tensor& grad_out,
    int64_t m,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    double scaling) {
  const at::Device cpu(at::kCPU);
  dept_kernels::check_on(cpu, lora_a, "lora_a");
  dept_kernels::check_on(cpu, lora_b, "lora_b");
  TORCH_CHECK(grad_out.dim() == 3, "grad_out must be (B, m + s, d)");
  const int64_t seq = grad_out.size(1) - m, d = grad_out.size(2);
  TORCH_CHECK(m >= 0 && seq >= 0, "m exceeds the rows of grad_out");
  const auto dtype = lora_a.scalar_type();
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2 && lora_b.scalar_type() == dtype &&
                  (dtype == at::kFloat || dtype == at::kBFloat16),
              "lora_a (L, r) and lora_b (r, d) must be matrices, both fp32 or both bf16");
  TORCH_CHECK(lora_a.size(0) >= seq && lora_a.size(1) == lora_b.size(0) && lora_b.size(1) == d,
              "lora_a must be (L >= s, r) and lora_b (r, d)");
  dept_kernels::check_on(cpu, grad_out, "grad_out");
  const int64_t batch_rows = dept_kernels::grad_batch_rows(grad_out);
  // The batch sums of the m prompt rows (fp32) and of the s token rows, each rounded once
  // to the factors' dtype, as `reduce` forms them: each row's B samples summed in order,
  // so grad_out is read once. The token rows' bf16 sums are stored as they are formed,
  // not converted in a second pass (at LLaMA-7B dims that pass read 8 MB and wrote 4 MB).
  auto sums = at::empty({m, d}, grad_out.options().dtype(at::kFloat));
  auto tokens = at::empty({seq, d}, grad_out.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "dept_embedding_reduce_lowrank", [&] {
        const auto* grad = grad_out.data_ptr<scalar_t>();
        const int64_t batch = grad_out.size(0);
        const auto rows = [&](int64_t first, int64_t count, auto* out) {
          if (count > 0 && d > 0) {
            reduce_kernel<scalar_t>(grad, nullptr, nullptr, batch, count, first, d, count,
                                    batch_rows, out);
          }
        };
        rows(0, m, sums.data_ptr<float>());
        if (dtype == at::kBFloat16) {
          rows(m, seq, tokens.data_ptr<c10::BFloat16>());
        } else {
          rows(m, seq, tokens.data_ptr<float>());
        }
      });
  auto d_a = at::zeros_like(lora_a, at::MemoryFormat::Contiguous);
  auto d_b = at::zeros_like(lora_b, at::MemoryFormat::Contiguous);
  if (seq == 0 || d == 0) {
    return {sums, d_a, d_b};
  }
  const auto a = lora_a.narrow(0, 0, seq);
  // dA is formed transposed, dA^T = B @ S^T, in a row-major (r, s) buffer: the order
  // `_grads.py` uses, faster with one thread (its `_lowrank_from_sums` has the figures).
  // Written into a transposed view of dA instead, the GEMM would run as S @ B^T.
  auto d_a_t = at::zeros({lora_b.size(0), seq}, lora_a.options());
  // ATen's CPU kernel, called directly rather than through the dispatcher: these GEMMs are
  // this kernel's own work, on its own fresh outputs, and a pool thread must not meet the
  // caller's thread-local state there (a Python dispatch mode would call into Python from
  // it while the caller holds the GIL and waits for it).
  const auto gemm = [&](int64_t i) {
    // alpha = scaling inside the GEMM: a bf16 result is rounded once.
    if (i == 0) {
      at::cpu::addmm_out(d_a_t, d_a_t, lora_b, tokens.t(), 0, scaling);
    } else {
      at::cpu::addmm_out(d_b, d_b, a.t(), tokens, 0, scaling);
    }
  };
  if (at::get_num_threads() == 2 && !at::in_parallel_region()) {
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) gemm(i);
    });
  } else {
    // Each GEMM on all the threads, in turn: one GEMM a thread would leave cores idle with
    // more than two (not measured; the split measured faster with two only).
    gemm(0);
    gemm(1);
  }
  d_a.narrow(0, 0, seq).copy_(d_a_t.t());
  return {sums, d_a, d_b};
}

at::Tensor gather_add(
    const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& table, at::Tensor out) {
  const at::Device cpu(at::kCPU);
  dept_kernels::check_on(cpu, hidden, "hidden");
  dept_kernels::check_on(cpu, rows, "rows");
  dept_kernels::check_on(cpu, table, "table");
  dept_kernels::check_on(cpu, out, "out");
  TORCH_CHECK(hidden.dim() == 3 && hidden.is_contiguous(), "hidden must be contiguous (B, s, d)");
  TORCH_CHECK(out.sizes() == hidden.sizes() && out.is_contiguous() &&
                  out.scalar_type() == hidden.scalar_type(),
              "out must be a contiguous tensor like hidden");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.size(1) == hidden.size(2),
              "table must be a contiguous (R, d) tensor");
  TORCH_CHECK(rows.numel() == hidden.size(0) * hidden.size(1), "rows must be (B, s)");
  if (out.numel() == 0) {
    return out;
  }
  const auto rows64 = rows.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "aot_gather_add", [&] {
        using T = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, table.scalar_type(), "aot_gather_add_table", [&] {
              gather_add_kernel<T, scalar_t>(
                  hidden.data_ptr<T>(), rows64.data_ptr<int64_t>(), table.data_ptr<scalar_t>(),
                  rows64.numel(), hidden.size(2), out.data_ptr<T>());
            });
      });
  return out;
}

at::Tensor scatter_rows(const at::Tensor& used, const at::Tensor& sums, at::Tensor out) {
  const at::Device cpu(at::kCPU);
  dept_kernels::check_on(cpu, used, "used");
  dept_kernels::check_on(cpu, sums, "sums");
  dept_kernels::check_on(cpu, out, "out");
  TORCH_CHECK(sums.dim() == 2 && sums.scalar_type() == at::kFloat, "sums must be fp32 (R, d)");
  TORCH_CHECK(used.dim() == 1 && used.scalar_type() == at::kLong && used.size(0) == sums.size(0),
              "used must be int64 (R,), one key per row of sums");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(1) == sums.size(1),
              "out must be a contiguous (num_rows, d) tensor");
  if (out.numel() == 0) {
    return out;
  }
  const auto keys = used.contiguous();
  const auto rows = sums.contiguous();
  const int64_t threshold = stream_threshold();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_rows", [&] {
    const bool stream = kStreamWidth<scalar_t> > 0 && threshold >= 0 &&
                        static_cast<int64_t>(out.nbytes()) > threshold;
    scatter_rows_kernel<scalar_t>(keys.data_ptr<int64_t>(), keys.numel(), rows.data_ptr<float>(),
                                  out.size(0), out.size(1), out.data_ptr<scalar_t>(), stream);
  });
  return out;
}

}  // namespace

// The build passes the hash of the sources as a bare token, so no shell quoting is needed.
#define DEPT_KERNELS_STR_(x) #x
#define DEPT_KERNELS_STR(x) DEPT_KERNELS_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "DePT fused embedding, CPU kernels (see dept_kernels/backends/_cpu.py)";
  module.attr("SOURCE_HASH") = DEPT_KERNELS_STR(DEPT_KERNELS_SOURCE_HASH);
  module.def("forward", &forward,
             "(B, m + s + n_v, d) fused prompt + embedding + low-rank delta (+ visual rows), "
             "optionally per task");
  module.def("reduce", &reduce, "fp32 batch / segment sums of the token rows of grad_out");
  module.def("reduce_lowrank", &reduce_lowrank,
             "position mode: fp32 batch sums of grad_out's m prompt rows and the low-rank "
             "gradients dA, dB from the token rows' sums");
  module.def("gather_add", &gather_add, "AoT: out = hidden + table[rows], fp32 add");
  module.def("scatter_rows", &scatter_rows,
             "out (num_rows, d): row used[u] = sums[u] (first u of a key), other rows zero");
  module.def("stream_threshold", &stream_threshold,
             "bytes above which a forward output is written with streaming stores (-1: never; "
             "fp64 never, bf16 and fp16 only with AVX-512)");
}
