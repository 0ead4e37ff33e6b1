// AVX2 kernels for int8_linear (compiled with -mavx2 -mfma -mf16c; no torch headers).
// cpu_avx2_fp32, K in the 8 lanes:
// int8 -> int32 (vpmovsxbd) -> fp32, FMA with fp32 activations (converted once by the glue), so every
// product and sum is fp32 as in the reference. Grouped scales multiply the converted weight (q * s in fp32,
// as the reference dequantizes); per-channel scales multiply the reduced dot product. Correctness over
// peak speed: larger M re-reads each 4-column weight strip from cache for every 4 rows of x.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/int8_linear.h"
#include "cpu/prefetch.h"
#include "static_count.h"

namespace fastquant::cpu {
namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Tiles of 4 output columns the kernels prefetch ahead (cpu_avx2_int8x: best of 1, 2 and 4 at K = 576).
constexpr int64_t kPrefetchTiles = 2;

template <int MR, int NR, bool GROUPED>
void tile(const Int8LinearProblem& p, int64_t m0, int64_t j0) {
  const int64_t K = p.k;
  const float* x = p.x_f32 + m0 * K;
  const int8_t* w = p.w + (j0 - p.w_first_row) * K;
  __m256 acc[MR][NR];
  float tail[MR][NR];
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      acc[r][c] = _mm256_setzero_ps();
      tail[r][c] = 0.f;
    }
  }
  const int64_t G = GROUPED ? p.group_size : K;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    float sc[NR];
    __m256 s[NR];
    for (int c = 0; c < NR; ++c) {
      sc[c] = GROUPED ? p.scales[(j0 + c) * p.n_groups + g] : 1.f;
      s[c] = _mm256_set1_ps(sc[c]);
    }
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      __m256 wv[NR];
      for (int c = 0; c < NR; ++c) {
        int64_t q;
        std::memcpy(&q, w + c * K + k, 8);
        wv[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(q)));
        if (GROUPED) wv[c] = _mm256_mul_ps(wv[c], s[c]);
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * K + k);
        for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
    for (; k < k1; ++k) {
      for (int c = 0; c < NR; ++c) {
        const float wf = static_cast<float>(w[c * K + k]) * sc[c];
        for (int r = 0; r < MR; ++r) tail[r][c] += x[r * K + k] * wf;
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      float v = hsum8(acc[r][c]) + tail[r][c];
      if (!GROUPED) v *= p.scales[j0 + c];
      if (p.bias_f32) v += p.bias_f32[j0 + c];
      p.y_f32[(m0 + r) * p.n + j0 + c] = v;
    }
  }
}

template <int MR, bool GROUPED>
void cols(const Int8LinearProblem& p, int64_t m0, int64_t j0, int64_t nc) {
  with_count<4>(nc, [&](auto nr) { tile<MR, decltype(nr)::value, GROUPED>(p, m0, j0); });
}

template <bool GROUPED>
void run(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end) {
  // Row j of the weight is at p.w + (j - p.w_first_row) * k.
  const int8_t* w = p.w + (n_begin - p.w_first_row) * p.k;
  prefetch_bytes(w, std::min(kPrefetchTiles * 4, n_end - n_begin) * p.k);
  for (int64_t j0 = n_begin; j0 < n_end; j0 += 4) {
    const int64_t nc = n_end - j0 < 4 ? n_end - j0 : 4;
    // The tile kPrefetchTiles ahead, all at once (cpu_avx2_int8x spreads its prefetches over the blocks).
    const int64_t ahead = j0 + kPrefetchTiles * 4;
    if (ahead < n_end) prefetch_bytes(w + (ahead - n_begin) * p.k, std::min<int64_t>(4, n_end - ahead) * p.k);
    int64_t m0 = 0;
    for (; m0 + 2 <= p.m; m0 += 2) cols<2, GROUPED>(p, m0, j0, nc);
    if (m0 < p.m) cols<1, GROUPED>(p, m0, j0, nc);
  }
}

