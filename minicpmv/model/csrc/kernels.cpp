// Small-batch matmul over pre-packed weights: y[M, N] = x[M, K] @ W^T, for each instruction set of simd.h.
//
// Decode multiplies one (or a few) activation rows by every weight matrix once per token, so the work is bound by
// how fast the weights stream from memory. The packed layouts make each 64-column block one linear stream:
//   bf16: [N/64][K/2][64][2] bf16        one k-pair of 64 columns = 256 bytes = 4 zmm, fed to vdpbf16ps
//   int8: [N/64][K/2][64][2] int8        the bf16 layout, converted to bf16 in registers; + a float scale per column,
//                                        or (GGUF Q8_0: groups of G = 32) fp16 scales [N/64][K/G][64]
//   int4: [N/64][K/G][G/4][4][16][2] u8  per group of G, 16 columns x 2 k per 32 bytes; low nibbles hold the group's
//                                        first G/2 k, high nibbles the rest; + a bf16 scale per column and group
// Each activation row's k-pair (or k) is broadcast and multiplied into column accumulators, so a weight load is
// reused by every row of the batch and no horizontal sums are needed. With AVX-512 BF16 a k-pair of 16 columns is
// one vdpbf16ps; elsewhere (AVX2, NEON) the pair's even and odd k are widened to float32 in registers (a shift and
// a mask: bf16 is the top half of a float32) and fed to two FMAs, so the weights stay bf16 in memory.
// Blocks are split over OpenMP threads, which share the runtime that PyTorch already loaded (same libgomp soname).
//
// int4 nibbles u = q + 8 are turned into bf16 by OR-ing the exponent of 128 (0x4300 | u == 128 + u exactly), so
// the group sum is sum((136 + q) x) and 136 * sum(x) over the group is subtracted before scaling. On AVX2 they are
// multiplied as integers instead, with the activations as int16 (group_int4_i16).
//
// A batch of decode streams (up to 32 rows) goes through each block in row groups of the tile shape that uses the
// registers best (MAXR rows: 6 x 4 chunks with AVX-512 BF16, 4 x 2 vectors on AVX2): the block streams from memory
// with the first group and stays in L2 for the others, which (AVX-512 BF16) ask for the next block meanwhile
// (run_blocks).
// bf16 weights times 8 rows or more on AVX2 (and plain C++) take the wide tiles instead: each block widened to
// float32 once per k chunk, then 6-row register tiles over it (wide_blocks).
// The amx build (AVX-512 BF16 + AMX-BF16) multiplies bf16 and int8 weights at every row count, and int4 in prefill,
// in AMX tiles of 16 rows x 64 columns that load straight from the packed layout (amx_blocks).
//
// The epilogue adds a bias and applies gelu (act = 2, tanh form), or (act = 1) computes silu(gate) * up where each
// 64-column block holds 32 gate and the matching 32 up columns; it writes bf16 (round to nearest even) or float32.
//
// Below the matmul: the rest of the language model's hot path (RMSNorm, a Gated DeltaNet layer from its projections
// to out_proj, one-token gated attention), attention within the vision tower's units, and a whole decode step.

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

#if defined(MINICPMV_AMX)
#include <sys/syscall.h>
#include <unistd.h>
// Linux gives a process the AMX tile state only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA);
// kernels.py asks too, before it chooses this build.
__attribute__((constructor)) static void amx_permission() { syscall(SYS_arch_prctl, 0x1023, 18); }
#endif

using namespace simd;

namespace {

constexpr int BLOCK = 64;  // output columns per packed block
constexpr int MT = 4;      // activation rows per register tile, many rows (prefill, the vision tower)
#ifndef PREFETCH
#define PREFETCH 8192  // bytes to prefetch ahead in a bf16 weight stream (measured best on Zen 4: 8 KiB; kernels.py
                       // sets other CPUs' own)
#endif
#ifndef PREFETCH_Q
#define PREFETCH_Q 4096  // the same for int8 / int4 (fewer bytes per k: measured best 4 KiB)
#endif

// LoRA in the decode step (below, linear_lora): the low-rank products of a linear's rows, added in its epilogue.
struct LoraEpilogue;
void lora_epilogue(const LoraEpilogue* e, float* acc, int rows, int64_t m0, int64_t b);
thread_local const LoraEpilogue* lora_current = nullptr;  // set by linear_lora around its linear()

struct Epilogue {
  const float* bias;  // [N] or null
  void* out;
  int64_t ldo, n_out;  // row stride and number of valid output columns
  int fp32, act;
  const LoraEpilogue* lora = lora_current;

  // acc: [rows][64] float32 for packed block b.
  void operator()(const float* acc, int rows, int64_t m0, int64_t b) const {
    if (lora) lora_epilogue(lora, const_cast<float*>(acc), rows, m0, b);  // (acc is run_blocks' own buffer)
    const int64_t col0 = act == 1 ? b * (BLOCK / 2) : b * BLOCK;
    const int width = act == 1 ? BLOCK / 2 : BLOCK;
    for (int m = 0; m < rows; ++m) {
      const float* a = acc + m * BLOCK;
      char* o = (char*)out + ((m0 + m) * ldo) * (fp32 ? 4 : 2);
      for (int c = 0; c < width; c += VL) {
        const int64_t j = col0 + c;
        if (j >= n_out) break;
        const int64_t left = n_out - j;
        vf v = vld(a + c);
        if (act == 1) {
          v = vmul(vsilu(v), vld(a + BLOCK / 2 + c));
        } else {
          if (bias) v = vadd(v, vldn(bias + j, left));
          if (act == 2) v = vgelu_tanh(v);
        }
        if (fp32)
          vstn((float*)o + j, v, left);
        else
          vst_bf16n((uint16_t*)o + j, v, left);
      }
    }
  }
};

// Activations: bf16, or float32 (linear_panel widens them once per call: the tiles then broadcast from memory).
inline float xval(const uint16_t* p) { return bf16_to_f32(*p); }
inline float xval(const float* p) { return *p; }

// Weights ahead of a column pass: streamed past the caches when one pass reads the whole block, kept in L2 when the
// block is read in several passes (their cache lines may be shared: a pass of 16 int8 columns reads half a line).
// run_blocks says per row group how a block's later row groups read it (tiles take pf_mode once per call):
// PF_AUTO one group (as above), PF_KEEP the first of several (into L2, whole passes too), PF_NONE a later one (the
// block is in L2 already: no prefetches taking load slots).
enum { PF_AUTO, PF_KEEP, PF_NONE, PF_NEXT };
thread_local int pf_mode __attribute__((tls_model("initial-exec"))) = PF_AUTO;
// PF_NEXT (a later row group, when this thread's next block follows): the next block streams in while the later
// groups compute, so that its first group finds it in L2. The tiles ask for pf_stride bytes of it per k-pair from
// pf_next, of the 64-byte lines whose bit is set in pf_lines (the later groups share them).
thread_local int pf_lines __attribute__((tls_model("initial-exec"))) = 0;
thread_local int64_t pf_stride __attribute__((tls_model("initial-exec"))) = 0;
thread_local const char* pf_next __attribute__((tls_model("initial-exec"))) = nullptr;

inline void prefetch_next(int64_t p) {
  for (int l = 0; l < pf_stride / 64; ++l)
    if (pf_lines >> l & 1) prefetch_l2(pf_next + p * pf_stride + 64 * l);
}

template <bool SPLIT>
inline void prefetch_w(const void* p, int pf) {
  if (pf >= PF_NONE) return;  // (PF_NEXT: the tile asks for the next block itself)
  if (SPLIT || pf == PF_KEEP) prefetch_l2(p); else prefetch_stream(p);
}

#if defined(MINICPMV_DPBF16)
// ---- AVX-512 BF16 tiles: a k-pair of 16 columns per vdpbf16ps --------------------------------------------------
inline __m512bh bcast_pair(const uint16_t* x) {
  uint32_t v;
  memcpy(&v, x, 4);
  return (__m512bh)_mm512_set1_epi32((int)v);
}

// 32 int8 weights (16 columns x a k-pair, the bf16 layout) -> bf16, exactly.
inline __m512bh int8_pairs(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// acc_out[R][64] columns of chunks [c0, c0 + C) (16 columns each) = x[R, 2 k2] . those columns of the block's k2
// k-pairs; W = uint16_t (bf16) or int8_t (converted to bf16 in registers as it streams by; the column scales come
// later). R x C accumulators: up to 6 rows take the whole block in one pass (12 rows in two, more one chunk at a
// time), so each weight vector loaded serves every row of the group.
template <int R, int C, class W>
void matmul_cols(const uint16_t* x, int64_t ldx, int64_t k2, const W* w, float* acc_out, int c0) {
  const int pf = pf_mode;
  constexpr bool int8 = std::is_same_v<W, int8_t>;
  __m512 acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    const W* wp = w + p * 2 * BLOCK + 32 * c0;
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) {
      if constexpr (int8) {
        if (c % 2 == 0) prefetch_w<(C < 4)>((const char*)wp + PREFETCH_Q + 32 * c, pf);
        wv[c] = int8_pairs(wp + 32 * c);
      } else {
        prefetch_w<(C < 4)>((const char*)wp + PREFETCH + 64 * c, pf);
        wv[c] = (__m512bh)_mm512_loadu_si512(wp + 32 * c);
      }
    }
    if (pf == PF_NEXT) prefetch_next(p);
    for (int m = 0; m < R; ++m) {
      const __m512bh xv = bcast_pair(x + m * ldx + 2 * p);
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv[c], xv);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc_out + m * BLOCK + 16 * (c0 + c), acc[m][c]);
}

// Chunks per column pass: R x C accumulators beside C weight vectors and a broadcast in the 32 zmm. Up to 6 rows
// take the whole block in one pass: 24 vdpbf16ps per k-pair for 4 weight loads and 6 broadcasts.
constexpr int chunks_for(int R) { return R <= 6 ? 4 : R <= 12 ? 2 : 1; }
// int4 holds two weight vectors per chunk (low and high nibbles).
constexpr int int4_chunks_for(int R) { return R <= 4 ? 4 : R <= 8 ? 2 : 1; }

template <int R, class W>
void matmul_tile(const uint16_t* x, int64_t ldx, int64_t k2, const W* w, float* acc_out) {
  constexpr int C = chunks_for(R);
  for (int c0 = 0; c0 < 4; c0 += C) matmul_cols<R, C>(x, ldx, k2, w, acc_out, c0);
}

// int8 in groups of 2 g2 k with an fp16 scale per column and group (GGUF Q8_0's own: as many bytes as llama.cpp
// streams): each group's products in their own accumulators, scaled into the row sums at its end (twice the
// accumulators: fewer chunks per pass).
template <int R, int C>
void int8_groups_cols(const uint16_t* x, int64_t ldx, int64_t k2, int64_t g2, const int8_t* w, const uint16_t* scale,
                      float* acc_out, int c0) {
  const int pf = pf_mode;
  __m512 sum[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) sum[m][c] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < k2; p0 += g2, scale += BLOCK) {
    __m512 acc[R][C];
    for (int m = 0; m < R; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p0 + g2; ++p) {
      const int8_t* wp = w + p * 2 * BLOCK + 32 * c0;
      __m512bh wv[C];
      for (int c = 0; c < C; ++c) {
        if (c % 2 == 0) prefetch_w<(C < 4)>((const char*)wp + PREFETCH_Q + 32 * c, pf);
        wv[c] = int8_pairs(wp + 32 * c);
      }
      for (int m = 0; m < R; ++m) {
        const __m512bh xv = bcast_pair(x + m * ldx + 2 * p);
        for (int c = 0; c < C; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv[c], xv);
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 sc = vld_f16(scale + 16 * (c0 + c));
      for (int m = 0; m < R; ++m) sum[m][c] = _mm512_fmadd_ps(acc[m][c], sc, sum[m][c]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc_out + m * BLOCK + 16 * (c0 + c), sum[m][c]);
}

template <int R>
void tile_int8_groups(const uint16_t* x, int64_t ldx, int64_t k2, int64_t g2, const int8_t* w, const uint16_t* scale,
                      float* acc_out) {
  constexpr int C = R <= 3 ? 4 : R <= 7 ? 2 : 1;
  for (int c0 = 0; c0 < 4; c0 += C) int8_groups_cols<R, C>(x, ldx, k2, g2, w, scale, acc_out, c0);
}

// One group of g k-values for R rows over chunks [c0, c0 + C): acc_out[m][.] += scale * (sum((136 + q) x) - 136 *
// gsum[m]).
template <int R, int C>
void group_int4_cols(const uint16_t* x, int64_t ldx, int64_t g, const uint8_t* w, const uint16_t* scale,
                     const float* gsum, int64_t ldg, float* acc_out, int c0) {
  const int pf = pf_mode;
  const __m512i lo_mask = _mm512_set1_epi16(0x000f), bias = _mm512_set1_epi16(0x4300);
  // Low and high nibbles into separate accumulators where registers allow: two dependency chains per column
  // vector instead of one (a single row is latency bound otherwise).
  constexpr int A = R <= 2 ? 2 : 1;
  __m512 acc[R][C], acc2[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps(), acc2[m][c] = _mm512_setzero_ps();
  const int64_t rows = g / 4;  // k-pairs in the low nibbles; the same number in the high ones
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wp = w + r * 4 * 32;
    if (c0 == 0) prefetch_w<(C < 4)>(wp + PREFETCH_Q, pf), prefetch_w<(C < 4)>(wp + PREFETCH_Q + 64, pf);
    __m512bh lo[C], hi[C];
    for (int c = 0; c < C; ++c) {
      __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wp + 32 * (c0 + c))));
      lo[c] = (__m512bh)_mm512_ternarylogic_epi32(v, lo_mask, bias, 0xEA);  // (v & 0xf) | 0x4300
      hi[c] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
    }
    for (int m = 0; m < R; ++m) {
      __m512bh xl = bcast_pair(x + m * ldx + 2 * r), xh = bcast_pair(x + m * ldx + 2 * (r + rows));
      for (int c = 0; c < C; ++c) {
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], lo[c], xl);
        if (A == 2)
          acc2[m][c] = _mm512_dpbf16_ps(acc2[m][c], hi[c], xh);
        else
          acc[m][c] = _mm512_dpbf16_ps(acc[m][c], hi[c], xh);
      }
    }
  }
  if (A == 2)
    for (int m = 0; m < R; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_add_ps(acc[m][c], acc2[m][c]);
  __m512 s[C];
  for (int c = 0; c < C; ++c) s[c] = vld_bf16(scale + 16 * (c0 + c));
  for (int m = 0; m < R; ++m) {
    __m512 off = _mm512_set1_ps(136.0f * gsum[m * ldg]);
    for (int c = 0; c < C; ++c) {
      float* o = acc_out + m * BLOCK + 16 * (c0 + c);
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_sub_ps(acc[m][c], off), s[c], _mm512_loadu_ps(o)));
    }
  }
}

