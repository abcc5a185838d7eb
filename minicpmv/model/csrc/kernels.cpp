// Small-batch matmul over pre-packed weights for x86 CPUs with AVX-512 BF16: y[M, N] = x[M, K] @ W^T.
//
// Decode multiplies one (or a few) activation rows by every weight matrix once per token, so the work is bound by
// how fast the weights stream from memory. The packed layouts make each 64-column block one linear stream:
//   bf16: [N/64][K/2][64][2] bf16        one k-pair of 64 columns = 256 bytes = 4 zmm, fed to vdpbf16ps
//   int8: [N/64][K][64] int8             + a float scale per column
//   int4: [N/64][K/G][G/4][4][16][2] u8  per group of G, 16 columns x 2 k per 32 bytes; low nibbles hold the group's
//                                        first G/2 k, high nibbles the rest; + a bf16 scale per column and group
// Each activation row's k-pair (or k) is broadcast and multiplied into 16-column accumulators, so a weight load is
// reused by every row of the batch and no horizontal sums are needed. Blocks are split over OpenMP threads, which
// share the runtime that PyTorch already loaded (same libgomp soname).
//
// int4 nibbles u = q + 8 are turned into bf16 by OR-ing the exponent of 128 (0x4300 | u == 128 + u exactly), so
// the group sum is sum((136 + q) x) and 136 * sum(x) over the group is subtracted before scaling.
//
// The epilogue adds a bias, or (act = 1) computes silu(gate) * up where each 64-column block holds 32 gate and the
// matching 32 up columns, and writes bf16 (round to nearest even) or float32.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

namespace {

constexpr int BLOCK = 64;  // output columns per packed block
constexpr int MT = 4;      // activation rows per register tile

inline __m512bh bcast_pair(const uint16_t* x) {
  uint32_t v;
  memcpy(&v, x, 4);
  return (__m512bh)_mm512_set1_epi32((int)v);
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
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

struct Epilogue {
  const float* bias;  // [N] or null
  void* out;
  int64_t ldo, n_out;  // row stride and number of valid output columns
  int fp32, act;

  // acc: [rows][64] float32 for packed block b.
  void operator()(const float* acc, int rows, int64_t m0, int64_t b) const {
    for (int m = 0; m < rows; ++m) {
      const float* a = acc + m * BLOCK;
      float tmp[BLOCK];
      int64_t col0, width;
      if (act == 1) {
        col0 = b * (BLOCK / 2), width = BLOCK / 2;
        for (int j = 0; j < BLOCK / 2; ++j) {
          float g = a[j];
          tmp[j] = g / (1.0f + expf(-g)) * a[BLOCK / 2 + j];
        }
      } else {
        col0 = b * BLOCK, width = BLOCK;
        for (int j = 0; j < BLOCK; ++j) tmp[j] = a[j];
        if (bias)
          for (int j = 0; j < BLOCK && col0 + j < n_out; ++j) tmp[j] += bias[col0 + j];
      }
      width = std::min<int64_t>(width, n_out - col0);
      if (width <= 0) continue;
      if (fp32) {
        memcpy((float*)out + (m0 + m) * ldo + col0, tmp, width * 4);
      } else {
        uint16_t* o = (uint16_t*)out + (m0 + m) * ldo + col0;
        for (int64_t j = 0; j < width; ++j) o[j] = f32_to_bf16(tmp[j]);
      }
    }
  }
};

// ---- bf16 ---------------------------------------------------------------------------------------------------------
template <int R>
void tile_bf16(const uint16_t* x, int64_t ldx, int64_t k2, const uint16_t* w, float* acc_out) {
  __m512 acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    const uint16_t* wp = w + p * 2 * BLOCK;
    _mm_prefetch((const char*)(wp + 16 * 2 * BLOCK), _MM_HINT_T0);
    _mm_prefetch((const char*)(wp + 16 * 2 * BLOCK + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(wp + 16 * 2 * BLOCK + 128), _MM_HINT_T0);
    _mm_prefetch((const char*)(wp + 16 * 2 * BLOCK + 192), _MM_HINT_T0);
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp);
    __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(wp + 64);
    __m512bh w3 = (__m512bh)_mm512_loadu_si512(wp + 96);
    for (int m = 0; m < R; ++m) {
      __m512bh xv = bcast_pair(x + m * ldx + 2 * p);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xv);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xv);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc_out + m * BLOCK + 16 * c, acc[m][c]);
}