// cpu_avx2_int8x (int8_linear.h): NR output columns for row i of x. The columns share each block's plane of
// X and its step; every column has its own accumulator (independent FMA chains). `ahead`: the first of NR
// weight rows to prefetch while this tile is read (rows of this thread's range: never past the weight).
template <int NR, bool GROUPED>
void int8x_tile(const Int8LinearProblem& p, int64_t i, int64_t j0, const int8_t* ahead) {
  const int64_t K = p.k;
  const int64_t n_blocks = (K + 31) / 32;
  const int64_t full_blocks = K / 32;  // a ragged last block is read through a zero-padded copy
  const int8_t* plane = p.x_int8 + i * p.x_int8_stride;
  const float* steps = p.x_int8_steps + i * (p.x_int8_stride / 32);
  const int8_t* w = p.w + (j0 - p.w_first_row) * K;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t blocks_per_group = GROUPED ? p.group_size / 32 : n_blocks;
  __m256 total[NR];
  for (int c = 0; c < NR; ++c) total[c] = _mm256_setzero_ps();
  for (int64_t b0 = 0, g = 0; b0 < n_blocks; b0 += blocks_per_group, ++g) {
    const int64_t b1 = b0 + blocks_per_group < n_blocks ? b0 + blocks_per_group : n_blocks;
    __m256 acc[NR];
    for (int c = 0; c < NR; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane + 32 * b));
      const __m256 step = _mm256_set1_ps(steps[b]);
      // The tile kPrefetchTiles ahead, at the rate this one is read (NR * 32 bytes per block): at SmolLM2's
      // K = 576 a row is 9 cache lines, too short a stream for the hardware prefetcher, and a layer streamed
      // from DRAM ran at half the read bandwidth without this (benchmarks/NOTES.md).
      const char* line = reinterpret_cast<const char*>(ahead) + NR * 32 * b;
      _mm_prefetch(line, _MM_HINT_T0);
      if (NR > 2) _mm_prefetch(line + 64, _MM_HINT_T0);
      for (int c = 0; c < NR; ++c) {
        __m256i q;
        if (b < full_blocks) {
          q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * K + 32 * b));
        } else {
          alignas(32) int8_t tail[32] = {};
          std::memcpy(tail, w + c * K + 32 * b, K - 32 * b);
          q = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
        // |q| (0..128, unsigned) times X with q's sign (|X| <= 127): vpmaddubsw needs one unsigned operand.
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xb, q));
        const __m256i dot = _mm256_madd_epi16(pairs, ones);  // exact: |lane| <= 4 * 128 * 127 < 2^24
        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), step, acc[c]);
      }
    }
    for (int c = 0; c < NR; ++c) {
      total[c] = GROUPED
                     ? _mm256_fmadd_ps(acc[c], _mm256_set1_ps(p.scales[(j0 + c) * p.n_groups + g]), total[c])
                     : acc[c];
    }
  }
  for (int c = 0; c < NR; ++c) {
    float v = hsum8(total[c]);
    if (!GROUPED) v *= p.scales[j0 + c];
    if (p.bias_f32) v += p.bias_f32[j0 + c];
    p.y_f32[i * p.n + j0 + c] = v;
  }
}

template <bool GROUPED>
void int8x_run(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end) {
  // The first tiles, which no earlier tile prefetched.
  prefetch_bytes(p.w + (n_begin - p.w_first_row) * p.k, std::min(kPrefetchTiles * 4, n_end - n_begin) * p.k);
  for (int64_t j0 = n_begin; j0 < n_end; j0 += 4) {
    const int64_t nc = n_end - j0 < 4 ? n_end - j0 : 4;
    // Near the end of the range the rows ahead are clamped to the last nc (already fetched, harmless) rather
    // than pointing past the weight.
    const int8_t* ahead = p.w + (std::min(j0 + kPrefetchTiles * 4, n_end - nc) - p.w_first_row) * p.k;
    for (int64_t i = 0; i < p.m; ++i) {
      with_count<4>(nc, [&](auto nr) { int8x_tile<decltype(nr)::value, GROUPED>(p, i, j0, ahead); });
    }
  }
}

}  // namespace

void int8_linear_avx2_int8x(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void*) {
  if (p.group_size < p.k) {
    int8x_run<true>(p, n_begin, n_end);
  } else {
    int8x_run<false>(p, n_begin, n_end);
  }
}

void int8_linear_avx2_fp32(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void*) {
  if (p.group_size < p.k) {
    run<true>(p, n_begin, n_end);
  } else {
    run<false>(p, n_begin, n_end);
  }
}

}  // namespace fastquant::cpu