template <int R>
void group_int4(const uint16_t* x, int64_t ldx, int64_t g, const uint8_t* w, const uint16_t* scale,
                const float* gsum, int64_t ldg, float* acc_out) {
  constexpr int C = int4_chunks_for(R);
  for (int c0 = 0; c0 < 4; c0 += C) group_int4_cols<R, C>(x, ldx, g, w, scale, gsum, ldg, acc_out, c0);
}

inline void int8_to_bf16(const int8_t* w, int64_t n, uint16_t* out) {  // n a multiple of 32
  for (int64_t i = 0; i < n; i += 32) _mm512_storeu_si512(out + i, (__m512i)int8_pairs(w + i));
}

#else
// ---- portable tiles (AVX2, NEON, plain C++): each k-pair widened to float32, two FMAs per column vector --------
// Column vectors per register tile of R rows: as many accumulators as the register file holds beside the weights
// (AVX2: 16 ymm, 8 for accumulators; NEON: 32 q registers, 16), a power of two dividing the block.
#if defined(MINICPMV_AVX2)
constexpr int NREG = 16, ACC_REGS = 8;
#else
constexpr int NREG = 32, ACC_REGS = 16;
#endif
constexpr int NVEC = BLOCK / VL;  // column vectors per block
constexpr int cols_for(int R, int acc_regs = ACC_REGS) {
  int c = NVEC;
  while (c > 1 && c * R > acc_regs) c /= 2;
  return c;
}

inline Pair load_pair(const uint16_t* p) { return pair_bf16(p); }
inline Pair load_pair(const int8_t* p) { return pair_int8(p); }

// acc_out[R][64] columns [c0, c0 + CV VL) = x[R, 2 k2] . those columns of the block's k2 k-pairs.
template <int R, int CV, class W, class X>
void matmul_cols(const X* x, int64_t ldx, int64_t k2, const W* w, float* acc_out, int c0) {
  const int pf = pf_mode;
  constexpr int ahead = std::is_same_v<W, int8_t> ? PREFETCH_Q : PREFETCH;
  constexpr int bytes = CV * VL * 2 * (int)sizeof(W);  // of each k-pair row read here
  vf acc[R][CV];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) acc[m][v] = vzero();
  for (int64_t p = 0; p < k2; ++p) {
    const W* wp = w + p * 2 * BLOCK + 2 * c0;
    for (int b = 0; b < bytes; b += 64) prefetch_w<(CV < NVEC)>((const char*)wp + ahead + b, pf);
    // Registers: either every widened weight pair stays live while each row's pair is broadcast, or every row's
    // broadcasts stay live while the weight pairs come one at a time, whichever fits beside the accumulators.
    if constexpr (2 * CV + R * CV + 3 <= NREG) {
      Pair pw[CV];
      for (int v = 0; v < CV; ++v) pw[v] = load_pair(wp + 2 * VL * v);
      for (int m = 0; m < R; ++m) {
        const vf x0 = vset(xval(x + m * ldx + 2 * p)), x1 = vset(xval(x + m * ldx + 2 * p + 1));
        for (int v = 0; v < CV; ++v) acc[m][v] = vfma(pw[v].odd, x1, vfma(pw[v].even, x0, acc[m][v]));
      }
    } else {
      vf x0[R], x1[R];
      for (int m = 0; m < R; ++m)
        x0[m] = vset(xval(x + m * ldx + 2 * p)), x1[m] = vset(xval(x + m * ldx + 2 * p + 1));
      for (int v = 0; v < CV; ++v) {
        const Pair pw = load_pair(wp + 2 * VL * v);
        for (int m = 0; m < R; ++m) acc[m][v] = vfma(pw.odd, x1[m], vfma(pw.even, x0[m], acc[m][v]));
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) vst(acc_out + m * BLOCK + c0 + VL * v, acc[m][v]);
}

template <int R, class W, class X>
void matmul_tile(const X* x, int64_t ldx, int64_t k2, const W* w, float* acc_out) {
  constexpr int CV = cols_for(R);
  for (int c0 = 0; c0 < BLOCK; c0 += CV * VL) matmul_cols<R, CV>(x, ldx, k2, w, acc_out, c0);
}

// int8 in groups of 2 g2 k with an fp16 scale per column and group (GGUF Q8_0), as the AVX-512 one above.
template <int R, int CV, class X>
void int8_groups_cols(const X* x, int64_t ldx, int64_t k2, int64_t g2, const int8_t* w, const uint16_t* scale,
                      float* acc_out, int c0) {
  const int pf = pf_mode;
  vf sum[R][CV];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) sum[m][v] = vzero();
  for (int64_t p0 = 0; p0 < k2; p0 += g2, scale += BLOCK) {
    vf acc[R][CV];
    for (int m = 0; m < R; ++m)
      for (int v = 0; v < CV; ++v) acc[m][v] = vzero();
    for (int64_t p = p0; p < p0 + g2; ++p) {
      const int8_t* wp = w + p * 2 * BLOCK + 2 * c0;
      for (int b = 0; b < CV * VL * 2; b += 64) prefetch_w<(CV < NVEC)>((const char*)wp + PREFETCH_Q + b, pf);
      vf x0[R], x1[R];
      for (int m = 0; m < R; ++m)
        x0[m] = vset(xval(x + m * ldx + 2 * p)), x1[m] = vset(xval(x + m * ldx + 2 * p + 1));
      for (int v = 0; v < CV; ++v) {
        const Pair pw = load_pair(wp + 2 * VL * v);
        for (int m = 0; m < R; ++m) acc[m][v] = vfma(pw.odd, x1[m], vfma(pw.even, x0[m], acc[m][v]));
      }
    }
    for (int v = 0; v < CV; ++v) {
      const vf sc = vld_f16(scale + c0 + VL * v);
      for (int m = 0; m < R; ++m) sum[m][v] = vfma(acc[m][v], sc, sum[m][v]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) vst(acc_out + m * BLOCK + c0 + VL * v, sum[m][v]);
}

template <int R, class X>
void tile_int8_groups(const X* x, int64_t ldx, int64_t k2, int64_t g2, const int8_t* w, const uint16_t* scale,
                      float* acc_out) {
  constexpr int CV = cols_for(R, ACC_REGS / 2);  // the row sums beside the group's accumulators
  for (int c0 = 0; c0 < BLOCK; c0 += CV * VL) int8_groups_cols<R, CV>(x, ldx, k2, g2, w, scale, acc_out, c0);
}

// One int4 group for R rows over columns [c0, c0 + CV VL): acc_out[m][.] += scale (sum((136 + q) x) - 136 gsum[m]).
template <int R, int CV, class X>
void group_int4_cols(const X* x, int64_t ldx, int64_t g, const uint8_t* w, const uint16_t* scale,
                     const float* gsum, int64_t ldg, float* acc_out, int c0) {
  const int pf = pf_mode;
  vf acc[R][CV];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) acc[m][v] = vzero();
  const int64_t rows = g / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wp = w + r * 4 * 32;
    if (c0 == 0) prefetch_w<(CV < NVEC)>(wp + PREFETCH_Q, pf), prefetch_w<(CV < NVEC)>(wp + PREFETCH_Q + 64, pf);
    Pair lo[CV], hi[CV];
    for (int v = 0; v < CV; ++v) {
      const int col = c0 + VL * v;  // bytes of column col: chunk col / 16, then 2 per column
      pair_int4(wp + (col / 16) * 32 + (col % 16) * 2, lo[v], hi[v]);
    }
    for (int m = 0; m < R; ++m) {
      const X* xm = x + m * ldx;
      const vf xl0 = vset(xval(xm + 2 * r)), xl1 = vset(xval(xm + 2 * r + 1));
      const vf xh0 = vset(xval(xm + 2 * (r + rows))), xh1 = vset(xval(xm + 2 * (r + rows) + 1));
      for (int v = 0; v < CV; ++v) {
        vf a = vfma(lo[v].even, xl0, acc[m][v]);
        a = vfma(lo[v].odd, xl1, a);
        a = vfma(hi[v].even, xh0, a);
        acc[m][v] = vfma(hi[v].odd, xh1, a);
      }
    }
  }
  for (int m = 0; m < R; ++m) {
    const vf off = vset(136.0f * gsum[m * ldg]);
    for (int v = 0; v < CV; ++v) {
      float* o = acc_out + m * BLOCK + c0 + VL * v;
      vst(o, vfma(vsub(acc[m][v], off), vld_bf16(scale + c0 + VL * v), vld(o)));
    }
  }
}

template <int R, class X>
void group_int4(const X* x, int64_t ldx, int64_t g, const uint8_t* w, const uint16_t* scale,
                const float* gsum, int64_t ldg, float* acc_out) {
  constexpr int CV = cols_for(R, NREG == 16 ? 4 : 8);  // 4 weight vectors per column vector stay live
  for (int c0 = 0; c0 < BLOCK; c0 += CV * VL) group_int4_cols<R, CV>(x, ldx, g, w, scale, gsum, ldg, acc_out, c0);
}

inline void int8_to_bf16(const int8_t* w, int64_t n, uint16_t* out) {  // exact: |q| <= 127
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16((float)w[i]);
}
#endif

#if defined(MINICPMV_AVX2)
// int4 on AVX2 by integer dot products: each group's activations as int16 with a power-of-two scale (15 bits for
// the group's largest: finer than bf16 for every value above 1/256 of it, exact for small integers), so
// a nibble pair and an activation pair make one vpmaddwd and the group sums are exact int32, converted once per
// group: half the instructions of widening each nibble to float32. The nibbles u = q + 8 are used as they are and
// 8 sum(xq) is subtracted. gs (per row, row stride ldg): the groups' sums of xq [ng], then their scales [ng].
template <int R, int CV>
void group_int4_i16(const int16_t* xq, int64_t ldx, int64_t g, const uint8_t* w, const uint16_t* scale,
                    const float* gs, int64_t ldg, int64_t ng, float* acc_out, int c0) {
  const int pf = pf_mode;
  __m256i acc[R][CV];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_setzero_si256();
  const __m256i nib = _mm256_set1_epi16(0x000f);
  const int64_t rows = g / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wp = w + r * 4 * 32;
    if (c0 == 0) prefetch_w<(CV < 8)>(wp + PREFETCH_Q, pf), prefetch_w<(CV < 8)>(wp + PREFETCH_Q + 64, pf);
    __m256i lo[CV], hi[CV];
    for (int v = 0; v < CV; ++v) {
      const int col = c0 + 8 * v;
      const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wp + (col / 16) * 32 + (col % 16) * 2)));
      lo[v] = _mm256_and_si256(u, nib), hi[v] = _mm256_srli_epi16(u, 4);
    }
    for (int m = 0; m < R; ++m) {
      int32_t pl, ph;
      memcpy(&pl, xq + m * ldx + 2 * r, 4);
      memcpy(&ph, xq + m * ldx + 2 * (r + rows), 4);
      const __m256i xl = _mm256_set1_epi32(pl), xh = _mm256_set1_epi32(ph);
      for (int v = 0; v < CV; ++v)
        acc[m][v] = _mm256_add_epi32(acc[m][v], _mm256_add_epi32(_mm256_madd_epi16(lo[v], xl), _mm256_madd_epi16(hi[v], xh)));
    }
  }
  for (int m = 0; m < R; ++m) {
    const __m256i off = _mm256_set1_epi32(8 * (int32_t)gs[m * ldg]);
    const vf xs = vset(gs[m * ldg + ng]);
    for (int v = 0; v < CV; ++v) {
      const int col = c0 + 8 * v;
      float* o = acc_out + m * BLOCK + col;
      const vf dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][v], off));
      vst(o, vfma(dot, vmul(xs, vld_bf16(scale + col)), vld(o)));
    }
  }
}