// ---- int8 ---------------------------------------------------------------------------------------------------------
template <int R>
void tile_int8(const float* x, int64_t ldx, int64_t k, const int8_t* w, float* acc_out) {
  __m512 acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const int8_t* wp = w + i * BLOCK;
    _mm_prefetch((const char*)(wp + 16 * BLOCK), _MM_HINT_T0);
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)wp)));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wp + 16))));
    __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wp + 32))));
    __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wp + 48))));
    for (int m = 0; m < R; ++m) {
      __m512 xv = _mm512_set1_ps(x[m * ldx + i]);
      acc[m][0] = _mm512_fmadd_ps(w0, xv, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xv, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(w2, xv, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(w3, xv, acc[m][3]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc_out + m * BLOCK + 16 * c, acc[m][c]);
}

// ---- int4 ---------------------------------------------------------------------------------------------------------
// One group of g k-values for R rows: acc_out[m][64] += scale * (sum((136 + q) x) - 136 * gsum[m]).
template <int R>
void group_int4(const uint16_t* x, int64_t ldx, int64_t g, const uint8_t* w, const uint16_t* scale,
                const float* gsum, int64_t ldg, float* acc_out) {
  const __m512i lo_mask = _mm512_set1_epi16(0x000f), bias = _mm512_set1_epi16(0x4300);
  __m512 acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  const int64_t rows = g / 4;  // k-pairs in the low nibbles; the same number in the high ones
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* wp = w + r * 4 * 32;
    _mm_prefetch((const char*)(wp + 8 * 128), _MM_HINT_T0);
    __m512bh lo[4], hi[4];
    for (int c = 0; c < 4; ++c) {
      __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wp + 32 * c)));
      lo[c] = (__m512bh)_mm512_ternarylogic_epi32(v, lo_mask, bias, 0xEA);  // (v & 0xf) | 0x4300
      hi[c] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
    }
    for (int m = 0; m < R; ++m) {
      __m512bh xl = bcast_pair(x + m * ldx + 2 * r), xh = bcast_pair(x + m * ldx + 2 * (r + rows));
      for (int c = 0; c < 4; ++c) {
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], lo[c], xl);
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], hi[c], xh);
      }
    }
  }
  __m512 s[4];
  for (int c = 0; c < 4; ++c)
    s[c] = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(scale + 16 * c))), 16));
  for (int m = 0; m < R; ++m) {
    __m512 off = _mm512_set1_ps(136.0f * gsum[m * ldg]);
    for (int c = 0; c < 4; ++c) {
      float* o = acc_out + m * BLOCK + 16 * c;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_sub_ps(acc[m][c], off), s[c], _mm512_loadu_ps(o)));
    }
  }
}

template <int R>
void tile_int4(const uint16_t* x, int64_t ldx, int64_t k, int64_t g, const uint8_t* w, const uint16_t* scale,
               const float* gsum, int64_t ldg, float* acc_out) {
  memset(acc_out, 0, sizeof(float) * R * BLOCK);
  for (int64_t i = 0; i < k / g; ++i)
    group_int4<R>(x + i * g, ldx, g, w + i * g * 32, scale + i * BLOCK, gsum + i, ldg, acc_out);
}

