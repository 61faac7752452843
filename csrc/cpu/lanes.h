// Sixteen fp32 lanes loaded from and stored to fp32, bf16 or fp16 memory (AVX-512), with the
// same bits as the scalar conversions of c10 that the reference path uses: a bf16 load is
// a 16-bit shift, an fp16 load `vcvtph2ps` (c10::Half's own `_cvtsh_ss` with F16C), both
// exact; a bf16 store rounds to nearest even with any NaN stored as 0x7FC0
// (`c10::detail::round_to_nearest_even`), an fp16 store is `vcvtps2ph` in round-to-nearest
// (c10::Half's `_cvtss_sh`).
//
// Why: the compiler vectorises a loop of c10::BFloat16 loads, but not its stores (a NaN
// branch per element), nor c10::Half either way (one scalar `_cvtsh_ss` per element). At
// LLaMA-7B dims (B = 8, s = 512, d = 4096, two threads) the forward's low-rank delta
// added 1.8 ms in bf16 and 6.0 ms in fp16 against 0.8 ms in fp32, and the gradient sums took
// 4.9 ms in fp16 against 1.2 ms in bf16.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DEPT_KERNELS_LANES 1
#else
#define DEPT_KERNELS_LANES 0
#endif

namespace dept_kernels::lanes {

// Elements per vector; 0 where the target has no AVX-512 (callers then keep scalar loops).
constexpr int64_t kWidth = DEPT_KERNELS_LANES ? 16 : 0;

// Element types with loads and stores here (fp64 keeps the scalar loops).
template <typename T>
constexpr bool kHas = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                      std::is_same_v<T, c10::Half>;

#if DEPT_KERNELS_LANES
inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline __m512 load(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The bits of 16 bf16 / fp16 elements rounded from v.
inline __m256i rounded_bits(const c10::BFloat16*, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

inline __m256i rounded_bits(const c10::Half*, __m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

template <typename T>
inline void store(T* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), rounded_bits(p, v));
}

// Streaming (non-temporal) stores of 16 elements to a vector-aligned `p`: of v rounded, or
// of `src`'s bits unchanged (a copy keeps every NaN's payload, which a round trip through
// fp32 would not).
inline void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }

template <typename T>
inline void stream(T* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), rounded_bits(p, v));
}

inline void stream_copy(float* p, const float* src) { _mm512_stream_ps(p, _mm512_loadu_ps(src)); }

template <typename T>
inline void stream_copy(T* p, const T* src) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
}
#endif

}  // namespace dept_kernels::lanes