template <int R>
void tile_int4_i16(const int16_t* xq, int64_t ldx, int64_t k, int64_t g, const uint8_t* w, const uint16_t* scale,
                   const float* gs, int64_t ldg, float* acc_out) {
  constexpr int CV = R == 1 ? 4 : R <= 4 ? 2 : 1;
  const int64_t ng = k / g;
  memset(acc_out, 0, sizeof(float) * R * BLOCK);
  for (int64_t i = 0; i < ng; ++i)
    for (int c0 = 0; c0 < BLOCK; c0 += 8 * CV)
      group_int4_i16<R, CV>(xq + i * g, ldx, g, w + i * g * 32, scale + i * BLOCK, gs + i, ldg, ng, acc_out, c0);
}

// int8 the same way: per group of 2 g2 k (64, or the weight's groups) the int32 sums of weight pairs times
// activation pairs (vpmaddwd) go into the float32 accumulators acc_out with the group's activation scale, times the
// group's column scales ws where the weight has groups (else the column scales come later). xs: the groups'
// activation scales (row stride ldg).
template <int R, int CV>
void matmul_int8_i16(const int16_t* xq, int64_t ldx, int64_t k2, int64_t g2, const int8_t* w, const uint16_t* ws,
                     const float* xs, int64_t ldg, float* acc_out, int c0) {
  const int pf = pf_mode;
  constexpr int bytes = CV * 16;  // of each k-pair row read here
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < CV; ++v) vst(acc_out + m * BLOCK + c0 + 8 * v, vzero());
  for (int64_t p0 = 0; p0 < k2; p0 += g2) {
    __m256i acc[R][CV];
    for (int m = 0; m < R; ++m)
      for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_setzero_si256();
    const int64_t p1 = std::min<int64_t>(k2, p0 + g2);
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* wp = w + p * 2 * BLOCK + 2 * c0;
      for (int b = 0; b < bytes; b += 64) prefetch_w<(CV < 8)>((const char*)wp + PREFETCH_Q + b, pf);
      __m256i wv[CV];
      for (int v = 0; v < CV; ++v) wv[v] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wp + 16 * v)));
      for (int m = 0; m < R; ++m) {
        int32_t pair;
        memcpy(&pair, xq + m * ldx + 2 * p, 4);
        const __m256i xp = _mm256_set1_epi32(pair);
        for (int v = 0; v < CV; ++v) acc[m][v] = _mm256_add_epi32(acc[m][v], _mm256_madd_epi16(wv[v], xp));
      }
    }
    for (int m = 0; m < R; ++m) {
      const vf s = vset(xs[m * ldg + p0 / g2]);
      for (int v = 0; v < CV; ++v) {
        float* o = acc_out + m * BLOCK + c0 + 8 * v;
        const vf sv = ws ? vmul(s, vld_f16(ws + (p0 / g2) * BLOCK + c0 + 8 * v)) : s;
        vst(o, vfma(_mm256_cvtepi32_ps(acc[m][v]), sv, vld(o)));
      }
    }
  }
}

template <int R>
void tile_int8_i16(const int16_t* xq, int64_t ldx, int64_t k2, int64_t g2, const int8_t* w, const uint16_t* ws,
                   const float* xs, int64_t ldg, float* acc_out) {
  constexpr int CV = R == 1 ? 8 : R == 2 ? 4 : R <= 4 ? 2 : 1;  // one row: the whole block in one linear pass
  for (int c0 = 0; c0 < BLOCK; c0 += 8 * CV) matmul_int8_i16<R, CV>(xq, ldx, k2, g2, w, ws, xs, ldg, acc_out, c0);
}

// Row m of x [M, K] bf16 -> xq int16 and, per group of g, the sum of xq and the scale (gs: 2 ng floats).
inline void quantize_int16_row(const uint16_t* x, int64_t K, int64_t g, int16_t* xq, float* gs) {
  const int64_t ng = (K + g - 1) / g;  // the last group may be partial
  for (int64_t i = 0; i < ng; ++i) {
    const int64_t end = std::min(K, (i + 1) * g);
    float top = 0.0f;
    for (int64_t j = i * g; j < end; ++j) top = std::max(top, fabsf(bf16_to_f32(x[j])));
    int e = 0;
    if (top > 0.0f) frexpf(top, &e);  // top = f 2^e, f in [0.5, 1): top / 2^(e - 15) < 2^15
    const float inv = ldexpf(1.0f, 15 - e);
    int32_t sum = 0;
    for (int64_t j = i * g; j < end; ++j) {
      xq[j] = (int16_t)std::min(32767.0f, std::max(-32767.0f, nearbyintf(bf16_to_f32(x[j]) * inv)));
      sum += xq[j];
    }
    gs[i] = (float)sum, gs[ng + i] = ldexpf(1.0f, e - 15);
  }
}
#endif

template <int R, class X>
void tile_int4(const X* x, int64_t ldx, int64_t k, int64_t g, const uint8_t* w, const uint16_t* scale,
               const float* gsum, int64_t ldg, float* acc_out) {
  memset(acc_out, 0, sizeof(float) * R * BLOCK);
  for (int64_t i = 0; i < k / g; ++i)
    group_int4<R>(x + i * g, ldx, g, w + i * g * 32, scale + i * BLOCK, gsum + i, ldg, acc_out);
}

// Rows per register tile for a batch of decode streams (up to DECODE_M rows): the tile shape that uses the registers
// best (rows x column vectors of accumulators, few loads per FMA), not all rows at once. Each block's weights
// stream from memory once per step, with the first row group; the others read them again from L2 (a block is
// K x 128 bytes), the activations of a group staying in L1. Measured on Zen 4 at 16 rows (bench/decode_step.py,
// a loaded machine, interleaved, best of N): AVX-512 BF16 as 6 + 6 + 4 rows x 4 chunks 1.12x the matmul rate of
// one 16-row tile of 1 chunk (2 threads); AVX2 as 4 x 4 rows x 2 column vectors 1.22x two 8-row tiles of 1 (1
// thread; 2 rows x 4 vectors: within noise of it). One tall tile costs a broadcast per FMA and re-reads the
// activations from L2 in every column pass. NEON (32 registers): 4 rows x 4 column vectors by the same count.
#ifndef MAXR
#if defined(MINICPMV_DPBF16)
#define MAXR 6
#elif defined(MINICPMV_AVX2) || defined(MINICPMV_NEON)
#define MAXR 4
#else
#define MAXR 8
#endif
#endif
constexpr int DECODE_M = 32;  // up to this many rows count as decode streams

// f(std::integral_constant<int, rows>) for rows in [1, MAXR].
template <int R = 1, class F>
inline void with_rows(int rows, F&& f) {
  if constexpr (R < MAXR) {
    if (rows > R) return with_rows<R + 1>(rows, f);
  }
  f(std::integral_constant<int, R>{});
}

// A weight read as blocks of `bytes`, `stride` bytes per k-pair, from `w`: how run_blocks' later row groups can ask
// for the next block (the AVX-512 BF16 tiles, on bf16 and int8).
struct Stream {
  const void* w = nullptr;
  int64_t bytes = 0, stride = 0;
};
#ifndef NEXT_MAX
#define NEXT_MAX (256 << 10)  // the largest block whose successor is asked for: both stay in L2
#endif
#ifndef RUN_BLOCKS
#define RUN_BLOCKS 8  // blocks in a row per thread, at most, when it asks for its next ones
#endif

// Calls tile(b, rows, m0, acc) for the row groups of every block, then the epilogue, shared among the threads of the
// enclosing parallel region (the callers open one). Up to DECODE_M rows (decode) go in as few, even groups of at
// most MAXR as there are; more (prefill) in groups of MT, which leave registers for whole-block passes.
// The first group of a decode batch streams each block from memory, the others read it again from L2, compute
// bound: with a `stream`, a thread takes runs of blocks that follow each other in memory and its later groups ask
// for the next block meanwhile, sharing its lines out, so that memory and the FMAs overlap (bench/decode_step.py on
// Zen 4, the step: 8 rows 1.14x; 16 rows 1.03-1.1x in bf16, 1.1-1.25x in int8).
template <class Tile>
void run_blocks(int64_t M, int64_t nblocks, const Epilogue& ep, Tile tile, Stream stream = {}) {
  const int64_t groups = M <= DECODE_M ? (M + MAXR - 1) / MAXR : (M + MT - 1) / MT;
  const int64_t step = (M + groups - 1) / groups;
#if defined(MINICPMV_DPBF16)
  const bool next = groups > 1 && M <= DECODE_M && stream.w && stream.bytes <= NEXT_MAX;
#else
  const bool next = false;  // (the portable tiles take no PF_NEXT)
#endif
  // runs short enough that every thread takes several (dynamic: a thread slowed by another process does less)
  const int64_t run = next ? std::clamp<int64_t>(nblocks / (4 * omp_get_num_threads()), 1, RUN_BLOCKS) : 1;
#pragma omp for schedule(dynamic, 1)
  for (int64_t r = 0; r < (nblocks + run - 1) / run; ++r) {
    const int64_t last = std::min(nblocks, (r + 1) * run) - 1;
    for (int64_t b = r * run; b <= last; ++b) {
      alignas(64) float acc[MAXR * BLOCK];
      for (int64_t m0 = 0; m0 < M; m0 += step) {
        int rows = (int)std::min<int64_t>(step, M - m0);
        pf_mode = groups == 1 || M > DECODE_M ? PF_AUTO : m0 == 0 ? PF_KEEP : next && b < last ? PF_NEXT : PF_NONE;
        if (pf_mode == PF_NEXT) {
          pf_next = (const char*)stream.w + (b + 1) * stream.bytes, pf_stride = stream.stride;
          pf_lines = 0;
          const int later = (int)groups - 1, j = (int)(m0 / step) - 1;
          for (int l = 0; l < 4; ++l) pf_lines |= (l % later == j) << l;
        }
        tile(b, rows, m0, acc);
        ep(acc, rows, m0, b);
      }
    }
    pf_mode = PF_AUTO;
  }
}

#define DISPATCH_ROWS(rows, CALL) \
  switch (rows) {                 \
    case 1: CALL(1); break;       \
    case 2: CALL(2); break;       \
    case 3: CALL(3); break;       \
    default: CALL(4); break;      \
  }

}  // namespace

// A packed weight, as kernels.PackedLinear holds it. x [M, K] bf16 with row stride ldx; w packed in nblocks blocks of
// 64 columns (K padded to even for bf16 and int8, to a multiple of the group for int4 and grouped int8); scale:
// int8 float32 [nblocks * 64] (group 0) or fp16 [nblocks][K/group][64], int4 bf16 [nblocks][K/group][64]; bias:
// float32 [n_out] or null; act 1 = silu(gate) * up, 2 = gelu (tanh). Outputs [M, n_out] with row stride ldo, bf16
// or float32.
struct Linear {
  const void* w;
  const void* scale;
  const float* bias;
  int64_t nblocks, k, group, n_out;
  int32_t quant, act;  // quant: 0 bf16, 1 int8, 2 int4
  const uint16_t* offset;  // int4 asymmetric (zero points): bf16 [nblocks][K/group][64], w = scale q + offset; or null
};