// Calls tile(rows, m0, acc) for row groups of at most MT, then the epilogue, for every block, in parallel.
template <class Tile>
void run_blocks(int64_t M, int64_t nblocks, const Epilogue& ep, Tile tile) {
#pragma omp parallel for schedule(dynamic, 1)  // dynamic: a thread slowed by another process does less
  for (int64_t b = 0; b < nblocks; ++b) {
    alignas(64) float acc[MT * BLOCK];
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      int rows = (int)std::min<int64_t>(MT, M - m0);
      tile(b, rows, m0, acc);
      ep(acc, rows, m0, b);
    }
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

extern "C" {

// x: [M, K] bf16 with row stride ldx; w: packed, nblocks blocks of K (padded to even) rows.
void mm_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t nblocks,
             const float* bias, void* out, int64_t ldo, int64_t n_out, int fp32, int act) {
  Epilogue ep{bias, out, ldo, n_out, fp32, act};
  const int64_t k2 = K / 2;
  run_blocks(M, nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
    const uint16_t* wb = w + b * k2 * 2 * BLOCK;
    const uint16_t* xm = x + m0 * ldx;
#define CALL(R) tile_bf16<R>(xm, ldx, k2, wb, acc)
    DISPATCH_ROWS(rows, CALL)
#undef CALL
  });
}

// x: [M, K] float32 (contiguous); scale: [nblocks * 64] per output column.
void mm_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t nblocks,
             const float* bias, void* out, int64_t ldo, int64_t n_out, int fp32, int act) {
  Epilogue ep{bias, out, ldo, n_out, fp32, act};
  run_blocks(M, nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
    const int8_t* wb = w + b * K * BLOCK;
#define CALL(R) tile_int8<R>(x + m0 * K, K, K, wb, acc)
    DISPATCH_ROWS(rows, CALL)
#undef CALL
    const float* s = scale + b * BLOCK;
    for (int m = 0; m < rows; ++m)
      for (int j = 0; j < BLOCK; ++j) acc[m * BLOCK + j] *= s[j];
  });
}

// x: [M, K] bf16 (contiguous, K a multiple of g); gsum: [M, K/g] float32 group sums of x; scale: bf16
// [nblocks][K/g][64].
void mm_int4(const uint16_t* x, int64_t M, int64_t K, int64_t g, const uint8_t* w, const uint16_t* scale,
             const float* gsum, int64_t nblocks, const float* bias, void* out, int64_t ldo, int64_t n_out, int fp32,
             int act) {
  Epilogue ep{bias, out, ldo, n_out, fp32, act};
  const int64_t ng = K / g;
  run_blocks(M, nblocks, ep, [&](int64_t b, int rows, int64_t m0, float* acc) {
    const uint8_t* wb = w + b * K * BLOCK / 2;
    const uint16_t* sb = scale + b * ng * BLOCK;
#define CALL(R) tile_int4<R>(x + m0 * K, K, K, g, wb, sb, gsum + m0 * ng, ng, acc)
    DISPATCH_ROWS(rows, CALL)
#undef CALL
  });
}

}  // extern "C"

// ---- decode-step helpers (one token per sequence; float32 maths, bf16 in and out) --------------------------------
namespace {

inline float silu(float v) { return v / (1.0f + expf(-v)); }

inline void load_row(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

}  // namespace

extern "C" {

// out = rmsnorm(x) * (offset + w) per row; x, out: [M, D] with row strides; w: [D] bf16.
void rmsnorm_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t D, const uint16_t* w, float offset, float eps,
                  uint16_t* out, int64_t ldo) {
#pragma omp parallel for schedule(static) if (M > 8)
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * ldx;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      float v = bf16_to_f32(xr[i]);
      ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) out[m * ldo + i] = f32_to_bf16(bf16_to_f32(xr[i]) * r * (offset + bf16_to_f32(w[i])));
  }
}

