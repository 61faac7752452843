// Shared pieces of the CUDA kernels: element conversion, vector packs, the block shape and
// the launch helper.
//
// Each kernel is a struct with a static `run(params, block, thread)` holding the body of one
// thread. The bodies use no warp intrinsics; the one shared-memory use is a block's
// cooperative copy of a tile (`StageShare`, then DK_SYNC), written so that a thread that copies
// every share itself reads the same tile. With DEPT_KERNELS_EMULATE the launch helper runs the
// bodies on the host, thread by thread, each thread copying the whole tile (DK_SYNC is then
// nothing), which is how the index math is checked on machines without a GPU
// (tests/cuda/emulate.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

#define DK_INLINE __host__ __device__ __forceinline__

namespace dept_kernels {

// A block is kWarps warps stacked along rows; a warp covers kLanes * VEC contiguous columns
// of one row, so every warp-wide access is one contiguous, fully used span of memory.
constexpr int kLanes = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kLanes * kWarps;
// Rows per thread: their loads are issued together (memory-level parallelism), and a low-rank
// factor value loaded once serves all of them.
constexpr int kRowsPerThread = 4;
constexpr int kRowTile = kWarps * kRowsPerThread;
constexpr int kMaxGridYZ = 65535;
// At most 128 registers per thread, so 4 blocks (16 warps) fit per SM: enough loads in flight
// to cover HBM latency.
constexpr int kMinBlocksPerSm = 4;

// Block-wide barrier and block-shared storage. Under emulation threads run one after another
// and each makes every share of a cooperative copy, so a static buffer and no barrier do.
#if defined(__CUDA_ARCH__) && !defined(DEPT_KERNELS_EMULATE)
#define DK_SYNC() __syncthreads()
#define DK_SHARED __shared__
#else
#define DK_SYNC() ((void)0)
#define DK_SHARED static
#endif

// The items of a cooperative copy of N items by a block that this thread makes: item(k) for
// k < kCount with has(k); item i goes to thread i % kThreads, so kCount is a compile-time
// constant and an unrolled copy has all its loads in flight together. Under emulation one
// thread makes them all.
template <int N>
struct StageShare {
#ifdef DEPT_KERNELS_EMULATE
  static constexpr int kCount = N;
  static constexpr int kStep = 1;
  DK_INLINE explicit StageShare(uint3) : first(0) {}
#else
  static constexpr int kCount = (N + kThreads - 1) / kThreads;
  static constexpr int kStep = kThreads;
  DK_INLINE explicit StageShare(uint3 thread) : first(int(thread.y) * kLanes + int(thread.x)) {}
#endif
  int first;
  DK_INLINE int item(int k) const { return first + k * kStep; }
  DK_INLINE bool has(int k) const { return item(k) < N; }
};

DK_INLINE float to_float(float x) { return x; }
DK_INLINE float to_float(__half x) { return __half2float(x); }
DK_INLINE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
DK_INLINE T from_float(float x);
template <>
DK_INLINE float from_float<float>(float x) {
  return x;
}
template <>
DK_INLINE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
DK_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements moved as one access of up to 16 bytes (two for 32-byte packs): 128-bit loads
// and stores need 16-byte alignment, which the launchers check before picking N > 1.
constexpr int pack_align(int bytes) { return bytes < 16 ? bytes : 16; }

template <typename T, int N>
struct alignas(pack_align(sizeof(T) * N)) Pack {
  T v[N];
};

// The packs travel as machine words of their alignment (uint4 for 16 bytes), punned through
// a union, so each access is one instruction of the widest width the alignment allows.
template <int Bytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

template <typename T, int N>
union PackWords {
  using W = typename Word<pack_align(sizeof(T) * N)>::type;
  static constexpr int kCount = sizeof(Pack<T, N>) / sizeof(W);
  Pack<T, N> pack;
  W words[kCount];
};

template <typename T, int N>
DK_INLINE Pack<T, N> load_pack(const T* p) {
  using U = PackWords<T, N>;
  U u;
#pragma unroll
  for (int q = 0; q < U::kCount; ++q) u.words[q] = reinterpret_cast<const typename U::W*>(p)[q];
  return u.pack;
}

// One vector store instruction. Plain assignments of a uint4 whose address adds a column
// offset to a pointer read from the kernel's parameter struct are split by nvcc into four
// 32-bit stores, hence the inline PTX on the device.
DK_INLINE void store_word(uint4* p, uint4 w) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z),
               "r"(w.w)
               : "memory");
#else
  *p = w;
#endif
}

DK_INLINE void store_word(uint2* p, uint2 w) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
#else
  *p = w;
#endif
}

DK_INLINE void store_word(unsigned int* p, unsigned int w) { *p = w; }
DK_INLINE void store_word(unsigned short* p, unsigned short w) { *p = w; }

template <typename T, int N>
DK_INLINE void store_pack(T* p, const Pack<T, N>& x) {
  using U = PackWords<T, N>;
  U u;
  u.pack = x;
#pragma unroll
  for (int q = 0; q < U::kCount; ++q)
    store_word(reinterpret_cast<typename U::W*>(p) + q, u.words[q]);
}

template <typename T, int N>
DK_INLINE void add_to(float (&acc)[N], const Pack<T, N>& x) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] += to_float(x.v[j]);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline bool aligned_to(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

DK_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename K>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    kernel_entry(const typename K::Params p) {
  K::run(p, blockIdx, threadIdx);
}

// Launches K on `grid` blocks of (kLanes, kWarps) threads; nothing for an empty grid.
template <typename K>
cudaError_t launch(int64_t gx, int64_t gy, int64_t gz, const typename K::Params& p,
                   cudaStream_t stream) {
  if (gx == 0 || gy == 0 || gz == 0) return cudaSuccess;
  if (gx > INT32_MAX || gy > kMaxGridYZ || gz > kMaxGridYZ) return cudaErrorInvalidConfiguration;
#ifdef DEPT_KERNELS_EMULATE
  (void)stream;
  for (int64_t z = 0; z < gz; ++z)
    for (int64_t y = 0; y < gy; ++y)
      for (int64_t x = 0; x < gx; ++x)
        for (unsigned ty = 0; ty < kWarps; ++ty)
          for (unsigned tx = 0; tx < kLanes; ++tx)
            K::run(p, make_uint3(unsigned(x), unsigned(y), unsigned(z)), make_uint3(tx, ty, 0));
  return cudaSuccess;
#else
  kernel_entry<K><<<dim3(unsigned(gx), unsigned(gy), unsigned(gz)), dim3(kLanes, kWarps), 0,
                    stream>>>(p);
  return cudaGetLastError();
#endif
}

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
cudaError_t dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace dept_kernels