namespace {

// Asymmetric int4 (zero points, w = scale q + offset per group): the offsets' share of a block's outputs after the
// symmetric tile, acc[m][j] += sum_i offset[i][j] xsum(m, i), xsum the sum of row m's activations over group i.
// K/group terms per output: a small epilogue beside the K of the tile.
template <class GroupSum>
inline void add_int4_offsets(float* acc, int rows, const uint16_t* off, int64_t ng, GroupSum xsum) {
  for (int m = 0; m < rows; ++m) {
    float* a = acc + m * BLOCK;
    constexpr int NV = BLOCK / VL;
    vf sum[NV];  // the row's 64 outputs in registers across the groups
    for (int v = 0; v < NV; ++v) sum[v] = vld(a + v * VL);
    for (int64_t i = 0; i < ng; ++i) {
      const vf s = vset(xsum(m, i));
      const uint16_t* o = off + i * BLOCK;
      for (int v = 0; v < NV; ++v) sum[v] = vfma(s, vld_bf16(o + v * VL), sum[v]);
    }
    for (int v = 0; v < NV; ++v) vst(a + v * VL, sum[v]);
  }
}

// A block's offsets, asked for before its tile runs, arrive while it does (the epilogue would wait on memory).
inline void prefetch_offsets(const uint16_t* off, int64_t ng) {
  for (int64_t j = 0; j < ng * BLOCK; j += 32) prefetch_l2(off + j);  // 32 bf16: a 64-byte line
}

#if !defined(MINICPMV_DPBF16)
// bf16 weights times many rows (8+ decode streams, prefill, the vision tower) on the portable tiles: widening each
// k-pair in registers for every row group and column pass costs as much as the FMAs it feeds. Instead each block is
// widened to float32 once, a chunk of KC k at a time, into a scratch laid out per pass of WC columns ([pass][k][WC],
// 64 KB: it stays in L2), and a WR-row x WC-column register tile runs over it: one broadcast and WC / VL FMAs per
// row and k, WR x WC / VL independent accumulators. The FMAs are those of matmul_cols in the same k order, so the
// outputs are bit-identical to the narrow tiles'.
constexpr int WC = 16, WCV = WC / VL;
constexpr int WR = (NREG - WCV - 1) / WCV;  // AVX2: 6 rows x 2 vectors (12 accumulators)
#ifndef WIDE_KC
#define WIDE_KC 256
#endif
#ifndef WIDE_MIN
#if defined(MINICPMV_NEON)
#define WIDE_MIN (DECODE_M + 1)  // NEON keeps its 4 x 4 in-register tiles (the wide ones are not measured natively)
#else
#define WIDE_MIN 8  // rows from which the wide tiles win (AVX2, bench/decode_step.py)
#endif
#endif
#ifndef WIDE_PF
#define WIDE_PF 1
#endif
constexpr int64_t KC = WIDE_KC;
constexpr int WM = 128;  // rows accumulated per pass over a block (prefill: 1.1x the rate of 32 on the vision MLP)

// scratch[pass][k - k0][WC] = block column (pass WC + j) at k, for k in [k0, k0 + kc); k0 and kc even.
inline void widen_chunk(const uint16_t* wb, int64_t k0, int64_t kc, float* scratch) {
  for (int64_t p = k0 / 2; p < (k0 + kc) / 2; ++p) {
    const uint16_t* wp = wb + p * 2 * BLOCK;
    for (int j = 0; j < 2 * BLOCK; j += 32) prefetch_l2(wp + 8 * 2 * BLOCK + j);  // 8 pairs ahead, a line at a time
    float* even = scratch + (2 * p - k0) * WC;
    for (int v = 0; v < NVEC; ++v) {
      const Pair pr = pair_bf16(wp + 2 * VL * v);
      float* at = even + (VL * v / WC) * KC * WC + VL * v % WC;
      vst(at, pr.even), vst(at + WC, pr.odd);
    }
  }
}

// acc[R][BLOCK] (at the pass's first column) += x . the pass's WC columns over kc k; x packed [kc][R].
template <int R>
void wide_tile(const float* x, int64_t kc, const float* ws, float* acc) {
  vf a[R][WCV];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < WCV; ++v) a[m][v] = vld(acc + m * BLOCK + v * VL);
  for (int64_t k = 0; k < kc; ++k) {
    vf w[WCV];
    for (int v = 0; v < WCV; ++v) w[v] = vld(ws + k * WC + v * VL);
    for (int m = 0; m < R; ++m) {
      const vf xm = vset(x[k * R + m]);
      for (int v = 0; v < WCV; ++v) a[m][v] = vfma(w[v], xm, a[m][v]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < WCV; ++v) vst(acc + m * BLOCK + v * VL, a[m][v]);
}

template <int R = 1, class F>
inline void with_wide_rows(int rows, F&& f) {
  if constexpr (R < WR) {
    if (rows > R) return with_wide_rows<R + 1>(rows, f);
  }
  f(std::integral_constant<int, R>{});
}

// f(start, rows) for the row groups of a pass over rows [m0, m0 + rows): as few as hold at most WR rows, even in size.
template <class F>
inline void for_row_groups(int64_t m0, int rows, F&& f) {
  const int n = (rows + WR - 1) / WR, step = (rows + n - 1) / n;
  for (int r0 = 0; r0 < rows; r0 += step) f(m0 + r0, std::min(step, rows - r0));
}

void wide_blocks(const uint16_t* w, int64_t K, const float* x, int64_t M, int64_t ldx, int64_t nblocks,
                 const Epilogue& ep) {
  thread_local std::vector<float> scratch, packed;  // (each thread packs the activations for itself: no barrier)
  scratch.resize(BLOCK * KC), packed.resize(M * K);
  for (int64_t m0 = 0; m0 < M; m0 += WM)  // each row group's rows as [K][rows], from its first row's offset
    for_row_groups(m0, (int)std::min<int64_t>(WM, M - m0), [&](int64_t start, int rows) {
      for (int64_t k = 0; k < K; ++k)
        for (int m = 0; m < rows; ++m) packed[start * K + k * rows + m] = x[(start + m) * ldx + k];
    });
#pragma omp for schedule(dynamic, 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    alignas(64) float acc[WM * BLOCK];
    const uint16_t* wb = w + b * K * BLOCK;
    for (int64_t m0 = 0; m0 < M; m0 += WM) {
      const int rows = (int)std::min<int64_t>(WM, M - m0);
      const int64_t ncalls = (rows + WR - 1) / WR * (BLOCK / WC);  // wide_tile calls per chunk
      std::fill(acc, acc + rows * BLOCK, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min<int64_t>(KC, K - k0);
        widen_chunk(wb, k0, kc, scratch.data());
        // the next chunk's weights are asked for while this one's tiles run, a slice before each tile
        const char* next = (const char*)(wb + (k0 + kc) * BLOCK);
        const int64_t lines = WIDE_PF && k0 + kc < K ? std::min<int64_t>(KC, K - k0 - kc) * BLOCK * 2 / 64 : 0;
        int64_t asked = 0, calls = 0;
        for_row_groups(m0, rows, [&](int64_t start, int n) {
          const float* xp = packed.data() + start * K + k0 * n;
          float* a = acc + (start - m0) * BLOCK;
          with_wide_rows(n, [&](auto R) {
            for (int c = 0; c < BLOCK / WC; ++c) {
              for (const int64_t upto = lines * ++calls / ncalls; asked < upto; ++asked) prefetch_l2(next + 64 * asked);
              wide_tile<R()>(xp, kc, scratch.data() + c * KC * WC, a + c * WC);
            }
          });
        });
      }
      ep(acc, rows, m0, b);
    }
  }
}
#endif

#if defined(MINICPMV_AMX)
// bf16 weights on AMX (any row count, decode and prefill alike, so a batch of streams keeps each stream's bits): a
// block's 64 columns are four 16-row x 16-column fp32 tiles (tmm0-3) that accumulate TDPBF16PS over 32 k at a time,
// tmm4 holding 16 activation rows x 32 k and tmm5 / tmm6 16 k-pairs x 16 columns in turn. The packed layout is
// AMX's own B layout: pair p's 16 columns of chunk c are 64 bytes at p * 256 + 64 c, so the tiles load straight from
// the weight stream. Rows past M in a tile are a thread's copy (outputs discarded); k past the last multiple of 32
// goes through vdpbf16ps.
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr int TR = 16, TK = 32;  // rows and k per tile
// int8 and int4 take the AMX tiles above these many rows (the same kernel for any batch below them, so a batch keeps
// each stream's bits). int8 at every row count, converted as it streams (bench/decode_step.py: one stream 0.9x the
// vdpbf16ps tiles, 16 streams 2.5x); int4 in prefill only: converting each block first costs a stream 0.35x.
#ifndef AMX_INT8_MIN
#define AMX_INT8_MIN 0
#endif
#ifndef AMX_INT4_MIN
#define AMX_INT4_MIN DECODE_M
#endif

// The tile registers, configured per call: PyTorch's oneDNN configures its own on the same threads.
inline void amx_configure() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 7; ++t) c.colsb[t] = 64, c.rows[t] = TR;
  _tile_loadconfig(&c);
}

// C tiles += TK k of rows xa (row stride `stride` bytes) . the 16 k-pairs x 64 columns at wp (4 KB).
inline void amx_chunk(const uint16_t* wp, const uint16_t* xa, int64_t stride) {
  _tile_loadd(4, xa, stride);
  _tile_loadd(5, wp, 4 * BLOCK);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, wp + 32, 4 * BLOCK);
  _tile_dpbf16ps(1, 4, 6);
  _tile_loadd(5, wp + 64, 4 * BLOCK);
  _tile_dpbf16ps(2, 4, 5);
  _tile_loadd(6, wp + 96, 4 * BLOCK);
  _tile_dpbf16ps(3, 4, 6);
}

// C tiles += rows of xa . block wb over k in [k0, k1), multiples of TK. pf: prefetch_w's.
inline void amx_dot(const uint16_t* wb, const uint16_t* xa, int64_t stride, int64_t k0, int64_t k1, int pf) {
  for (int64_t k = k0; k < k1; k += TK) {
    const uint16_t* wp = wb + k * BLOCK;
    for (int j = 0; j < TK * BLOCK; j += 32) prefetch_w<false>((const char*)wp + PREFETCH + 2 * j, pf);
    amx_chunk(wp, xa + k, stride);
  }
}

inline void amx_zero() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

inline void amx_store(float* acc) {  // acc [16][64]
  _tile_stored(0, acc, 4 * BLOCK);
  _tile_stored(1, acc + 16, 4 * BLOCK);
  _tile_stored(2, acc + 32, 4 * BLOCK);
  _tile_stored(3, acc + 48, 4 * BLOCK);
}

// For each block and each group of up to TR rows: body(b, m0, rows, xa, stride, pf, acc) leaves the group's sums in
// acc [TR][64] (xa: the group's first row, stride its row stride in bytes), then the epilogue.
template <class Body>
void amx_blocks(int64_t K, const uint16_t* x, int64_t M, int64_t ldx, int64_t nblocks, const Epilogue& ep, Body body) {
  const int64_t full = M / TR * TR;
  thread_local std::vector<uint16_t> rest;  // the last, partial row group (each thread copies it: no barrier)
  if (full < M) {
    if ((int64_t)rest.size() < TR * K) rest.resize(TR * K);
    for (int64_t m = full; m < M; ++m) memcpy(rest.data() + (m - full) * K, x + m * ldx, 2 * K);
  }
  amx_configure();
#pragma omp for schedule(dynamic, 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    alignas(64) float acc[TR * BLOCK];
    for (int64_t m0 = 0; m0 < M; m0 += TR) {
      const int rows = (int)std::min<int64_t>(TR, M - m0);
      const uint16_t* xa = m0 < full ? x + m0 * ldx : rest.data();
      const int64_t stride = 2 * (m0 < full ? ldx : K);
      body(b, m0, rows, xa, stride, m0 == 0 ? (M > TR ? PF_KEEP : PF_AUTO) : PF_NONE, acc);
      ep(acc, rows, m0, b);
    }
  }
  _tile_release();
}

// acc [rows][64] += the k-pairs after the tiles' kt k, by vdpbf16ps: W = uint16_t (bf16) or int8_t (converted to
// bf16 in registers, the same values as a block converted whole).
template <class W>
inline void amx_tail(const W* wb, int64_t kt, int64_t K, int rows, const uint16_t* xa, int64_t stride, float* acc) {
  for (int m = 0; m < rows; ++m)
    for (int64_t p = kt / 2; p < K / 2; ++p) {
      const __m512bh xv = bcast_pair(xa + m * (stride / 2) + 2 * p);
      for (int c = 0; c < 4; ++c) {
        float* a = acc + m * BLOCK + 16 * c;
        const W* wp = wb + p * 2 * BLOCK + 32 * c;
        __m512bh wv;
        if constexpr (std::is_same_v<W, int8_t>) wv = int8_pairs(wp); else wv = (__m512bh)_mm512_loadu_si512(wp);
        _mm512_storeu_ps(a, _mm512_dpbf16_ps(_mm512_loadu_ps(a), wv, xv));
      }
    }
}

// bf16 weights (wb: block b's, packed or converted from int8): the tiles over K's multiples of TK, vdpbf16ps after.
inline void amx_bf16(const uint16_t* wb, int64_t K, int rows, const uint16_t* xa, int64_t stride, int pf, float* acc) {
  const int64_t kt = K / TK * TK;
  amx_zero();
  amx_dot(wb, xa, stride, 0, kt, pf);
  amx_store(acc);
  amx_tail(wb, kt, K, rows, xa, stride, acc);
}

// int8 weights for one row group (decode): each k chunk converted to bf16 as it streams by, into an L1 buffer, then
// the tiles: the bf16 values and the order of amx_bf16 over a block converted whole (more row groups).
inline void amx_int8(const int8_t* wb, int64_t K, int rows, const uint16_t* xa, int64_t stride, int pf, float* acc) {
  alignas(64) uint16_t chunk[2][TK * BLOCK];  // two in turn: a chunk's conversion need not wait for the last's loads
  const int64_t kt = K / TK * TK;
  amx_zero();
  for (int64_t k = 0; k < kt; k += TK) {
    const int8_t* src = wb + k * BLOCK;  // 2 KB
    for (int j = 0; j < TK * BLOCK; j += 64) prefetch_w<false>((const char*)src + PREFETCH_Q + j, pf);
    uint16_t* c = chunk[(k / TK) & 1];
    for (int j = 0; j < TK * BLOCK; j += 32) _mm512_storeu_si512(c + j, (__m512i)int8_pairs(src + j));
    amx_chunk(c, xa + k, stride);
  }
  amx_store(acc);
  amx_tail(wb, kt, K, rows, xa, stride, acc);
}

