// The vector layer under csrc/kernels.cpp: one float vector type ``vf`` of VL lanes and the few operations the
// kernels use, for the instruction set chosen at compile time (kernels.py passes one of):
//   MINICPMV_AVX512BF16  AVX-512 F/BW/VL + BF16: 16 lanes; the matmul tiles use vdpbf16ps (MINICPMV_DPBF16)
//     + MINICPMV_AMX     and AMX-BF16 tiles for the bf16 matmuls (kernels.cpp, amx_blocks)
//   MINICPMV_AVX2        AVX2 + FMA + F16C: 8 lanes; bf16 widened to float32 in registers, FMA
//   MINICPMV_NEON        AArch64 Advanced SIMD: 4 lanes; the same widening, vfmaq
//   (none of them)       plain C++ over 4-lane arrays: a portable reference build (the kernel test driver)
// prefetch_stream: data read once (by default kept out of the outer caches: STREAM_HINT); prefetch_l2: data a
// later column pass reads again.
// The packed weight layouts (kernels.cpp) do not depend on the instruction set: a bf16 k-pair of VL columns is
// 2 VL consecutive uint16, so every variant reads the same bytes.

#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(MINICPMV_AVX512BF16) || defined(MINICPMV_AVX2)
#include <immintrin.h>
#ifndef STREAM_HINT  // prefetch_stream's hint (kernels.py sets it per CPU vendor)
#define STREAM_HINT _MM_HINT_NTA
#endif
#elif defined(MINICPMV_NEON)
#include <arm_neon.h>
#endif

namespace simd {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {  // IEEE half, exactly (subnormals, inf and NaN too)
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    float f = (float)man * (1.0f / 16777216.0f);  // zero and subnormals: man 2^-24
    memcpy(&u, &f, 4);
  } else {
    u = exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13);
  }
  u |= (uint32_t)(h & 0x8000) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#if defined(MINICPMV_AVX512BF16)
#if defined(MINICPMV_AMX)
constexpr const char* NAME = "amx";
#else
constexpr const char* NAME = "avx512bf16";
#endif
constexpr int VL = 16;
using vf = __m512;
inline __mmask16 mask_of(int64_t n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float a) { return _mm512_set1_ps(a); }
inline vf vld(const float* p) { return _mm512_loadu_ps(p); }
inline vf vldn(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask_of(n), p); }
inline void vst(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstn(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, mask_of(n), v); }
inline vf widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline vf vld_bf16(const uint16_t* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
inline vf vld_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline vf vld_bf16n(const uint16_t* p, int64_t n) { return widen(_mm256_maskz_loadu_epi16(mask_of(n), p)); }
inline void vst_bf16(uint16_t* p, vf v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
inline void vst_bf16n(uint16_t* p, vf v, int64_t n) { _mm256_mask_storeu_epi16(p, mask_of(n), (__m256i)_mm512_cvtneps_pbh(v)); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   // a b + c
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } // c - a b
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT); }
inline vf vpow2_mul(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n integral
inline void prefetch_stream(const void* p) { _mm_prefetch((const char*)p, STREAM_HINT); }
inline void prefetch_l1(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
inline void prefetch_l2(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T1); }
#define MINICPMV_DPBF16 1

#elif defined(MINICPMV_AVX2)
constexpr const char* NAME = "avx2";
constexpr int VL = 8;
using vf = __m256;
inline __m256i mask_of(int64_t n) {
  const int k = n >= 8 ? 8 : (int)n;
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float a) { return _mm256_set1_ps(a); }
inline vf vld(const float* p) { return _mm256_loadu_ps(p); }
inline vf vldn(const float* p, int64_t n) { return n >= 8 ? vld(p) : _mm256_maskload_ps(p, mask_of(n)); }
inline void vst(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstn(float* p, vf v, int64_t n) {
  if (n >= 8) vst(p, v); else _mm256_maskstore_ps(p, mask_of(n), v);
}
inline vf widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline vf vld_bf16(const uint16_t* p) { return widen(_mm_loadu_si128((const __m128i*)p)); }
inline vf vld_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline vf vld_bf16n(const uint16_t* p, int64_t n) {
  if (n >= 8) return vld_bf16(p);
  uint16_t t[8] = {0};
  memcpy(t, p, 2 * n);
  return vld_bf16(t);
}
inline __m128i narrow(vf v) {  // round to nearest even; NaN kept quiet
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void vst_bf16(uint16_t* p, vf v) { _mm_storeu_si128((__m128i*)p, narrow(v)); }
inline void vst_bf16n(uint16_t* p, vf v, int64_t n) {
  if (n >= 8) return vst_bf16(p, v);
  uint16_t t[8];
  vst_bf16(t, v);
  memcpy(p, t, 2 * n);
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vhmax(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2_mul(vf p, vf n) {  // n in [-126, 127]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline void prefetch_stream(const void* p) { _mm_prefetch((const char*)p, STREAM_HINT); }
inline void prefetch_l1(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
inline void prefetch_l2(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T1); }

// A bf16 k-pair of 8 columns (16 uint16: column-major pairs) as the even-k and odd-k float vectors.
struct Pair { vf even, odd; };
inline Pair pair_bits(__m256i v) {  // 8 x (lo 16 bits: even k, hi: odd k) as bf16
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)))};
}
inline Pair pair_bf16(const uint16_t* p) { return pair_bits(_mm256_loadu_si256((const __m256i*)p)); }
inline Pair pair_int8(const int8_t* p) {  // 16 int8 (8 columns x a k-pair) exactly
  const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
  return {_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16)), _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 16))};
}
// 16 int4 bytes (8 columns x a k-pair, two nibbles each) -> (low-nibble pair, high-nibble pair), each value 128 + u.
inline void pair_int4(const uint8_t* p, Pair& lo, Pair& hi) {
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)), bias = _mm256_set1_epi16(0x4300);
  lo = pair_bits(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi16(0x000f)), bias));
  hi = pair_bits(_mm256_or_si256(_mm256_srli_epi16(v, 4), bias));
}