// One decode token for each of B sequences through a Gated DeltaNet layer, everything between the input
// projections and out_proj: the causal conv step (shifting the conv state), silu, q/k l2 norms, decay and beta, the
// delta rule on the float32 state (updated in place), and the gated RMSNorm. out: [B, hv * dv] bf16.
void deltanet_decode(int64_t B, int64_t hk, int64_t hv, int64_t dk, int64_t dv, int64_t kernel,
                     const uint16_t* mixed, int64_t ld_mixed, const uint16_t* z, int64_t ld_z,
                     const uint16_t* b_in, int64_t ld_b, const uint16_t* a_in, int64_t ld_a,
                     const uint16_t* conv_w, uint16_t** conv_state, float** rec, const uint16_t* a_log,
                     const uint16_t* dt_bias, const uint16_t* norm_w, float eps, uint16_t* out, float* scratch) {
  const int64_t key_dim = hk * dk, conv_dim = 2 * key_dim + hv * dv, taps = kernel - 1;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < B * conv_dim; ++bc) {
    const int64_t b = bc / conv_dim, c = bc % conv_dim;
    uint16_t* s = conv_state[b] + c * taps;
    const uint16_t* w = conv_w + c * kernel;
    const uint16_t x = mixed[b * ld_mixed + c];
    float acc = bf16_to_f32(w[taps]) * bf16_to_f32(x);
    for (int64_t t = 0; t < taps; ++t) acc += bf16_to_f32(w[t]) * bf16_to_f32(s[t]);
    for (int64_t t = 0; t + 1 < taps; ++t) s[t] = s[t + 1];
    if (taps) s[taps - 1] = x;
    scratch[bc] = silu(acc);
  }
  const int64_t rep = hv / hk;
  const float q_scale = 1.0f / sqrtf((float)dk);
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < B * hv; ++bh) {
    const int64_t b = bh / hv, h = bh % hv, kh = h / rep;
    const float* row = scratch + b * conv_dim;
    float q[512], k[512], pred[512], sq[512], delta[512];
    float qq = 0.0f, kk = 0.0f;
    for (int64_t i = 0; i < dk; ++i) {
      q[i] = row[kh * dk + i], k[i] = row[key_dim + kh * dk + i];
      qq += q[i] * q[i], kk += k[i] * k[i];
    }
    const float rq = q_scale / sqrtf(qq + 1e-6f), rk = 1.0f / sqrtf(kk + 1e-6f);
    float kq = 0.0f;
    for (int64_t i = 0; i < dk; ++i) q[i] *= rq, k[i] *= rk, kq += k[i] * q[i];
    const float a = bf16_to_f32(a_in[b * ld_a + h]) + bf16_to_f32(dt_bias[h]);
    const float softplus = a > 20.0f ? a : log1pf(expf(a));
    const float decay = expf(-expf(bf16_to_f32(a_log[h])) * softplus);
    const float beta = 1.0f / (1.0f + expf(-bf16_to_f32(b_in[b * ld_b + h])));
    float* S = rec[b] + h * dk * dv;
    for (int64_t j = 0; j < dv; ++j) pred[j] = 0.0f, sq[j] = 0.0f;
    for (int64_t i = 0; i < dk; ++i) {
      const float* Si = S + i * dv;
      const float ki = k[i], qi = q[i];
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) pred[j] += Si[j] * ki, sq[j] += Si[j] * qi;
    }
    const float* v = row + 2 * key_dim + h * dv;
    float ss = 0.0f;
    for (int64_t j = 0; j < dv; ++j) {
      delta[j] = (v[j] - decay * pred[j]) * beta;
      sq[j] = decay * sq[j] + delta[j] * kq;  // the output: S'^T q with S' the updated state
      ss += sq[j] * sq[j];
    }
    for (int64_t i = 0; i < dk; ++i) {
      float* Si = S + i * dv;
      const float ki = k[i];
#pragma omp simd
      for (int64_t j = 0; j < dv; ++j) Si[j] = decay * Si[j] + ki * delta[j];
    }
    const float r = 1.0f / sqrtf(ss / dv + eps);
    const uint16_t* zr = z + b * ld_z + h * dv;
    uint16_t* o = out + b * hv * dv + h * dv;
    for (int64_t j = 0; j < dv; ++j)
      o[j] = f32_to_bf16(sq[j] * r * bf16_to_f32(norm_w[j]) * silu(bf16_to_f32(zr[j])));
  }
}

}  // extern "C"