// An int4 block as bf16 136 + q (0x4300 | u, exactly) in the bf16 layout: each 128-byte row r of a group holds
// pair r's 64 columns in its low nibbles and pair r + G/4's in its high ones, at the bf16 layout's own offsets.
inline void int4_to_bf16(const uint8_t* w, int64_t K, int64_t g, uint16_t* out) {
  const __m512i low = _mm512_set1_epi16(0x000f), bias = _mm512_set1_epi16(0x4300);
  for (int64_t g0 = 0; g0 < K; g0 += g)
    for (int64_t r = 0; r < g / 4; ++r)
      for (int h = 0; h < 4; ++h) {  // 32 bytes at a time
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + (g0 / 4 + r) * 2 * BLOCK + 32 * h)));
        _mm512_storeu_si512(out + (g0 + 2 * r) * BLOCK + 32 * h, _mm512_or_si512(_mm512_and_si512(v, low), bias));
        _mm512_storeu_si512(out + (g0 + g / 2 + 2 * r) * BLOCK + 32 * h,
                            _mm512_or_si512(_mm512_srli_epi16(v, 4), bias));
      }
}

// int4 with groups of g (a multiple of TK) k: each group's sums of (136 + q) x from the tiles, then as the narrow
// tiles do, acc += scale (sum - 136 xsum) per group; gsum: the rows' activation sums per group (row stride ng).
inline void amx_int4(const uint16_t* wb, int64_t K, int64_t g, const uint16_t* scale, const float* gsum, int rows,
                     const uint16_t* xa, int64_t stride, int pf, float* acc) {
  alignas(64) float part[TR * BLOCK];
  const int64_t ng = K / g;
  std::fill(acc, acc + rows * BLOCK, 0.0f);
  for (int64_t i = 0; i < ng; ++i) {
    amx_zero();
    amx_dot(wb, xa, stride, i * g, (i + 1) * g, pf);
    amx_store(part);
    for (int m = 0; m < rows; ++m) {
      const __m512 xs = _mm512_set1_ps(136.0f * gsum[m * ng + i]);
      for (int c = 0; c < 4; ++c) {
        const __m512 s = vld_bf16(scale + i * BLOCK + 16 * c);
        float* a = acc + m * BLOCK + 16 * c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(s, _mm512_sub_ps(_mm512_loadu_ps(part + m * BLOCK + 16 * c), xs),
                                            _mm512_loadu_ps(a)));
      }
    }
  }
}
#endif

// y = x W^T for rows that fit one panel (below); x bf16 or (the portable tiles) float32.
template <class X>
void linear_blocks(const Linear& L, const X* x, int64_t M, int64_t ldx, void* out, int64_t ldo, int fp32,
                   float* gsum, bool own = false) {  // own: gsum is this thread's (each computes it)
  const Epilogue ep{L.bias, out, ldo, L.n_out, fp32, L.act};
  const int64_t K = L.k, k2 = K / 2;
  if (L.quant == 0) {
    const uint16_t* w = (const uint16_t*)L.w;
#if defined(MINICPMV_AMX)
    return amx_blocks(K, x, M, ldx, L.nblocks, ep, [&](int64_t b, int64_t, int rows, const uint16_t* xa,
                                                       int64_t stride, int pf, float* acc) {
      amx_bf16(w + b * K * BLOCK, K, rows, xa, stride, pf, acc);
    });
#elif !defined(MINICPMV_DPBF16)
    if constexpr (std::is_same_v<X, float>) {
      if (M >= WIDE_MIN) return wide_blocks(w, 2 * k2, x, M, ldx, L.nblocks, ep);
    }
#endif
    run_blocks(M, L.nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
      with_rows(rows, [&](auto R) { matmul_tile<R()>(x + m0 * ldx, ldx, k2, w + b * k2 * 2 * BLOCK, acc); });
    }, Stream{w, K * BLOCK * 2, 4 * BLOCK});
  } else if (L.quant == 1 && L.group) {  // groups: scaled in the tile
    const int8_t* w = (const int8_t*)L.w;
    const uint16_t* scale = (const uint16_t*)L.scale;
    run_blocks(M, L.nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
      with_rows(rows, [&](auto R) {
        tile_int8_groups<R()>(x + m0 * ldx, ldx, k2, L.group / 2, w + b * K * BLOCK, scale + b * K / L.group * BLOCK, acc);
      });
    });
  } else if (L.quant == 1) {
    const int8_t* w = (const int8_t*)L.w;
    const float* scale = (const float*)L.scale;
    auto scaled = [&](float* acc, int rows, int64_t b) {
      const float* s = scale + b * BLOCK;
      for (int m = 0; m < rows; ++m)
        for (int j = 0; j < BLOCK; ++j) acc[m * BLOCK + j] *= s[j];
    };
#if defined(MINICPMV_AMX)
    if (M > AMX_INT8_MIN) {  // one row group: converted as it streams; more: each block converted once
      thread_local std::vector<uint16_t> block;
      if (M > TR) block.resize(K * BLOCK);
      return amx_blocks(K, x, M, ldx, L.nblocks, ep, [&](int64_t b, int64_t m0, int rows, const uint16_t* xa,
                                                         int64_t stride, int pf, float* acc) {
        if (M <= TR) {
          amx_int8(w + b * K * BLOCK, K, rows, xa, stride, pf, acc);
        } else {
          if (m0 == 0) int8_to_bf16(w + b * K * BLOCK, K * BLOCK, block.data());
          amx_bf16(block.data(), K, rows, xa, stride, pf, acc);
        }
        scaled(acc, rows, b);
      });
    }
#endif
    run_blocks(M, L.nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
      const int8_t* wb = w + b * K * BLOCK;
      if (rows == M) {  // decode: convert in registers as the weights stream by
        with_rows(rows, [&](auto R) { matmul_tile<R()>(x + m0 * ldx, ldx, k2, wb, acc); });
      } else {  // several row groups: convert the block to bf16 once, then run the bf16 tiles on it
        thread_local std::vector<uint16_t> block;
        if (m0 == 0) {
          block.resize(K * BLOCK);
          int8_to_bf16(wb, K * BLOCK, block.data());
        }
        with_rows(rows, [&](auto R) { matmul_tile<R()>(x + m0 * ldx, ldx, k2, block.data(), acc); });
      }
      scaled(acc, rows, b);
    }, Stream{w, K * BLOCK, 2 * BLOCK});
  } else {
    const int64_t g = L.group, ng = K / g;
    auto sums = [&] {  // per row and group: sum of x, for the nibble offset
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t i = 0; i < ng; ++i) gsum[m * ng + i] = 0.0f;
        for (int64_t i = 0; i < K; ++i) gsum[m * ng + i / g] += xval(x + m * ldx + i);
      }
    };
    if (own)
      sums();
    else
#pragma omp single
      sums();
    const uint8_t* w = (const uint8_t*)L.w;
    const uint16_t* scale = (const uint16_t*)L.scale;
#if defined(MINICPMV_AMX)
    if (M > AMX_INT4_MIN && g % TK == 0) {  // prefill: each block widened to bf16 once, then the AMX tiles
      thread_local std::vector<uint16_t> block;
      block.resize(K * BLOCK);
      return amx_blocks(K, x, M, ldx, L.nblocks, ep, [&](int64_t b, int64_t m0, int rows, const uint16_t* xa,
                                                         int64_t stride, int pf, float* acc) {
        if (m0 == 0) int4_to_bf16(w + b * K * BLOCK / 2, K, g, block.data());
        amx_int4(block.data(), K, g, scale + b * ng * BLOCK, gsum + m0 * ng, rows, xa, stride, pf, acc);
        if (L.offset)
          add_int4_offsets(acc, rows, L.offset + b * ng * BLOCK, ng, [&](int m, int64_t i) { return gsum[(m0 + m) * ng + i]; });
      });
    }
#endif
    run_blocks(M, L.nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
      if (L.offset && m0 == 0) prefetch_offsets(L.offset + b * ng * BLOCK, ng);
      with_rows(rows, [&](auto R) {
        tile_int4<R()>(x + m0 * ldx, ldx, K, g, w + b * K * BLOCK / 2, scale + b * ng * BLOCK, gsum + m0 * ng, ng, acc);
      });
      if (L.offset)
        add_int4_offsets(acc, rows, L.offset + b * ng * BLOCK, ng, [&](int m, int64_t i) { return gsum[(m0 + m) * ng + i]; });
    });
  }
}

// xf: [M, K] float32 workspace for the portable tiles (their activations widened once, not per column pass).
void linear_panel(const Linear& L, const uint16_t* x, int64_t M, int64_t ldx, void* out, int64_t ldo, int fp32,
                  float* gsum, float* xf) {
#if defined(MINICPMV_DPBF16)
  (void)xf;
  linear_blocks(L, x, M, ldx, out, ldo, fp32, gsum);
#else
  const int64_t K = L.k;
  // A few rows (decode) each thread prepares for itself, in buffers of its own: no barrier before the tiles.
  const bool own = M <= DECODE_M;
  thread_local std::vector<float> own_x, own_g;
  if (own) {
    own_x.resize(M * K), own_g.resize(M * 2 * ((K + 31) / 32));
    xf = own_x.data(), gsum = own_g.data();
  }
#if defined(MINICPMV_AVX2)
  if (L.quant == 2) {
    const int64_t g = L.group, ng = K / g;
    int16_t* xq = (int16_t*)xf;
    if (own)
      for (int64_t m = 0; m < M; ++m) quantize_int16_row(x + m * ldx, K, g, xq + m * K, gsum + m * 2 * ng);
    else
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) quantize_int16_row(x + m * ldx, K, g, xq + m * K, gsum + m * 2 * ng);
    const Epilogue ep{L.bias, out, ldo, L.n_out, fp32, L.act};
    const uint8_t* w = (const uint8_t*)L.w;
    const uint16_t* scale = (const uint16_t*)L.scale;
    run_blocks(M, L.nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
      if (L.offset && m0 == 0) prefetch_offsets(L.offset + b * ng * BLOCK, ng);
      with_rows(rows, [&](auto R) {
        tile_int4_i16<R()>(xq + m0 * K, K, K, g, w + b * K * BLOCK / 2, scale + b * ng * BLOCK, gsum + m0 * 2 * ng,
                           2 * ng, acc);
      });
      if (L.offset)  // (the group sums of the int16 activations times their scales)
        add_int4_offsets(acc, rows, L.offset + b * ng * BLOCK, ng, [&](int m, int64_t i) {
          const float* gs = gsum + (m0 + m) * 2 * ng;
          return gs[i] * gs[ng + i];
        });
    });
    return;
  }
  if (L.quant == 1) {  // activation groups of 64 k, or the weight's
    const int64_t g = L.group ? L.group : 64, ng = (K + g - 1) / g;
    int16_t* xq = (int16_t*)xf;
    if (own)
      for (int64_t m = 0; m < M; ++m) quantize_int16_row(x + m * ldx, K, g, xq + m * K, gsum + m * 2 * ng);
    else
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) quantize_int16_row(x + m * ldx, K, g, xq + m * K, gsum + m * 2 * ng);
    const Epilogue ep{L.bias, out, ldo, L.n_out, fp32, L.act};
    const int8_t* w = (const int8_t*)L.w;
    const float* scale = (const float*)L.scale;
    run_blocks(M, L.nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
      const uint16_t* ws = L.group ? (const uint16_t*)L.scale + b * ng * BLOCK : nullptr;
      with_rows(rows, [&](auto R) {
        tile_int8_i16<R()>(xq + m0 * K, K, K / 2, g / 2, w + b * K * BLOCK, ws, gsum + m0 * 2 * ng + ng, 2 * ng, acc);
      });
      if (!L.group) {
        const float* s = scale + b * BLOCK;
        for (int m = 0; m < rows; ++m)
          for (int j = 0; j < BLOCK; ++j) acc[m * BLOCK + j] *= s[j];
      }
    });
    return;
  }
#endif
  if (own)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < K; ++i) xf[m * K + i] = bf16_to_f32(x[m * ldx + i]);
  else
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < K; ++i) xf[m * K + i] = bf16_to_f32(x[m * ldx + i]);
  linear_blocks(L, (const float*)xf, M, K, out, ldo, fp32, gsum, own);
#endif
}

// y = x W^T for the threads of the enclosing parallel region. gsum: [M, 2 K/group] float32 workspace (int4); xf:
// [min(M, panel_rows(K)), K] float32 workspace (portable tiles).
// Many rows (prefill, the vision tower) go in panels of about 2 MB of activations, which stay in cache while every
// weight block passes over them: measured 1.4x faster on the vision tower's 10240 x 1152 @ 1152 x 4304.
// Activation groups per row (their sums and scales: 2 floats each in gsum): the weight's groups, else 64 k.
inline int64_t act_groups(const Linear& L) { return L.group ? (L.k + L.group - 1) / L.group : (L.k + 63) / 64; }

inline int64_t panel_rows(int64_t K) { return std::max<int64_t>(16 * MT, (int64_t{1} << 21) / (2 * K) / MT * MT); }

void linear(const Linear& L, const uint16_t* x, int64_t M, int64_t ldx, void* out, int64_t ldo, int fp32,
            float* gsum, float* xf) {
  const int64_t panel = panel_rows(L.k);
  const int64_t out_row = ldo * (fp32 ? 4 : 2), ng = act_groups(L);
  for (int64_t m0 = 0; m0 < M; m0 += panel)
    linear_panel(L, x + m0 * ldx, std::min(panel, M - m0), ldx, (char*)out + m0 * out_row, ldo, fp32, gsum + m0 * 2 * ng,
                 xf);
}

}  // namespace