#elif defined(MINICPMV_NEON)
constexpr const char* NAME = "neon";
constexpr int VL = 4;
using vf = float32x4_t;
inline vf vzero() { return vdupq_n_f32(0.0f); }
inline vf vset(float a) { return vdupq_n_f32(a); }
inline vf vld(const float* p) { return vld1q_f32(p); }
inline vf vldn(const float* p, int64_t n) {
  if (n >= 4) return vld(p);
  float t[4] = {0, 0, 0, 0};
  memcpy(t, p, 4 * n);
  return vld(t);
}
inline void vst(float* p, vf v) { vst1q_f32(p, v); }
inline void vstn(float* p, vf v, int64_t n) {
  if (n >= 4) return vst(p, v);
  float t[4];
  vst(t, v);
  memcpy(p, t, 4 * n);
}
inline vf vld_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
inline vf vld_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
inline vf vld_bf16n(const uint16_t* p, int64_t n) {
  if (n >= 4) return vld_bf16(p);
  uint16_t t[4] = {0, 0, 0, 0};
  memcpy(t, p, 2 * n);
  return vld_bf16(t);
}
inline uint16x4_t narrow(vf v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7fff))), 16);
  const uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffff)), vdupq_n_u32(0x7f800000));
  return vmovn_u32(vbslq_u32(nan, vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40)), r));
}
inline void vst_bf16(uint16_t* p, vf v) { vst1_u16(p, narrow(v)); }
inline void vst_bf16n(uint16_t* p, vf v, int64_t n) {
  if (n >= 4) return vst_bf16(p, v);
  uint16_t t[4];
  vst_bf16(t, v);
  memcpy(p, t, 2 * n);
}
inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline vf vfnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
inline float vsum(vf a) { return vaddvq_f32(a); }
inline float vhmax(vf a) { return vmaxvq_f32(a); }
inline vf vround(vf a) { return vrndnq_f32(a); }
inline vf vpow2_mul(vf p, vf n) {
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
inline void prefetch_stream(const void* p) { __builtin_prefetch(p, 0, 0); }
inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

struct Pair { vf even, odd; };
inline Pair pair_bits(uint32x4_t v) {
  return {vreinterpretq_f32_u32(vshlq_n_u32(v, 16)), vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff0000u)))};
}
inline Pair pair_bf16(const uint16_t* p) { return pair_bits(vreinterpretq_u32_u16(vld1q_u16(p))); }
inline Pair pair_int8(const int8_t* p) {
  const int32x4_t v = vreinterpretq_s32_s16(vmovl_s8(vld1_s8(p)));
  return {vcvtq_f32_s32(vshrq_n_s32(vshlq_n_s32(v, 16), 16)), vcvtq_f32_s32(vshrq_n_s32(v, 16))};
}
inline void pair_int4(const uint8_t* p, Pair& lo, Pair& hi) {
  const uint16x8_t v = vmovl_u8(vld1_u8(p)), bias = vdupq_n_u16(0x4300);
  lo = pair_bits(vreinterpretq_u32_u16(vorrq_u16(vandq_u16(v, vdupq_n_u16(0x000f)), bias)));
  hi = pair_bits(vreinterpretq_u32_u16(vorrq_u16(vshrq_n_u16(v, 4), bias)));
}