extern "C" {

void mm(const Linear* L, const uint16_t* x, int64_t M, int64_t ldx, void* out, int64_t ldo, int fp32) {
  std::vector<float> gsum(2 * M * act_groups(*L)), xf(std::min(M, panel_rows(L->k)) * L->k);
#pragma omp parallel
  linear(*L, x, M, ldx, out, ldo, fp32, gsum.data(), xf.data());
}

}  // extern "C"

// ---- decode-step helpers (one token per sequence; float32 maths, bf16 in and out) --------------------------------
namespace {

// For columns [j0, j0 + W) of a [dk, dv] state: pred[j] = sum_i S[i][j] k[i] and sq[j] = sum_i S[i][j] q[i].
// In passes of SUB columns: two accumulators per column vector must fit the registers.
// AVX-512: a whole 128-wide state row in one pass (16 accumulators): the decode path below reads each head's state
// as one sequential stream.
constexpr int SUB = VL == 16 ? 128 : 32;

template <int W>
void state_dots(const float* S, int64_t dk, int64_t dv, int64_t j0, const float* k, const float* q, float* pred,
                float* sq) {
  constexpr int P = W < SUB ? W : SUB, NV = P / VL;
  for (int64_t s0 = j0; s0 < j0 + W; s0 += P) {
    vf p[NV], o[NV];
    for (int c = 0; c < NV; ++c) p[c] = vzero(), o[c] = vzero();
    for (int64_t i = 0; i < dk; ++i) {
      const float* row = S + i * dv + s0;
      // In decode the state comes from memory (the weights streamed since have evicted it): ask for the rows 16
      // ahead now (measured 10-20% faster per layer; a prefetch past the end is harmless).
      for (int c = 0; c < P; c += 16) prefetch_l1(row + 16 * dv + c);
      if (W > P && s0 == j0)  // the first of several passes: the rest of the row into L2 for the later ones
        for (int c = P; c < W; c += 16) prefetch_l2(row + 16 * dv + c);
      const vf ki = vset(k[i]), qi = vset(q[i]);
      for (int c = 0; c < NV; ++c) {
        const vf s = vld(row + VL * c);
        p[c] = vfma(s, ki, p[c]);
        o[c] = vfma(s, qi, o[c]);
      }
    }
    for (int c = 0; c < NV; ++c) vst(pred + s0 + VL * c, p[c]), vst(sq + s0 + VL * c, o[c]);
  }
}

// S[i][j] = decay S[i][j] + k[i] delta[j] for columns [j0, j0 + W).
template <int W>
void state_update(float* S, int64_t dk, int64_t dv, int64_t j0, float decay, const float* k, const float* delta) {
  constexpr int P = W < SUB ? W : SUB, NV = P / VL;
  const vf g = vset(decay);
  for (int64_t s0 = j0; s0 < j0 + W; s0 += P) {
    vf d[NV];
    for (int c = 0; c < NV; ++c) d[c] = vld(delta + s0 + VL * c);
    for (int64_t i = 0; i < dk; ++i) {
      float* row = S + i * dv + s0;
      const vf ki = vset(k[i]);
      for (int c = 0; c < NV; ++c) vst(row + VL * c, vfma(ki, d[c], vmul(g, vld(row + VL * c))));
    }
  }
}

// sum_i q[i] * k[i] for float32 q and bf16 k.
inline float dot_bf16(const float* q, const uint16_t* k, int64_t d) {
  vf acc = vzero();
  for (int64_t i = 0; i < d; i += VL) acc = vfma(vldn(q + i, d - i), vld_bf16n(k + i, d - i), acc);
  return vsum(acc);
}

// acc[i] += a * v[i] for bf16 v.
inline void axpy_bf16(float a, const uint16_t* v, float* acc, int64_t d) {
  const vf av = vset(a);
  for (int64_t i = 0; i < d; i += VL) vstn(acc + i, vfma(av, vld_bf16n(v + i, d - i), vldn(acc + i, d - i)), d - i);
}

inline void rms_scale(float* x, int64_t n, const uint16_t* w, float offset, float eps) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / sqrtf(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) x[i] *= r * (offset + bf16_to_f32(w[i]));
}

// Rotate-half RoPE on the first ``rot`` dims; cos, sin: [rot] (the angles repeated for both halves).
inline void rope(float* x, int64_t rot, const uint16_t* cos, const uint16_t* sin) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * bf16_to_f32(cos[i]) - b * bf16_to_f32(sin[i]);
    x[i + half] = b * bf16_to_f32(cos[i + half]) + a * bf16_to_f32(sin[i + half]);
  }
}

// out = rmsnorm(x) * (offset + w) for rows [m0, m1) of x, out: [M, D] with row strides; w: [D] bf16.
void rmsnorm_rows(const uint16_t* x, int64_t ldx, int64_t m0, int64_t m1, int64_t D, const uint16_t* w, float offset,
                  float eps, uint16_t* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* xr = x + m * ldx;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      const float v = bf16_to_f32(xr[i]);
      ss += v * v;
    }
    const float r = 1.0f / sqrtf(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) out[m * ldo + i] = f32_to_bf16(bf16_to_f32(xr[i]) * r * (offset + bf16_to_f32(w[i])));
  }
}

// B sequences (rows starts[b] .. starts[b] + lens[b] - 1 of the inputs) through a Gated DeltaNet layer, everything
// between the input projections and out_proj: the causal conv (continuing from and updating each conv state), silu,
// q/k l2 norms, decay and beta, the delta rule token by token on the float32 state (updated in place; per head it
// stays in cache), and the gated RMSNorm. conv_wt: the conv weights transposed, [kernel, conv_dim] float32; out:
// [N, hv * dv] bf16; scratch: N * (conv_dim + hv * (dv + 3)) + B * (kernel - 1) * conv_dim floats; dv a multiple of
// 16, dk and dv <= 512.
// For the threads of the enclosing parallel region.
void deltanet_team(int64_t B, const int64_t* starts, const int64_t* lens, int64_t hk, int64_t hv, int64_t dk,
                   int64_t dv, int64_t kernel, const uint16_t* mixed, int64_t ld_mixed, const uint16_t* z,
                   int64_t ld_z, const uint16_t* b_in, int64_t ld_b, const uint16_t* a_in, int64_t ld_a,
                   const float* conv_wt, uint16_t* const* conv_state, float* const* rec, const uint16_t* a_log,
                   const uint16_t* dt_bias, const uint16_t* norm_w, float eps, uint16_t* out, float* scratch) {
  const int64_t key_dim = hk * dk, conv_dim = 2 * key_dim + hv * dv, taps = kernel - 1, rep = hv / hk;
  const int64_t n = starts[B - 1] + lens[B - 1];
  const float q_scale = 1.0f / sqrtf((float)dk);
  float* core = scratch + n * conv_dim;    // [n, hv * dv]: the outputs before the gated norm
  float* params = core + n * hv * dv;       // [n, hv, 3]: exp(g), beta, k.q
  float* hist = params + n * hv * 3;        // [B, taps, conv_dim]: the conv states, transposed
  // (In chunks of channels, no division per channel: with a batch of decode streams this was a tenth of the layer.)
  constexpr int64_t CH = 512;
  const int64_t chunks = (conv_dim + CH - 1) / CH;
#pragma omp for schedule(static)
  for (int64_t bc = 0; bc < B * chunks; ++bc) {
    const int64_t b = bc / chunks, c0 = bc % chunks * CH, c1 = std::min(conv_dim, c0 + CH);
    const uint16_t* cs = conv_state[b];
    float* hb = hist + b * taps * conv_dim;
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t j = 0; j < taps; ++j) hb[j * conv_dim + c] = bf16_to_f32(cs[c * taps + j]);
  }
  // The causal conv + silu, token by token (each needs only the inputs before it), 16 channels a vector.
#pragma omp for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    int64_t b = 0;
    while (t >= starts[b] + lens[b]) ++b;
    const int64_t local = t - starts[b];
    for (int64_t c = 0; c < conv_dim; c += VL) {
      const int64_t left = conv_dim - c;
      vf acc = vzero();
      for (int64_t j = 0; j <= taps; ++j) {  // input t - taps + j: from this sequence's rows, else its conv state
        const int64_t u = local - taps + j;
        const vf x = u >= 0 ? vld_bf16n(mixed + (starts[b] + u) * ld_mixed + c, left)
                            : vldn(hist + (b * taps + taps + u) * conv_dim + c, left);
        acc = vfma(vldn(conv_wt + j * conv_dim + c, left), x, acc);
      }
      vstn(scratch + t * conv_dim + c, vsilu(acc), left);
    }
  }
#pragma omp for schedule(static)
  for (int64_t bc = 0; bc < B * chunks; ++bc) {  // the new conv states: each sequence's last taps inputs
    const int64_t b = bc / chunks, c0 = bc % chunks * CH, c1 = std::min(conv_dim, c0 + CH);
    uint16_t* cs = conv_state[b];
    for (int64_t j = 0; j < taps; ++j) {
      const int64_t u = lens[b] - taps + j;
      if (u >= 0) {
        const uint16_t* src = mixed + (starts[b] + u) * ld_mixed;
        for (int64_t c = c0; c < c1; ++c) cs[c * taps + j] = src[c];
      } else {
        const float* src = hist + (b * taps + taps + u) * conv_dim;
        for (int64_t c = c0; c < c1; ++c) cs[c * taps + j] = f32_to_bf16(src[c]);
      }
    }
  }
#pragma omp for schedule(static)
  for (int64_t tk = 0; tk < n * hk; ++tk) {  // l2-normalise q (and scale it by dk^-1/2) and k, in place
    float* q = scratch + (tk / hk) * conv_dim + (tk % hk) * dk;
    float* k = q + key_dim;
    float qq = 0.0f, kk = 0.0f;
    for (int64_t i = 0; i < dk; ++i) qq += q[i] * q[i], kk += k[i] * k[i];
    const float rq = q_scale / sqrtf(qq + 1e-6f), rk = 1.0f / sqrtf(kk + 1e-6f);
    for (int64_t i = 0; i < dk; ++i) q[i] *= rq, k[i] *= rk;
  }
#pragma omp for schedule(static)
  for (int64_t th = 0; th < n * hv; ++th) {
    const int64_t t = th / hv, h = th % hv;
    const float* q = scratch + t * conv_dim + (h / rep) * dk;
    float kq = 0.0f;
    for (int64_t i = 0; i < dk; ++i) kq += q[i] * q[key_dim + i];
    const float a = bf16_to_f32(a_in[t * ld_a + h]) + bf16_to_f32(dt_bias[h]);
    const float g = -expf(bf16_to_f32(a_log[h])) * (a > 20.0f ? a : log1pf(expf(a)));  // -e^A softplus(a + dt)
    params[th * 3] = expf(g);
    params[th * 3 + 1] = 1.0f / (1.0f + expf(-bf16_to_f32(b_in[t * ld_b + h])));
    params[th * 3 + 2] = kq;
  }
  // The recurrence is independent per column of the state: each task keeps a [dk, width] slice in L1 for all tokens.
  // Decode (one token per sequence) reads each state once, from memory: whole heads (rows of 128), one sequential
  // stream per task (measured 1.25x faster than slices of 64 at 16 streams, one thread).
  const bool decode = n == B;
  const int64_t width = decode && dv % 128 == 0 ? 128 : dv % 64 == 0 ? 64 : 16, slices = dv / width;
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * hv * slices; ++task) {
    const int64_t b = task / (hv * slices), h = task / slices % hv, col = task % slices * width, kh = h / rep;
    float* state = rec[b] + h * dk * dv;
    // Over several tokens the slice is copied out contiguously: in place its rows, a state row apart, would contend
    // for the same few L1 sets.
    thread_local std::vector<float> local;
    const bool copy = lens[b] > 1;
    float* S = state;
    int64_t ld = dv, j0 = col;
    if (copy) {
      local.resize(dk * width);
      for (int64_t i = 0; i < dk; ++i) memcpy(&local[i * width], state + i * dv + col, width * 4);
      S = local.data(), ld = width, j0 = 0;
    }
    for (int64_t t = starts[b]; t < starts[b] + lens[b]; ++t) {
      const float* row = scratch + t * conv_dim;
      const float *q = row + kh * dk, *k = row + key_dim + kh * dk, *v = row + 2 * key_dim + h * dv;
      const float decay = params[(t * hv + h) * 3], beta = params[(t * hv + h) * 3 + 1];
      const float kq = params[(t * hv + h) * 3 + 2];
      alignas(64) float pred[512], sq[512], delta[512];
      if (width == 128)
        state_dots<128>(S, dk, ld, j0, k, q, pred, sq);
      else if (width == 64)
        state_dots<64>(S, dk, ld, j0, k, q, pred, sq);
      else
        state_dots<16>(S, dk, ld, j0, k, q, pred, sq);
      float* o = core + t * hv * dv + h * dv + col - j0;
      for (int64_t j = j0; j < j0 + width; ++j) {
        delta[j] = (v[col - j0 + j] - decay * pred[j]) * beta;
        o[j] = decay * sq[j] + delta[j] * kq;  // S'^T q with S' the updated state
      }
      if (width == 128)
        state_update<128>(S, dk, ld, j0, decay, k, delta);
      else if (width == 64)
        state_update<64>(S, dk, ld, j0, decay, k, delta);
      else
        state_update<16>(S, dk, ld, j0, decay, k, delta);
    }
    if (copy)
      for (int64_t i = 0; i < dk; ++i) memcpy(state + i * dv + col, &local[i * width], width * 4);
  }