#else  // portable C++: 4-lane arrays the compiler may vectorise
constexpr const char* NAME = "generic";
constexpr int VL = 4;
struct vf { float v[4]; };
#define MINICPMV_LANES(expr) vf r; for (int i = 0; i < 4; ++i) r.v[i] = (expr); return r
inline vf vzero() { MINICPMV_LANES(0.0f); }
inline vf vset(float a) { MINICPMV_LANES(a); }
inline vf vld(const float* p) { MINICPMV_LANES(p[i]); }
inline vf vldn(const float* p, int64_t n) { MINICPMV_LANES(i < n ? p[i] : 0.0f); }
inline void vst(float* p, vf v) { for (int i = 0; i < 4; ++i) p[i] = v.v[i]; }
inline void vstn(float* p, vf v, int64_t n) { for (int i = 0; i < 4 && i < n; ++i) p[i] = v.v[i]; }
inline vf vld_bf16(const uint16_t* p) { MINICPMV_LANES(bf16_to_f32(p[i])); }
inline vf vld_f16(const uint16_t* p) { MINICPMV_LANES(f16_to_f32(p[i])); }
inline vf vld_bf16n(const uint16_t* p, int64_t n) { MINICPMV_LANES(i < n ? bf16_to_f32(p[i]) : 0.0f); }
inline void vst_bf16(uint16_t* p, vf v) { for (int i = 0; i < 4; ++i) p[i] = f32_to_bf16(v.v[i]); }
inline void vst_bf16n(uint16_t* p, vf v, int64_t n) { for (int i = 0; i < 4 && i < n; ++i) p[i] = f32_to_bf16(v.v[i]); }
inline vf vadd(vf a, vf b) { MINICPMV_LANES(a.v[i] + b.v[i]); }
inline vf vsub(vf a, vf b) { MINICPMV_LANES(a.v[i] - b.v[i]); }
inline vf vmul(vf a, vf b) { MINICPMV_LANES(a.v[i] * b.v[i]); }
inline vf vdiv(vf a, vf b) { MINICPMV_LANES(a.v[i] / b.v[i]); }
inline vf vmax(vf a, vf b) { MINICPMV_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline vf vmin(vf a, vf b) { MINICPMV_LANES(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
inline vf vfma(vf a, vf b, vf c) { MINICPMV_LANES(fmaf(a.v[i], b.v[i], c.v[i])); }
inline vf vfnma(vf a, vf b, vf c) { MINICPMV_LANES(fmaf(-a.v[i], b.v[i], c.v[i])); }
inline float vsum(vf a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
inline float vhmax(vf a) { return fmaxf(fmaxf(a.v[0], a.v[1]), fmaxf(a.v[2], a.v[3])); }
inline vf vround(vf a) { MINICPMV_LANES(nearbyintf(a.v[i])); }
inline vf vpow2_mul(vf p, vf n) { MINICPMV_LANES(ldexpf(p.v[i], (int)n.v[i])); }
inline vf vbits(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  const uint32_t b[4] = {b0, b1, b2, b3};
  vf r;
  memcpy(r.v, b, 16);
  return r;
}
#undef MINICPMV_LANES
inline void prefetch_stream(const void* p) { __builtin_prefetch(p, 0, 0); }
inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

struct Pair { vf even, odd; };
inline Pair pair_bf16(const uint16_t* p) {
  Pair r;
  for (int i = 0; i < 4; ++i) r.even.v[i] = bf16_to_f32(p[2 * i]), r.odd.v[i] = bf16_to_f32(p[2 * i + 1]);
  return r;
}
inline Pair pair_int8(const int8_t* p) {
  Pair r;
  for (int i = 0; i < 4; ++i) r.even.v[i] = p[2 * i], r.odd.v[i] = p[2 * i + 1];
  return r;
}
inline void pair_int4(const uint8_t* p, Pair& lo, Pair& hi) {
  for (int i = 0; i < 4; ++i) {
    lo.even.v[i] = 128.0f + (p[2 * i] & 15), lo.odd.v[i] = 128.0f + (p[2 * i + 1] & 15);
    hi.even.v[i] = 128.0f + (p[2 * i] >> 4), hi.odd.v[i] = 128.0f + (p[2 * i + 1] >> 4);
  }
}
#endif

// exp(x): 2^n p(r) with x = n ln2 + r, |r| <= ln2 / 2 (Cephes' polynomial, ~1 ulp).
inline vf vexp(vf x) {
  x = vmin(vmax(x, vset(-87.0f)), vset(88.0f));
  const vf n = vround(vmul(x, vset(1.44269504f)));
  vf r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vf p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
  return vpow2_mul(p, n);
}

inline vf vsilu(vf x) { return vdiv(x, vadd(vset(1.0f), vexp(vsub(vzero(), x)))); }
inline vf vsigmoid(vf x) { return vdiv(vset(1.0f), vadd(vset(1.0f), vexp(vsub(vzero(), x)))); }

// gelu(x) with the tanh approximation: x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
inline vf vgelu_tanh(vf x) {
  const vf u = vmul(vset(-1.5957691216f), vfma(vmul(vset(0.044715f), x), vmul(x, x), x));  // -2 sqrt(2/pi) (...)
  return vdiv(x, vadd(vset(1.0f), vexp(u)));
}

}  // namespace simd