#pragma omp for schedule(static)
  for (int64_t th = 0; th < n * hv; ++th) {  // the gated RMSNorm of each head's output
    const int64_t t = th / hv, h = th % hv;
    const float* c = core + th * dv;
    float ss = 0.0f;
    for (int64_t j = 0; j < dv; ++j) ss += c[j] * c[j];
    const vf r = vset(1.0f / sqrtf(ss / dv + eps));
    const uint16_t* zr = z + t * ld_z + h * dv;
    for (int64_t j = 0; j < dv; j += VL) {
      const vf y = vmul(vmul(vld(c + j), r), vld_bf16(norm_w + j));
      vst_bf16(out + th * dv + j, vmul(y, vsilu(vld_bf16(zr + j))));
    }
  }
}

// One decode token for each of B sequences through a gated attention layer, between the projections and o_proj:
// q/k RMSNorm (zero-centred weights), RoPE on the first ``rot`` dims, the new key and value written into each
// sequence's cache [hkv, cap, d] at ``pos`` (the cache has room), attention over keys 0..pos, times sigmoid(gate).
// qg: [B, h, 2d] (each head's q then its gate); out: [B, h * d] bf16; d <= 512.
// For the threads of the enclosing parallel region.
void attention_team(int64_t B, int64_t h, int64_t hkv, int64_t d, int64_t rot, const uint16_t* qg, int64_t ld_qg,
                    const uint16_t* k_in, int64_t ld_k, const uint16_t* v_in, int64_t ld_v, const uint16_t* qn_w,
                    const uint16_t* kn_w, float eps, const uint16_t* cos, const uint16_t* sin, int64_t ld_rot,
                    uint16_t* const* kcache, uint16_t* const* vcache, const int64_t* cap, const int64_t* pos,
                    uint16_t* out) {
  const float scale = 1.0f / sqrtf((float)d);
  const int64_t rep = h / hkv;
#pragma omp for schedule(static)
  for (int64_t bk = 0; bk < B * hkv; ++bk) {
    const int64_t b = bk / hkv, kh = bk % hkv;
    float k[512];
    for (int64_t i = 0; i < d; ++i) k[i] = bf16_to_f32(k_in[b * ld_k + kh * d + i]);
    rms_scale(k, d, kn_w, 1.0f, eps);
    rope(k, rot, cos + b * ld_rot, sin + b * ld_rot);
    uint16_t* kc = kcache[b] + (kh * cap[b] + pos[b]) * d;
    uint16_t* vc = vcache[b] + (kh * cap[b] + pos[b]) * d;
    for (int64_t i = 0; i < d; ++i) kc[i] = f32_to_bf16(k[i]), vc[i] = v_in[b * ld_v + kh * d + i];
  }
#pragma omp for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < B * h; ++bh) {
    const int64_t b = bh / h, hh = bh % h, kh = hh / rep, n = pos[b] + 1;
    const uint16_t* qr = qg + b * ld_qg + hh * 2 * d;
    float q[512], acc[512];
    for (int64_t i = 0; i < d; ++i) q[i] = bf16_to_f32(qr[i]), acc[i] = 0.0f;
    rms_scale(q, d, qn_w, 1.0f, eps);
    rope(q, rot, cos + b * ld_rot, sin + b * ld_rot);
    const uint16_t* keys = kcache[b] + kh * cap[b] * d;
    const uint16_t* vals = vcache[b] + kh * cap[b] * d;
    thread_local std::vector<float> p;
    p.resize(n);
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = dot_bf16(q, keys + j * d, d) * scale;
      top = std::max(top, p[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) p[j] = expf(p[j] - top), total += p[j];
    for (int64_t j = 0; j < n; ++j) axpy_bf16(p[j] / total, vals + j * d, acc, d);
    uint16_t* o = out + b * h * d + hh * d;
    for (int64_t i = 0; i < d; i += VL) {  // acc * sigmoid(gate)
      const vf e = vexp(vsub(vzero(), vld_bf16n(qr + d + i, d - i)));
      vst_bf16n(o + i, vdiv(vldn(acc + i, d - i), vadd(vset(1.0f), e)), d - i);
    }
  }
}

}  // namespace

extern "C" {

void rmsnorm_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t D, const uint16_t* w, float offset, float eps,
                  uint16_t* out, int64_t ldo) {
#pragma omp parallel for schedule(static) if (M > 8)
  for (int64_t m = 0; m < M; ++m) rmsnorm_rows(x, ldx, m, m + 1, D, w, offset, eps, out, ldo);
}

void deltanet_forward(int64_t B, const int64_t* starts, const int64_t* lens, int64_t hk, int64_t hv, int64_t dk,
                      int64_t dv, int64_t kernel, const uint16_t* mixed, int64_t ld_mixed, const uint16_t* z,
                      int64_t ld_z, const uint16_t* b_in, int64_t ld_b, const uint16_t* a_in, int64_t ld_a,
                      const float* conv_wt, uint16_t** conv_state, float** rec, const uint16_t* a_log,
                      const uint16_t* dt_bias, const uint16_t* norm_w, float eps, uint16_t* out, float* scratch) {
#pragma omp parallel
  deltanet_team(B, starts, lens, hk, hv, dk, dv, kernel, mixed, ld_mixed, z, ld_z, b_in, ld_b, a_in, ld_a, conv_wt,
                conv_state, rec, a_log, dt_bias, norm_w, eps, out, scratch);
}

}  // extern "C"

// ---- block attention (the vision tower: bidirectional within each unit) ------------------------------------------
namespace {

#if defined(MINICPMV_DPBF16)
// acc[r][c] (16 output dims per chunk c < NC) += sum over key pairs of P[r] . V, V packed [pairs][16][2] per chunk.
template <int R, int NC>
void tile_pv(const uint16_t* p, int64_t ldp, int64_t pairs, const uint16_t* v, int64_t ldv_chunk, float* acc_out,
             int64_t ld_acc) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh w[NC];
    for (int c = 0; c < NC; ++c) w[c] = (__m512bh)_mm512_loadu_si512(v + c * ldv_chunk + j * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh pv = bcast_pair(p + r * ldp + 2 * j);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w[c], pv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc_out + r * ld_acc + 16 * c, acc[r][c]);
}

template <int R>
void pv_chunks(const uint16_t* p, int64_t ldp, int64_t pairs, const uint16_t* v, int64_t ldv_chunk, int64_t nc,
               float* acc_out, int64_t ld_acc) {
  const int64_t step = nc <= 6 ? 6 : 4;  // head dims up to 96 in one pass (the vision tower's 72: 5 chunks)
  for (int64_t c = 0; c < nc; c += step) {
    const uint16_t* vc = v + c * ldv_chunk;
    float* ac = acc_out + 16 * c;
    switch (std::min<int64_t>(step, nc - c)) {
      case 1: tile_pv<R, 1>(p, ldp, pairs, vc, ldv_chunk, ac, ld_acc); break;
      case 2: tile_pv<R, 2>(p, ldp, pairs, vc, ldv_chunk, ac, ld_acc); break;
      case 3: tile_pv<R, 3>(p, ldp, pairs, vc, ldv_chunk, ac, ld_acc); break;
      case 4: tile_pv<R, 4>(p, ldp, pairs, vc, ldv_chunk, ac, ld_acc); break;
      case 5: tile_pv<R, 5>(p, ldp, pairs, vc, ldv_chunk, ac, ld_acc); break;
      default: tile_pv<R, 6>(p, ldp, pairs, vc, ldv_chunk, ac, ld_acc); break;
    }
  }
}
#else
// The same with widened pairs, CV vectors of VL dims from dim d0 (a multiple of VL) at a time.
template <int R, int CV>
void tile_pv(const uint16_t* p, int64_t ldp, int64_t pairs, const uint16_t* v, int64_t ldv_chunk, float* acc_out,
             int64_t ld_acc, int64_t d0) {
  vf acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = vzero();
  const uint16_t* base[CV];
  for (int c = 0; c < CV; ++c) {
    const int64_t dim = d0 + VL * c;
    base[c] = v + (dim / 16) * ldv_chunk + (dim % 16) * 2;
  }
  for (int64_t j = 0; j < pairs; ++j) {
    vf p0[R], p1[R];
    for (int r = 0; r < R; ++r)
      p0[r] = vset(bf16_to_f32(p[r * ldp + 2 * j])), p1[r] = vset(bf16_to_f32(p[r * ldp + 2 * j + 1]));
    for (int c = 0; c < CV; ++c) {
      const Pair w = pair_bf16(base[c] + j * 32);
      for (int r = 0; r < R; ++r) acc[r][c] = vfma(w.odd, p1[r], vfma(w.even, p0[r], acc[r][c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) vst(acc_out + r * ld_acc + d0 + VL * c, acc[r][c]);
}

template <int R>
void pv_chunks(const uint16_t* p, int64_t ldp, int64_t pairs, const uint16_t* v, int64_t ldv_chunk, int64_t nc,
               float* acc_out, int64_t ld_acc) {
  constexpr int CV = cols_for(R);
  const int64_t nv = nc * 16 / VL;
  int64_t c = 0;
  for (; c + CV <= nv; c += CV) tile_pv<R, CV>(p, ldp, pairs, v, ldv_chunk, acc_out, ld_acc, c * VL);
  for (; c < nv; ++c) tile_pv<R, 1>(p, ldp, pairs, v, ldv_chunk, acc_out, ld_acc, c * VL);
}
#endif

}  // namespace

extern "C" {

// Attention within blocks of consecutive tokens (rows starts[b] .. starts[b] + lens[b] - 1): q, k, v [L, h, d] bf16
// with row stride ld; out [L, h * d] bf16. Per (block, head) the keys are packed like a weight ([n/64][d/2][64][2])
// and the values as [ceil(d/16)][n/2][16][2], so both products run on dpbf16 tiles; softmax in float32. d even.
void attention_blocks(int64_t nblk, const int64_t* starts, const int64_t* lens, int64_t h, int64_t d,
                      const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld, uint16_t* out) {
  const float scale = 1.0f / sqrtf((float)d);
  const int64_t d2 = d / 2, nc = (d + 15) / 16;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < nblk * h; ++task) {
    const int64_t b = task / h, hh = task % h, n = lens[b], s0 = starts[b];
    const int64_t n64 = (n + BLOCK - 1) / BLOCK * BLOCK, pairs = (n + 1) / 2;
    thread_local std::vector<uint16_t> kp, vp, pb;
    thread_local std::vector<float> scores, acc;
    kp.assign(n64 * d, 0);
    vp.resize(nc * pairs * 32);
    pb.assign(MT * pairs * 2, 0);
    scores.resize(MT * n64);
    acc.resize(MT * nc * 16);
    for (int64_t j = 0; j < n; ++j) {  // each key's dim pairs to its column of the key block
      const uint16_t* kr = k + (s0 + j) * ld + hh * d;
      uint16_t* kb = kp.data() + (j / BLOCK) * d2 * 2 * BLOCK + (j % BLOCK) * 2;
      for (int64_t p = 0; p < d2; ++p) memcpy(kb + p * 2 * BLOCK, kr + 2 * p, 4);
    }
    for (int64_t j = 0; j < n; j += 2)  // values j and j + 1 interleaved into pairs, 16 dims a chunk
      for (int64_t i = 0; i < nc * 16; ++i) {
        const uint16_t* v0 = v + (s0 + j) * ld + hh * d + i;
        uint16_t* dst = vp.data() + (i / 16) * pairs * 32 + (j / 2) * 32 + (i % 16) * 2;
        dst[0] = i < d ? v0[0] : 0;
        dst[1] = i < d && j + 1 < n ? v0[ld] : 0;
      }
    for (int64_t m0 = 0; m0 < n; m0 += MT) {
      const int rows = (int)std::min<int64_t>(MT, n - m0);
      const uint16_t* qm = q + (s0 + m0) * ld + hh * d;
      alignas(64) float tile[MT * BLOCK];
      for (int64_t kb = 0; kb < n64 / BLOCK; ++kb) {
        const uint16_t* kblock = kp.data() + kb * d2 * 2 * BLOCK;
#define CALL(R) matmul_tile<R>(qm, ld, d2, kblock, tile)
        DISPATCH_ROWS(rows, CALL)
#undef CALL
        for (int r = 0; r < rows; ++r) memcpy(&scores[r * n64 + kb * BLOCK], tile + r * BLOCK, BLOCK * 4);
      }
      // exp(s - max) into P unnormalised; the output is divided by the row's sum at the end (one pass fewer).
      float inv[MT];
      for (int r = 0; r < rows; ++r) {
        const float* s = &scores[r * n64];
        float top = -INFINITY;
        for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
        const vf shift = vset(top), sc = vset(scale);
        vf sum = vzero();
        float tail = 0.0f;
        for (int64_t j = 0; j < n; j += VL) {
          const vf e = vexp(vmul(vsub(vld(s + j), shift), sc));
          vst_bf16n(&pb[r * pairs * 2 + j], e, n - j);
          if (n - j >= VL) {
            sum = vadd(sum, e);
          } else {
            float t[VL];
            vst(t, e);
            for (int64_t i = 0; i < n - j; ++i) tail += t[i];
          }
        }
        inv[r] = 1.0f / (vsum(sum) + tail);
      }
#define CALL(R) pv_chunks<R>(pb.data(), pairs * 2, pairs, vp.data(), pairs * 32, nc, acc.data(), nc * 16)
      DISPATCH_ROWS(rows, CALL)
#undef CALL
      for (int r = 0; r < rows; ++r) {
        uint16_t* o = out + (s0 + m0 + r) * h * d + hh * d;
        for (int64_t i = 0; i < d; i += VL) vst_bf16n(o + i, vmul(vldn(&acc[r * nc * 16 + i], d - i), vset(inv[r])), d - i);
      }
    }
  }
}

}  // extern "C"

// ---- a whole decode step --------------------------------------------------------------------------------------------
// One token for each of B sequences through every layer of the language model inside one parallel region: no
// Python between the kernels, no thread start-up per kernel. Matmuls, norms and DeltaNet layers are the kernels the
// per-layer path runs, with the same roundings; attention for the one new token is computed in float32.
struct Layer {
  int64_t kind;  // 0 Gated DeltaNet, 1 gated attention
  const uint16_t* in_norm;
  const uint16_t* post_norm;
  float eps, mixer_eps;  // the layer norms' eps; the gated norm's (DeltaNet) or the q/k norms' (attention)
  Linear proj, out, gate_up, down;
  int64_t hk, hv, dk, dv, kernel;  // Gated DeltaNet
  const float* conv_wt;  // [kernel, conv_dim]
  const uint16_t *a_log, *dt_bias, *norm_w;
  int64_t heads, kv_heads, head_dim;  // gated attention
  const uint16_t *q_norm, *k_norm;
};

namespace {

void add_rows(uint16_t* a, const uint16_t* b, int64_t n) {  // a += b in bf16, like a bf16 tensor add
  for (int64_t i = 0; i < n; ++i) a[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

}  // namespace

// ---- LoRA in the decode step ------------------------------------------------------------------------------------
// Each row of a decode batch may use a LoRA adapter: y = x W^T + (x A^T) (scale B)^T for the rows of each adapter.
// The low-rank product is added to each block's accumulators in the matmul's epilogue (Epilogue::lora), after the
// int8 / int4 scales and before the activation (silu_mul included), so it costs no pass of its own. Rows of the base
// cost nothing, and a linear no row's adapter touches runs exactly as without adapters. Per adapter and linear, a
// LoraSite:
//   a: [rank, K] float32                  x A^T: one dot product per row and rank, before the matmul
//   b: [nblocks][rank][64] float32        B^T in the packed weight's column order (gate/up interleaved for
//                                         silu_mul), the scale folded in: a block's columns stream linearly, and
//                                         rows of one adapter in a tile read them from cache
//   span: [nblocks][2] int32              the ranks with non-zero columns in each block; a fused linear (q/k/v,
//                                         DeltaNet's four projections) stacks its parts' ranks, and a block of one
//                                         part reads only that part's
// Every thread of the enclosing parallel region calls linear_lora (as linear), with the same batch.
struct LoraSite {
  const float* a;  // null: the adapter leaves this linear alone
  const float* b;
  const int32_t* span;
  int64_t rank;
};

namespace {

struct LoraEpilogue {
  const LoraSite* const* sites;  // [M]: each row's adapter on this linear, or null
  const float* u;                // [M, ldu]: x A^T
  int64_t ldu;
};

struct LoraBatch {
  int64_t n = 0;                               // adapters in the batch; 0: none
  const LoraSite* const* adapters = nullptr;   // [n]: each adapter's sites
  const int32_t* row = nullptr;                // [M]: each row's adapter, -1 the base
  int64_t ldu = 0;                             // the largest rank
  float* u = nullptr;                          // [M, ldu] shared workspace (many rows)
  const LoraSite** sites = nullptr;            // [M] shared workspace

  const LoraSite* at(int64_t m, int64_t site) const {
    if (row[m] < 0) return nullptr;
    const LoraSite* s = adapters[row[m]] + site;
    return s->a ? s : nullptr;
  }
};

// acc[0, 64) += the low-rank product's columns of block b for one row (u: its x A^T).
inline void lora_block(const LoraSite& s, int64_t b, const float* u, float* acc) {
  constexpr int NV = BLOCK / VL;
  vf v[NV];
  for (int c = 0; c < NV; ++c) v[c] = vld(acc + c * VL);
  const float* w = s.b + b * s.rank * BLOCK;
  for (int32_t r = s.span[2 * b]; r < s.span[2 * b + 1]; ++r) {
    const vf ur = vset(u[r]);
    for (int c = 0; c < NV; ++c) v[c] = vfma(ur, vld(w + r * BLOCK + c * VL), v[c]);
  }
  for (int c = 0; c < NV; ++c) vst(acc + c * VL, v[c]);
}

void lora_epilogue(const LoraEpilogue* e, float* acc, int rows, int64_t m0, int64_t b) {
  for (int m = 0; m < rows; ++m)
    if (const LoraSite* s = e->sites[m0 + m]) lora_block(*s, b, e->u + (m0 + m) * e->ldu, acc + m * BLOCK);
}

// linear() with bf16 output (the decode step's linears), plus each row's adapter on linear ``site`` of its table.
// x A^T: with few rows (decode) each thread computes all of it for itself (no barrier), else shared.
void linear_lora(const Linear& L, const LoraBatch& lb, int64_t site, const uint16_t* x, int64_t M, int64_t ldx,
                 uint16_t* out, int64_t ldo, float* gsum, float* xf) {
  bool any = false;
  for (int64_t m = 0; m < M && lb.n > 0 && !any; ++m) any = lb.at(m, site) != nullptr;
  if (!any) return linear(L, x, M, ldx, out, ldo, 0, gsum, xf);
  const int64_t K = L.k, ldu = lb.ldu;
  const bool own = M * ldu * K <= (int64_t{1} << 20);
  thread_local std::vector<float> own_u;
  thread_local std::vector<const LoraSite*> own_sites;
  float* u = lb.u;
  const LoraSite** sites = lb.sites;
  if (own) {
    own_u.resize(M * ldu), own_sites.resize(M);
    u = own_u.data(), sites = own_sites.data();
    for (int64_t m = 0; m < M; ++m) {
      sites[m] = lb.at(m, site);
      for (int64_t r = 0; sites[m] && r < sites[m]->rank; ++r)
        u[m * ldu + r] = dot_bf16(sites[m]->a + r * K, x + m * ldx, K);
    }
  } else {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) sites[m] = lb.at(m, site);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * ldu; ++i) {
      const LoraSite* s = lb.at(i / ldu, site);
      if (s && i % ldu < s->rank) u[i] = dot_bf16(s->a + (i % ldu) * K, x + (i / ldu) * ldx, K);
    }
  }
  const LoraEpilogue e{sites, u, ldu};
  lora_current = &e;  // for the Epilogues this thread makes in linear()
  linear(L, x, M, ldx, out, ldo, 0, gsum, xf);
  lora_current = nullptr;
}

// The batch of a decode step (or an mm_lora call) and its shared workspaces; n_sites per adapter.
LoraBatch lora_batch(int64_t n, const LoraSite* const* adapters, const int32_t* row, int64_t M, int64_t n_sites,
                     std::vector<float>& u, std::vector<const LoraSite*>& sites) {
  LoraBatch lb;
  if (n <= 0) return lb;
  lb.n = n, lb.adapters = adapters, lb.row = row;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t s = 0; s < n_sites; ++s)
      if (adapters[a][s].a) lb.ldu = std::max(lb.ldu, adapters[a][s].rank);
  u.assign(M * std::max<int64_t>(lb.ldu, 1), 0.0f), sites.assign(M, nullptr);
  lb.u = u.data(), lb.sites = sites.data();
  return lb;
}

}  // namespace

extern "C" {

// y [M, n_out] bf16 = x W^T plus row m's adapter (row_adapter[m] < n, or -1: none), each adapter one LoraSite
// (the decode step's linears one at a time: for tests).
void mm_lora(const Linear* L, int64_t n, const LoraSite* const* adapters, const int32_t* row_adapter,
             const uint16_t* x, int64_t M, int64_t ldx, uint16_t* out, int64_t ldo) {
  std::vector<float> u;
  std::vector<const LoraSite*> sites;
  const LoraBatch lb = lora_batch(n, adapters, row_adapter, M, 1, u, sites);
  std::vector<float> gsum(2 * M * act_groups(*L)),
      xf(std::min(M, panel_rows(L->k)) * L->k);
#pragma omp parallel
  linear_lora(*L, lb, 0, x, M, ldx, out, ldo, gsum.data(), xf.data());
}

}  // extern "C"

extern "C" {

// hidden [B, d]: the token embeddings in, the final-normed hidden states out. Per DeltaNet layer (in order) B conv
// and recurrent states; per attention layer B key and value caches (with room at pos[b]) and their capacities.
// cos, sin: [B, rot] for each sequence's position. Workspaces: x [B, d], proj [B, widest projection], core [B, widest
// mixer output], tmp [B, d], gu [B, intermediate] (bf16); scratch (deltanet_team's), gsum [B, 2 K/group] (float32).
// LoRA: n_adapters tables of LoraSites, [n_layers][proj, out, gate_up, down] each; row_adapter [B]: each sequence's
// table, or -1 (the base). n_adapters = 0: none (both pointers may be null).
void decode_step(int64_t n_layers, const Layer* layers, int64_t B, int64_t d, uint16_t* hidden,
                 const uint16_t* final_norm, float final_eps, uint16_t** conv, float** rec, uint16_t** kcache,
                 uint16_t** vcache, const int64_t* cap, const int64_t* pos, const uint16_t* cos, const uint16_t* sin,
                 int64_t rot, uint16_t* x, uint16_t* proj, uint16_t* core, uint16_t* tmp, uint16_t* gu, float* scratch,
                 float* gsum, int64_t n_adapters, const LoraSite* const* adapters, const int32_t* row_adapter) {
  std::vector<int64_t> starts(B), lens(B, 1);
  for (int64_t b = 0; b < B; ++b) starts[b] = b;
  int64_t widest = 0;
  for (int64_t l = 0; l < n_layers; ++l)
    for (const Linear* lin : {&layers[l].proj, &layers[l].out, &layers[l].gate_up, &layers[l].down})
      widest = std::max(widest, std::min(B, panel_rows(lin->k)) * lin->k);
  std::vector<float> xf(widest);
  std::vector<float> lora_u;  // LoRA: each adapter's sites are [n_layers][proj, out, gate_up, down]
  std::vector<const LoraSite*> lora_sites;
  const LoraBatch lb = lora_batch(n_adapters, adapters, row_adapter, B, 4 * n_layers, lora_u, lora_sites);
#pragma omp parallel
  {
    int64_t delta = 0, attn = 0;  // layers of each kind so far: where their states are
    for (int64_t l = 0; l < n_layers; ++l) {
      const Layer& L = layers[l];
#pragma omp for schedule(static)  // (rows across threads: a batch of streams has many)
      for (int64_t b = 0; b < B; ++b) rmsnorm_rows(hidden, d, b, b + 1, d, L.in_norm, 1.0f, L.eps, x, d);
      linear_lora(L.proj, lb, 4 * l, x, B, d, proj, L.proj.n_out, gsum, xf.data());
      const int64_t ld = L.proj.n_out;
      int64_t width;  // of the mixer's output
      if (L.kind == 0) {
        const int64_t conv_dim = 2 * L.hk * L.dk + L.hv * L.dv;
        width = L.hv * L.dv;
        const uint16_t *z = proj + conv_dim, *b_in = z + width, *a_in = b_in + L.hv;
        deltanet_team(B, starts.data(), lens.data(), L.hk, L.hv, L.dk, L.dv, L.kernel, proj, ld, z, ld, b_in, ld, a_in,
                      ld, L.conv_wt, conv + delta * B, rec + delta * B, L.a_log, L.dt_bias, L.norm_w, L.mixer_eps,
                      core, scratch);
        ++delta;
      } else {
        width = L.heads * L.head_dim;
        const uint16_t *k_in = proj + 2 * width, *v_in = k_in + L.kv_heads * L.head_dim;
        attention_team(B, L.heads, L.kv_heads, L.head_dim, rot, proj, ld, k_in, ld, v_in, ld, L.q_norm, L.k_norm,
                       L.mixer_eps, cos, sin, rot, kcache + attn * B, vcache + attn * B, cap + attn * B, pos, core);
        ++attn;
      }
      linear_lora(L.out, lb, 4 * l + 1, core, B, width, tmp, d, gsum, xf.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        add_rows(hidden + b * d, tmp + b * d, d);
        rmsnorm_rows(hidden, d, b, b + 1, d, L.post_norm, 1.0f, L.eps, x, d);
      }
      linear_lora(L.gate_up, lb, 4 * l + 2, x, B, d, gu, L.gate_up.n_out, gsum, xf.data());
      linear_lora(L.down, lb, 4 * l + 3, gu, B, L.gate_up.n_out, tmp, d, gsum, xf.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) add_rows(hidden + b * d, tmp + b * d, d);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) rmsnorm_rows(hidden, d, b, b + 1, d, final_norm, 1.0f, final_eps, hidden, d);
  }
}

}  // extern "C"

extern "C" const char* kernels_isa() { return simd::NAME; }
