// Tile primitives of the CPU attention kernels (csrc/cpu/attention*.cpp): a small GEMM on
// tiles held in cache, row max, exp-and-sum. Each has a portable version (plain loops, any
// accumulation type) and, for float, an AVX-512 version compiled with per-function target
// attributes and picked at run time by the CPU dispatch of csrc/cpu/cpu_isa.h, so the default
// build needs no -march flag (PK_CPU_ISA=generic forces the portable loops).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../common/attention.h"
#include "cpu_isa.h"

namespace pk {
namespace attention {
namespace cpu {

// The instruction sets the tile primitives use (csrc/cpu/cpu_isa.h, the one CPU dispatch).
inline bool isa_avx512() { return ::pk::cpu::has_isa(::pk::cpu::Isa::kAvx512); }
inline bool isa_avx512bf16() { return ::pk::cpu::has_isa(::pk::cpu::Isa::kAvx512Bf16); }
inline bool isa_amx() { return ::pk::cpu::has_isa(::pk::cpu::Isa::kAmx); }

// Rows of K or V as the rows kernels read them, key j of a block at rows(j): one pointer and a
// row stride, or through the page table of a paged kv cache (paged_offset in
// csrc/common/attention.h). Both give the kernels the same keys in the same order, so a paged
// cache gives the bits of the contiguous one. Rows j .. j + run(j) - 1 lie stride() apart (one
// run: all of them when strided, the rest of the page when paged), so a walk over the rows
// (RowWalk) computes one address per page. prefetchable(j): row j is worth a prefetch although
// it lies past the block: it belongs to the sequence (j < limit). Past the sequence a prefetch
// would not fault (strided) but costs its instructions and, off the tensor, a page walk; paged,
// only the table entries of the sequence's rows are checked, not the entries past them.
template <typename T>
struct StridedRows {
  static constexpr bool kStrided = true;
  const T* base;
  int64_t ld;
  int64_t limit = std::numeric_limits<int64_t>::max();  // rows j < limit belong to the sequence
  const T* operator()(int64_t j) const { return base + j * ld; }
  int64_t run(int64_t) const { return std::numeric_limits<int64_t>::max(); }
  int64_t stride() const { return ld; }
  bool prefetchable(int64_t j) const { return j < limit; }
};

template <typename T>
struct PagedRows {
  static constexpr bool kStrided = false;
  const T* base;          // block 0, slot 0 of the kv head
  const int32_t* pages;   // the row's block_table entries
  int64_t page_size, s_page, s_slot;
  int64_t j0;             // logical position of key 0 of the block
  int64_t limit;          // rows j < limit exist (key j0 + j below the sequence's key count)
  int shift = -1;         // log2(page_size) when a power of two: shifts instead of divisions
  PagedRows(const T* base_, const int32_t* pages_, int64_t page_size_, int64_t s_page_, int64_t s_slot_, int64_t j0_,
            int64_t limit_)
      : base(base_), pages(pages_), page_size(page_size_), s_page(s_page_), s_slot(s_slot_), j0(j0_), limit(limit_) {
    if ((page_size & (page_size - 1)) == 0)
      while ((int64_t(1) << (shift + 1)) <= page_size) ++shift;
  }
  int64_t slot(int64_t t) const { return shift >= 0 ? (t & (page_size - 1)) : t % page_size; }
  // Whether keys j .. j + n - 1 lie in one page.
  bool one_page(int64_t j, int64_t n) const { return slot(j0 + j) + n <= page_size; }
  const T* operator()(int64_t j) const {
    const int64_t t = j0 + j;
    if (shift >= 0)  // paged_offset (csrc/common/attention.h) with shifts
      return base + static_cast<int64_t>(pages[t >> shift]) * s_page + (t & (page_size - 1)) * s_slot;
    return base + paged_offset(pages, page_size, t, s_page, s_slot);
  }
  int64_t run(int64_t j) const { return page_size - slot(j0 + j); }
  int64_t stride() const { return s_slot; }
  bool prefetchable(int64_t j) const { return j < limit; }
};

// Addresses of rows j, j + 1, ... of `rows`, asked for in that order: one table lookup per
// run, the rows of a run a stride apart. at(j) is row j; at_or_null(j) is row j or null when
// it is not to be prefetched (prefetchable; then neither are the rows after it).
template <typename Rows>
struct RowWalk {
  using Ptr = decltype(std::declval<const Rows&>()(0));
  const Rows& rows;
  Ptr ptr = nullptr;
  int64_t left = 0;  // rows after ptr in its run
  explicit RowWalk(const Rows& r) : rows(r) {}
  Ptr at(int64_t j) {
    if (left > 0) {
      ptr += rows.stride();
      --left;
    } else {
      ptr = rows(j);
      left = rows.run(j) - 1;
    }
    return ptr;
  }
  Ptr at_or_null(int64_t j) {
    if (!rows.prefetchable(j)) return nullptr;
    return at(j);
  }
};

// ---------------------------------------------------------------------------------------
// Portable versions.

// C[m, n] (row stride ldc) = (accumulate ? C[m, n] : 0) + sum_k A(m, k) * B[k * ldb + n],
// with A(m, k) = A[m * a_rs + k * a_ks] (so A may be a transposed view).
template <typename acc_t>
void gemm_ref(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t a_rs, int64_t a_ks, const acc_t* B,
              int64_t ldb, acc_t* C, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    acc_t* c = C + m * ldc;
    if (!accumulate) std::fill(c, c + N, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = A[m * a_rs + k * a_ks];
      const acc_t* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

template <typename acc_t>
acc_t row_max_ref(const acc_t* s, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - sub); returns the sum. sub is finite.
template <typename acc_t>
acc_t exp_sum_ref(acc_t* s, int64_t n, acc_t sub) {
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = std::exp(s[j] - sub);
    s[j] = e;
    sum += e;
  }
  return sum;
}

#if PK_X86
// ---------------------------------------------------------------------------------------
// AVX-512 versions (float).

// exp(x) for x <= 0 (and any x up to 88): Cody-Waite range reduction, degree-7 polynomial,
// 2^n by scalef. Inputs below -87.3 (and -inf) give exactly 0.
PK_TARGET_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.98412698e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888889e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666667e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666667e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// tanh(x): x + x^3 P(x^2) below |x| = 0.625 (the polynomial of Cephes' tanhf), above it
// (1 - e) / (1 + e) with e = exp(-2|x|) and the sign of x, the division as a reciprocal
// estimate and one Newton step. Within a few ulps of std::tanh (tests/test_attention.py
// measures it through the op). Soft-capped attention scores mostly lie in the polynomial's
// range (|s| < 0.625 cap: 31 for Gemma-2's cap of 50), so a vector whose lanes all do skips
// the exponential: the cap then costs a few multiply-adds per score.
PK_TARGET_AVX512 inline __m512 tanh512(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __mmask16 is_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  if (is_small == static_cast<__mmask16>(0xffff)) return small;
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp512(_mm512_mul_ps(ax, _mm512_set1_ps(-2.f)));
  const __m512 d = _mm512_add_ps(one, e);  // in [1, 2]: the estimate is never 0 or inf
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  const __m512 big = _mm512_mul_ps(_mm512_sub_ps(one, e), r);
  const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.f));
  return _mm512_mask_blend_ps(is_small, _mm512_or_ps(big, sign), small);
}

PK_TARGET_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// s[j] = -inf for j < lo and j >= hi (j < n): the window's invisible keys of a row.
PK_TARGET_AVX512 inline void mask_outside_avx512(float* s, int64_t n, int64_t lo, int64_t hi) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  lo = std::min<int64_t>(std::max<int64_t>(lo, -1), n + 1);  // the compares below run on 32-bit lanes
  hi = std::min<int64_t>(std::max<int64_t>(hi, -1), n + 1);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo)), vhi = _mm512_set1_epi32(static_cast<int32_t>(hi));
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), lane);
    const __mmask16 out = static_cast<__mmask16>((_mm512_cmplt_epi32_mask(idx, vlo) | _mm512_cmpge_epi32_mask(idx, vhi)) &
                                                 tail_mask(n - j));
    _mm512_mask_storeu_ps(s + j, out, ninf);
  }
}

// Two rows of 16 16-bit values as 16 32-bit words, lo in the low half: word c = (lo[c], hi[c]).
PK_TARGET_AVX512 inline __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

PK_TARGET_AVX512 inline float row_max_avx512(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
  if (j < n) m = _mm512_mask_max_ps(m, tail_mask(n - j), m, _mm512_maskz_loadu_ps(tail_mask(n - j), s + j));
  return _mm512_reduce_max_ps(m);
}

// The score modifiers (modify_score, csrc/common/attention.h) on a row s[0, n): the soft-cap
// when cap > 0 (dcap, when given, gets 1 - tanh^2), then, when `alibi`, the bias
// -slope * |d0 - j| of column j. The same operations as the scalar formula but tanh512 for
// tanhf and s * (1 / cap) for s / cap (one more rounding, within the few ulps tested).
// |d0| and |d0 - n| must be below 2^30 (the caller checks).
PK_TARGET_AVX512 inline void score_mod_row_avx512(float* s, float* dcap, int64_t n, float cap, bool alibi,
                                                  float slope, int64_t d0) {
  const __m512 vcap = _mm512_set1_ps(cap), icap = _mm512_set1_ps(cap > 0.f ? 1.f / cap : 0.f);
  const __m512 one = _mm512_set1_ps(1.f), nslope = _mm512_set1_ps(-slope);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    __m512 x = _mm512_maskz_loadu_ps(t, s + j);
    if (cap > 0.f) {
      const __m512 th = tanh512(_mm512_mul_ps(x, icap));
      x = _mm512_mul_ps(vcap, th);
      if (dcap != nullptr) _mm512_mask_storeu_ps(dcap + j, t, _mm512_sub_ps(one, _mm512_mul_ps(th, th)));
    }
    if (alibi) {
      const __m512i d = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int32_t>(d0 - j)), lane);
      x = _mm512_add_ps(x, _mm512_mul_ps(nslope, _mm512_cvtepi32_ps(_mm512_abs_epi32(d))));
    }
    _mm512_mask_storeu_ps(s + j, t, x);
  }
}

PK_TARGET_AVX512 inline float exp_sum_avx512(float* s, int64_t n, float sub) {
  const __m512 vs = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vs));
    _mm512_storeu_ps(s + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (j < n) {
    const __mmask16 t = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(t, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), vs)));
    _mm512_mask_storeu_ps(s + j, t, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// Register-blocked micro kernel: an MR x (16*NV) block of C, A broadcast, B streamed.
template <int MR, int NV>
PK_TARGET_AVX512 inline void gemm_micro_avx512(int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                                               int64_t ldb, float* C, int64_t ldc, __mmask16 last, bool accumulate) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, C + r * ldc + 16 * v)
                           : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    const float* bk = B + k * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, bk + 16 * v);
    const float* ak = A + k * a_ks;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ak[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, v == NV - 1 ? last : 0xffff, c[r][v]);
}

template <int NV>
PK_TARGET_AVX512 inline void gemm_rows_avx512(int64_t M, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                                              const float* B, int64_t ldb, float* C, int64_t ldc, __mmask16 last,
                                              bool accumulate) {
  constexpr int MR = NV >= 4 ? 6 : (NV == 3 ? 8 : (NV == 2 ? 12 : 16));
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_micro_avx512<MR, NV>(K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, last, accumulate);
  const int64_t rest = M - m;
  const float* a = A + m * a_rs;
  float* c = C + m * ldc;
  for (int64_t r0 = 0; r0 < rest;) {
    const int64_t take = std::min<int64_t>(rest - r0, 4);
    switch (take) {
      case 4: gemm_micro_avx512<4, NV>(K, a + r0 * a_rs, a_rs, a_ks, B, ldb, c + r0 * ldc, ldc, last, accumulate); break;
      case 3: gemm_micro_avx512<3, NV>(K, a + r0 * a_rs, a_rs, a_ks, B, ldb, c + r0 * ldc, ldc, last, accumulate); break;
      case 2: gemm_micro_avx512<2, NV>(K, a + r0 * a_rs, a_rs, a_ks, B, ldb, c + r0 * ldc, ldc, last, accumulate); break;
      default: gemm_micro_avx512<1, NV>(K, a + r0 * a_rs, a_rs, a_ks, B, ldb, c + r0 * ldc, ldc, last, accumulate); break;
    }
    r0 += take;
  }
}

PK_TARGET_AVX512 inline void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                                         const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nn = std::min<int64_t>(64, N - n0);
    const int nv = static_cast<int>((nn + 15) / 16);
    const __mmask16 last = tail_mask(nn - 16 * (nv - 1));
    switch (nv) {
      case 4: gemm_rows_avx512<4>(M, K, A, a_rs, a_ks, B + n0, ldb, C + n0, ldc, last, accumulate); break;
      case 3: gemm_rows_avx512<3>(M, K, A, a_rs, a_ks, B + n0, ldb, C + n0, ldc, last, accumulate); break;
      case 2: gemm_rows_avx512<2>(M, K, A, a_rs, a_ks, B + n0, ldb, C + n0, ldc, last, accumulate); break;
      default: gemm_rows_avx512<1>(M, K, A, a_rs, a_ks, B + n0, ldb, C + n0, ldc, last, accumulate); break;
    }
  }
}

// ---- rows kernels for few query rows (decode): no packing, keys read in place ----------

template <typename scalar_t>
PK_TARGET_AVX512 inline __m512 load16(const scalar_t* p, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "float, bfloat16 or half");
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

// S[r * lds + j] = sum_d Q[r * D + d] * K[j * ldk + d] for r < R, j < nk. Four keys at a
// time, so that four independent FMA chains hide the latency.
// Horizontal sums of 16 vectors: out[j] = sum of the lanes of a[j].
PK_TARGET_AVX512 inline __m512 reduce16(__m512* a) {
  __m512 s[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per lane: keys 4i .. 4i+3, each summed over the lane
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // lanes (0+1), (2+3) of keys 8i .. 8i+3, then of 8i+4 .. 8i+7
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Sixteen keys kp(0) .. kp(15) against R query rows: S[r * lds + t], the sums transposed into
// one vector per row.
template <typename T>
struct RowList16 {
  const T* rows[16];
  const T* operator()(int t) const { return rows[t]; }
};

template <typename scalar_t, typename Ptr>
PK_TARGET_AVX512 inline void qk16_avx512(int64_t R, int64_t D, const float* Q, const Ptr& kp, float* S, int64_t lds) {
  for (int64_t r = 0; r < R; ++r) {
    const float* q = Q + r * D;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 m = tail_mask(D - d0);
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + d0);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qv, load16(kp(t) + d0, m), acc[t]);
    }
    _mm512_storeu_ps(S + r * lds, reduce16(acc));
  }
}

// Rows the rows kernels fetch ahead of the one they read.
constexpr int64_t kPrefetchRows = 32;

// Keys come through `K` (StridedRows or PagedRows: key j at K(j)).
template <typename scalar_t, typename Rows>
PK_TARGET_AVX512 void qk_rows_avx512(int64_t R, int64_t nk, int64_t D, const float* Q, const Rows& K, float* S,
                                     int64_t lds) {
  int64_t j = 0;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  RowWalk<Rows> ahead(K);  // the keys kPrefetchRows ahead, past the block where they exist
  for (; j + 16 <= nk; j += 16) {  // sixteen keys at a time, sums transposed into one vector
    // Rows of one head are far apart (other heads in between), too far apart for the
    // hardware prefetchers: fetch the keys two steps ahead by hand. Past the block they are
    // the next block's first keys (read after the other heads' blocks, still in L2).
    for (int64_t t = j + kPrefetchRows; t < j + kPrefetchRows + 16; ++t)
      if (const scalar_t* row = ahead.at_or_null(t))
        for (int64_t off = 0; off < row_bytes; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T0);
    if constexpr (Rows::kStrided) {
      qk16_avx512<scalar_t>(R, D, Q, StridedRows<scalar_t>{K(j), K.ld}, S + j, lds);
    } else if (K.one_page(j, 16)) {  // paged, the sixteen keys in one page: strided there
      qk16_avx512<scalar_t>(R, D, Q, StridedRows<scalar_t>{K(j), K.s_slot}, S + j, lds);
    } else {  // paged across a page boundary: each row looked up once
      RowList16<scalar_t> kr;
      for (int t = 0; t < 16; ++t) kr.rows[t] = K(j + t);
      qk16_avx512<scalar_t>(R, D, Q, kr, S + j, lds);
    }
  }
  for (; j + 4 <= nk; j += 4) {
    const scalar_t *k0 = K(j), *k1 = K(j + 1), *k2 = K(j + 2), *k3 = K(j + 3);
    for (int64_t r = 0; r < R; ++r) {
      const float* q = Q + r * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const __mmask16 m = tail_mask(D - d0);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + d0);
        a0 = _mm512_fmadd_ps(qv, load16(k0 + d0, m), a0);
        a1 = _mm512_fmadd_ps(qv, load16(k1 + d0, m), a1);
        a2 = _mm512_fmadd_ps(qv, load16(k2 + d0, m), a2);
        a3 = _mm512_fmadd_ps(qv, load16(k3 + d0, m), a3);
      }
      float* s = S + r * lds + j;
      s[0] = _mm512_reduce_add_ps(a0);
      s[1] = _mm512_reduce_add_ps(a1);
      s[2] = _mm512_reduce_add_ps(a2);
      s[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; j < nk; ++j) {
    const scalar_t* kj = K(j);
    for (int64_t r = 0; r < R; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const __mmask16 m = tail_mask(D - d0);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, Q + r * D + d0), load16(kj + d0, m), acc);
      }
      S[r * lds + j] = _mm512_reduce_add_ps(acc);
    }
  }
}

// O[r * Dv + d] += sum_j P[r * ldp + j] * V[j * ldv + d]; up to 128 columns (eight
// independent accumulators) per pass.
// Values come through `V` (StridedRows or PagedRows: value j at V(j)), walked one run (page)
// at a time; the values kPrefetchRows ahead are fetched, past the block where they exist.
template <typename scalar_t, typename Rows>
PK_TARGET_AVX512 void pv_rows_avx512(int64_t R, int64_t nk, int64_t Dv, const float* P, int64_t ldp, const Rows& V,
                                     float* O) {
  for (int64_t d0 = 0; d0 < Dv; d0 += 128) {
    const int64_t nd = std::min<int64_t>(128, Dv - d0);
    const int nv = static_cast<int>((nd + 15) / 16);
    __mmask16 m[8];
    for (int v = 0; v < 8; ++v) m[v] = tail_mask(nd - 16 * v);
    for (int64_t r = 0; r < R; ++r) {
      float* o = O + r * Dv + d0;
      __m512 acc[8];
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = _mm512_maskz_loadu_ps(m[v], o + 16 * v);
      const float* pr = P + r * ldp;
      RowWalk<Rows> row(V), ahead(V);  // the values read and those kPrefetchRows ahead
      if (nv == 8) {
        for (int64_t j = 0; j < nk; ++j) {
          const __m512 pj = _mm512_set1_ps(pr[j]);
          const scalar_t* vj = row.at(j) + d0;
          if (r == 0)
            if (const scalar_t* next = ahead.at_or_null(j + kPrefetchRows))
              for (int64_t off = 0; off < nd * static_cast<int64_t>(sizeof(scalar_t)); off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(next + d0) + off, _MM_HINT_T0);
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) acc[v] = _mm512_fmadd_ps(pj, load16(vj + 16 * v, 0xffff), acc[v]);
        }
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          const __m512 pj = _mm512_set1_ps(pr[j]);
          const scalar_t* vj = row.at(j) + d0;
          if (r == 0)
            if (const scalar_t* next = ahead.at_or_null(j + kPrefetchRows))
              for (int64_t off = 0; off < nd * static_cast<int64_t>(sizeof(scalar_t)); off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(next + d0) + off, _MM_HINT_T0);
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v)
            if (v < nv) acc[v] = _mm512_fmadd_ps(pj, load16(vj + 16 * v, m[v]), acc[v]);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v)
        if (v < nv) _mm512_mask_storeu_ps(o + 16 * v, m[v], acc[v]);
    }
  }
}

PK_TARGET_AVX512 inline void scale_row_avx512(float* s, int64_t n, float scale) {
  const __m512 f = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), f));
  }
}

// ---- bfloat16 tiles on AMX (tdpbf16ps) ----------------------------------------------------
// The same product as gemm_bf16 with the same operand layout, which is AMX's own: an A tile is
// 16 rows of 16 pairs (64 bytes), a B tile 16 pair rows of 16 columns, a C tile 16 x 16
// floats. Blocks of 2 x 2 C tiles (tmm0-3) take per chunk of 16 pairs two A tiles (tmm4-5)
// and two B tiles (tmm6-7). Every tile has the one configuration 16 rows x 64 bytes, so a
// thread configures once (amx_configure); the edges are small zero-padded copies (the last
// partial chunk of pairs, the last partial row tile and column tile), so no tile reads past
// an operand. Products are exact and sums float, as with vdpbf16ps; the order of the sums
// differs, so the two paths may differ in the last bits. An element's result depends only
// on its row of A and column of B (the padding adds exact zeros), not on M, N or where it
// lies in a tile.
//
// The tile macros of GCC's headers are asm statements that do not tell the compiler they
// read memory: amx_fence() before a tile load orders the stores to the operands before it.

struct alignas(64) AmxTileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void amx_fence() { asm volatile("" ::: "memory"); }

// Loads gemm_bf16_amx's tile configuration on this thread unless it holds it already. The
// configuration is per thread and other code on the thread (oneDNN's AMX kernels, which
// torch's bf16 matmuls use) may load its own or release the tiles between two calls, so
// the current one is read back (sttilecfg, a few cycles) rather than remembered.
PK_TARGET_AMX inline void amx_configure() {
  static const AmxTileConfig want = [] {
    AmxTileConfig c;
    std::memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  AmxTileConfig now;
  amx_fence();
  _tile_storeconfig(&now);
  amx_fence();
  if (std::memcmp(&now, &want, sizeof(want)) != 0) {
    amx_fence();
    _tile_loadconfig(&want);
  }
}

// One operand tile per chunk of 16 pairs: chunk c at base + c * step, rows `stride` bytes
// apart; the last partial chunk (when KP % 16) at `tail`, rows tail_stride apart.
struct AmxOperand {
  const char* base;
  int64_t stride, step;
  const char* tail;
  int64_t tail_stride;
};

// TM x TN C tiles (1 or 2 each) at c[t] (rows ldc[t] bytes apart), C tile (r, s) in tmm 2r + s.
template <int TM, int TN>
PK_TARGET_AMX inline void amx_block(int64_t nfull, bool tail, const AmxOperand* a, const AmxOperand* b,
                                    float* const* c, const int64_t* ldc, bool load) {
  if (load) {
    _tile_loadd(0, c[0], ldc[0]);
    if constexpr (TN > 1) _tile_loadd(1, c[1], ldc[1]);
    if constexpr (TM > 1) _tile_loadd(2, c[2], ldc[2]);
    if constexpr (TM > 1 && TN > 1) _tile_loadd(3, c[3], ldc[3]);
  } else {
    _tile_zero(0);
    if constexpr (TN > 1) _tile_zero(1);
    if constexpr (TM > 1) _tile_zero(2);
    if constexpr (TM > 1 && TN > 1) _tile_zero(3);
  }
  for (int64_t kc = 0; kc <= nfull; ++kc) {
    if (kc == nfull && !tail) break;
    const bool last = kc == nfull;
    _tile_loadd(4, last ? a[0].tail : a[0].base + kc * a[0].step, last ? a[0].tail_stride : a[0].stride);
    if constexpr (TM > 1) _tile_loadd(5, last ? a[1].tail : a[1].base + kc * a[1].step, last ? a[1].tail_stride : a[1].stride);
    _tile_loadd(6, last ? b[0].tail : b[0].base + kc * b[0].step, last ? b[0].tail_stride : b[0].stride);
    if constexpr (TN > 1) _tile_loadd(7, last ? b[1].tail : b[1].base + kc * b[1].step, last ? b[1].tail_stride : b[1].stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TN > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (TM > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (TM > 1 && TN > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c[0], ldc[0]);
  if constexpr (TN > 1) _tile_stored(1, c[1], ldc[1]);
  if constexpr (TM > 1) _tile_stored(2, c[2], ldc[2]);
  if constexpr (TM > 1 && TN > 1) _tile_stored(3, c[3], ldc[3]);
}

// gemm_bf16 on AMX (see above): C[m, n] (+)= sum_kp A2(m, kp) . B2(kp, n).
PK_TARGET_AMX inline void gemm_bf16_amx(int64_t M, int64_t N, int64_t KP, const uint16_t* A, int64_t lda,
                                        const uint16_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t nfull = KP / 16, kt = KP % 16, KP16 = (KP + 15) / 16 * 16;
  const int64_t Mf = M / 16 * 16, Nf = N / 16 * 16;  // rows and columns in whole tiles
  const int64_t mt = (M + 15) / 16, nt = (N + 15) / 16;
  // Zero-padded copies of the edges, kept per thread.
  thread_local std::vector<uint16_t> a_tail, a_part, b_tail, b_part;
  thread_local float c_part[4][256];
  if (kt && Mf > 0) {  // pairs [16 nfull, KP) of the rows of whole tiles, padded to 16 pairs
    a_tail.resize(Mf * 32);
    for (int64_t m = 0; m < Mf; ++m) {
      uint16_t* d = a_tail.data() + m * 32;
      std::memcpy(d, A + m * lda + 32 * nfull, 4 * kt);
      std::memset(d + 2 * kt, 0, 64 - 4 * kt);
    }
  }
  if (M > Mf) {  // the last rows (fewer than 16): every pair, padded to KP16 pairs and 16 rows
    a_part.assign(16 * 2 * KP16, 0);
    for (int64_t m = Mf; m < M; ++m) std::memcpy(a_part.data() + (m - Mf) * 2 * KP16, A + m * lda, 4 * KP);
  }
  if (kt && Nf > 0) {  // pair rows [16 nfull, KP) of the whole column tiles, padded to 16 rows
    b_tail.assign(16 * 2 * Nf, 0);
    for (int64_t r = 0; r < kt; ++r) std::memcpy(b_tail.data() + r * 2 * Nf, B + (16 * nfull + r) * ldb, 4 * Nf);
  }
  if (N > Nf) {  // the last columns (fewer than 16) of every pair row, padded to 16 columns and KP16 rows
    b_part.assign(KP16 * 32, 0);
    for (int64_t r = 0; r < KP; ++r) std::memcpy(b_part.data() + r * 32, B + r * ldb + 2 * Nf, 4 * (N - Nf));
  }
  const auto a_op = [&](int64_t i) -> AmxOperand {
    if (16 * i < Mf) {
      const char* base = reinterpret_cast<const char*>(A + 16 * i * lda);
      return {base, 2 * lda, 64, reinterpret_cast<const char*>(a_tail.data() + 16 * i * 32), 64};
    }
    const char* base = reinterpret_cast<const char*>(a_part.data());
    return {base, 4 * KP16, 64, base + 64 * nfull, 4 * KP16};
  };
  const auto b_op = [&](int64_t j) -> AmxOperand {
    if (16 * j < Nf) {
      const char* base = reinterpret_cast<const char*>(B + 32 * j);
      return {base, 2 * ldb, 32 * ldb, reinterpret_cast<const char*>(b_tail.data() + 32 * j), 4 * Nf};
    }
    const char* base = reinterpret_cast<const char*>(b_part.data());
    return {base, 64, 1024, base + 1024 * nfull, 64};
  };
  amx_configure();
  for (int64_t i = 0; i < mt; i += 2) {
    const int tm = mt - i >= 2 ? 2 : 1;
    const AmxOperand a[2] = {a_op(i), a_op(i + tm - 1)};
    for (int64_t j = 0; j < nt; j += 2) {
      const int tn = nt - j >= 2 ? 2 : 1;
      const AmxOperand b[2] = {b_op(j), b_op(j + tn - 1)};
      float* c[4];
      int64_t ldcb[4];
      bool part[4];
      for (int r = 0; r < tm; ++r)
        for (int s = 0; s < tn; ++s) {
          const int t = 2 * r + s;
          const int64_t m0 = 16 * (i + r), n0 = 16 * (j + s);
          part[t] = m0 + 16 > M || n0 + 16 > N;
          if (!part[t]) {
            c[t] = C + m0 * ldc + n0;
            ldcb[t] = 4 * ldc;
            continue;
          }
          c[t] = c_part[t];
          ldcb[t] = 64;
          if (accumulate) {
            const int64_t rows = std::min<int64_t>(16, M - m0), cols = std::min<int64_t>(16, N - n0);
            std::memset(c_part[t], 0, sizeof(c_part[t]));
            for (int64_t m = 0; m < rows; ++m) std::memcpy(c_part[t] + 16 * m, C + (m0 + m) * ldc + n0, 4 * cols);
          }
        }
      amx_fence();
      if (tm == 2 && tn == 2) amx_block<2, 2>(nfull, kt > 0, a, b, c, ldcb, accumulate);
      else if (tm == 2) amx_block<2, 1>(nfull, kt > 0, a, b, c, ldcb, accumulate);
      else if (tn == 2) amx_block<1, 2>(nfull, kt > 0, a, b, c, ldcb, accumulate);
      else amx_block<1, 1>(nfull, kt > 0, a, b, c, ldcb, accumulate);
      for (int r = 0; r < tm; ++r)
        for (int s = 0; s < tn; ++s) {
          const int t = 2 * r + s;
          if (!part[t]) continue;
          const int64_t m0 = 16 * (i + r), n0 = 16 * (j + s);
          const int64_t rows = std::min<int64_t>(16, M - m0), cols = std::min<int64_t>(16, N - n0);
          for (int64_t m = 0; m < rows; ++m) std::memcpy(C + (m0 + m) * ldc + n0, c_part[t] + 16 * m, 4 * cols);
        }
    }
  }
}

// ---- bfloat16 tiles with the AVX512-BF16 dot product (vdpbf16ps) ------------------------
// C[m, n] (+)= sum_kp A2(m, kp) . B2(kp, n): A holds bf16 pairs along k (row stride lda in
// bf16 elements), B holds for each pair index kp a row of N pairs (row stride ldb in bf16
// elements), the VNNI layout. Odd K is padded with zeros by the packer.

template <int MR, int NV>
PK_TARGET_AVX512BF16 inline void gemm_bf16_micro(int64_t KP, const uint16_t* A, int64_t lda, const uint16_t* B,
                                                 int64_t ldb, float* C, int64_t ldc, __mmask16 last, bool accumulate) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, C + r * ldc + 16 * v)
                           : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512i b[NV];
    const uint16_t* bk = B + kp * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_epi32(v == NV - 1 ? last : 0xffff, bk + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * kp, sizeof(pair));
      const __m512i a = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, v == NV - 1 ? last : 0xffff, c[r][v]);
}

template <int NV>
PK_TARGET_AVX512BF16 inline void gemm_bf16_rows(int64_t M, int64_t KP, const uint16_t* A, int64_t lda, const uint16_t* B,
                                                int64_t ldb, float* C, int64_t ldc, __mmask16 last, bool accumulate) {
  constexpr int MR = NV >= 4 ? 6 : (NV == 3 ? 8 : (NV == 2 ? 12 : 16));
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_bf16_micro<MR, NV>(KP, A + m * lda, lda, B, ldb, C + m * ldc, ldc, last, accumulate);
  for (; m < M;) {
    const int64_t take = std::min<int64_t>(M - m, 4);
    switch (take) {
      case 4: gemm_bf16_micro<4, NV>(KP, A + m * lda, lda, B, ldb, C + m * ldc, ldc, last, accumulate); break;
      case 3: gemm_bf16_micro<3, NV>(KP, A + m * lda, lda, B, ldb, C + m * ldc, ldc, last, accumulate); break;
      case 2: gemm_bf16_micro<2, NV>(KP, A + m * lda, lda, B, ldb, C + m * ldc, ldc, last, accumulate); break;
      default: gemm_bf16_micro<1, NV>(KP, A + m * lda, lda, B, ldb, C + m * ldc, ldc, last, accumulate); break;
    }
    m += take;
  }
}

PK_TARGET_AVX512BF16 inline void gemm_bf16(int64_t M, int64_t N, int64_t KP, const uint16_t* A, int64_t lda,
                                           const uint16_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (isa_amx()) {
    gemm_bf16_amx(M, N, KP, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nn = std::min<int64_t>(64, N - n0);
    const int nv = static_cast<int>((nn + 15) / 16);
    const __mmask16 last = tail_mask(nn - 16 * (nv - 1));
    const uint16_t* b = B + 2 * n0;
    switch (nv) {
      case 4: gemm_bf16_rows<4>(M, KP, A, lda, b, ldb, C + n0, ldc, last, accumulate); break;
      case 3: gemm_bf16_rows<3>(M, KP, A, lda, b, ldb, C + n0, ldc, last, accumulate); break;
      case 2: gemm_bf16_rows<2>(M, KP, A, lda, b, ldb, C + n0, ldc, last, accumulate); break;
      default: gemm_bf16_rows<1>(M, KP, A, lda, b, ldb, C + n0, ldc, last, accumulate); break;
    }
  }
}

// dst[0, n) = bf16(src[0, n)) (round to nearest even), zero up to n_pad.
PK_TARGET_AVX512BF16 inline void to_bf16_row(uint16_t* dst, const float* src, int64_t n, int64_t n_pad) {
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j));
    _mm256_mask_storeu_epi16(dst + j, m, (__m256i)h);
  }
  for (j = n; j < n_pad; ++j) dst[j] = 0;
}

// One row of the bf16 forward's online softmax, fused: P = exp(scale * s - mnew) on unscaled
// scores s[0, n), rounded to bf16 into pb (zeros up to n_pad); returns the float sum of P. The
// same operations, in the same order, as scale_row_avx512, exp_sum_avx512 and to_bf16_row in
// turn, so the same bits, in one pass and without writing the float row back.
PK_TARGET_AVX512BF16 inline float exp_row_bf16(const float* s, int64_t n, int64_t n_pad, float scale, float mnew,
                                               uint16_t* pb) {
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(mnew);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, s + j), vs);
    const __m512 e = _mm512_maskz_mov_ps(t, exp512(_mm512_sub_ps(x, vm)));
    acc = _mm512_add_ps(acc, e);
    _mm256_mask_storeu_epi16(pb + j, t, (__m256i)_mm512_cvtneps_pbh(e));
  }
  for (int64_t j = n; j < n_pad; ++j) pb[j] = 0;
  return _mm512_reduce_add_ps(acc);
}

// The backward's P for a pair of query rows, fused: p_r = exp(scale * s_r - L_r) (s_r
// unscaled, a row of zeros where L_r = -inf), written back as float and, rounded to bf16,
// interleaved into pv (pv[2 j + r] = bf16(p_r[j])). s1 may be null (an odd last row: a zero
// row in pv). The same bits as scale_row_avx512, exp_sum_avx512 and to_bf16_row_pairs.
PK_TARGET_AVX512BF16 inline void exp_rows_bf16_pair(float* s0, float* s1, int64_t n, float scale, float L0, float L1,
                                                    uint16_t* pv) {
  const __m512 vs = _mm512_set1_ps(scale), v0 = _mm512_set1_ps(L0), v1 = _mm512_set1_ps(L1);
  const bool live0 = L0 != -std::numeric_limits<float>::infinity();
  const bool live1 = s1 != nullptr && L1 != -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
    if (live0) e0 = _mm512_maskz_mov_ps(t, exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, s0 + j), vs), v0)));
    if (live1) e1 = _mm512_maskz_mov_ps(t, exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, s1 + j), vs), v1)));
    _mm512_mask_storeu_ps(s0 + j, t, e0);
    if (s1 != nullptr) _mm512_mask_storeu_ps(s1 + j, t, e1);
    _mm512_mask_storeu_epi32(pv + 2 * j, t, pair_words((__m256i)_mm512_cvtneps_pbh(e0), (__m256i)_mm512_cvtneps_pbh(e1)));
  }
}

// The backward's dS for a pair of query rows, fused: ds_r = p_r (dp_r - di_r) rounded to bf16,
// as rows (dsb_r, zero-padded to n_pad) and interleaved (dsv[2 j + r]). dp1, p1 and dsb1 may be
// null (an odd last row: a zero row in dsv). The same bits as ds_row_avx512, then
// to_bf16_row_pairs and to_bf16_row.
PK_TARGET_AVX512BF16 inline void ds_rows_bf16_pair(const float* dp0, const float* dp1, const float* p0, const float* p1,
                                                   int64_t n, int64_t n_pad, float di0, float di1, uint16_t* dsb0,
                                                   uint16_t* dsb1, uint16_t* dsv) {
  const __m512 v0 = _mm512_set1_ps(di0), v1 = _mm512_set1_ps(di1);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    const __m512 d0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, p0 + j), _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp0 + j), v0));
    const __m256i b0 = (__m256i)_mm512_cvtneps_pbh(d0);
    __m256i b1 = _mm256_setzero_si256();
    if (dp1 != nullptr) {
      const __m512 d1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, p1 + j), _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dp1 + j), v1));
      b1 = (__m256i)_mm512_cvtneps_pbh(d1);
      _mm256_mask_storeu_epi16(dsb1 + j, t, b1);
    }
    _mm256_mask_storeu_epi16(dsb0 + j, t, b0);
    _mm512_mask_storeu_epi32(dsv + 2 * j, t, pair_words(b0, b1));
  }
  for (int64_t j = n; j < n_pad; ++j) {
    dsb0[j] = 0;
    if (dsb1 != nullptr) dsb1[j] = 0;
  }
}

// Rows r < R of src (row stride lds, n floats each) rounded to bf16 and interleaved in pairs of
// rows, the B layout of gemm_bf16 with the pair index along the rows:
// dst[(r / 2) * ldd + 2 * j + r % 2] = bf16(src[r * lds + j]); an odd R gets a zero row.
PK_TARGET_AVX512BF16 inline void to_bf16_row_pairs(uint16_t* dst, int64_t ldd, const float* src, int64_t lds,
                                                   int64_t R, int64_t n) {
  for (int64_t r = 0; r < R; r += 2) {
    const float* s0 = src + r * lds;
    const float* s1 = r + 1 < R ? s0 + lds : nullptr;
    uint16_t* d = dst + (r / 2) * ldd;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s0 + j));
      const __m256i hi = s1 ? (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s1 + j)) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(d + 2 * j, m, pair_words(lo, hi));
    }
  }
}

// In-register transpose of 16 rows of 16 32-bit lanes: r[c] lane i = old r[i] lane c.
PK_TARGET_AVX512 inline void transpose16x16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // lane L of 128 bits: rows i, i+1 interleaved, columns 4L.. 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + k] lane L: column 4L + k of rows i.. i+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // gather lane L of the four row groups into column 4L + k
    const __m512i a = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), b = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xdd);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88), d = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xdd);
    t[k] = _mm512_shuffle_i32x4(a, c, 0x88);
    t[8 + k] = _mm512_shuffle_i32x4(a, c, 0xdd);
    t[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(b, d, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Rows j < n of src (row stride rs, `cols` 16-bit values each) as pairs along the columns,
// one pair per 32-bit word: dst[(c / 2) * 2 * ld + 2 * j + c % 2] = src[j * rs + c], an odd
// `cols` paired with a zero. The keys' B layout of gemm_bf16 for Q K^T: a 32-bit transpose,
// 16 keys x 16 pairs at a time. Words for j >= n are not written.
PK_TARGET_AVX512 inline void pack_pairs_avx512(uint16_t* dst, int64_t ld, const uint16_t* src, int64_t rs, int64_t n,
                                               int64_t cols) {
  int32_t* d32 = reinterpret_cast<int32_t*>(dst);
  const int64_t npairs = (cols + 1) / 2;
  __m512i r[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    const __mmask16 store = tail_mask(nj);
    for (int64_t c0 = 0; c0 < cols; c0 += 32) {
      const int64_t nc = std::min<int64_t>(32, cols - c0);
      const __mmask32 load = nc >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << nc) - 1u);
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < nj ? _mm512_maskz_loadu_epi16(load, src + (j0 + i) * rs + c0) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t np = std::min<int64_t>(16, npairs - c0 / 2);
      for (int64_t c = 0; c < np; ++c) _mm512_mask_storeu_epi32(d32 + (c0 / 2 + c) * ld + j0, store, r[c]);
    }
  }
}

// Two rows of n 16-bit values interleaved: dst[2 c] = r0[c], dst[2 c + 1] = r1[c], or 0 when
// r1 is null. A pair of keys (values) in the pair-of-rows B layout of gemm_bf16.
PK_TARGET_AVX512 inline void interleave_rows(uint16_t* dst, const uint16_t* r0, const uint16_t* r1, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = tail_mask(n - c);
    const __m256i hi = r1 ? _mm256_maskz_loadu_epi16(m, r1 + c) : _mm256_setzero_si256();
    _mm512_mask_storeu_epi32(dst + 2 * c, m, pair_words(_mm256_maskz_loadu_epi16(m, r0 + c), hi));
  }
}

// The transpose of rows i < n of src (row stride rs, `cols` bf16 each) in pairs of rows, the A
// layout of gemm_bf16 with the pair index along the rows of src:
// dst[c * ld + i] = src[i * rs + c]; an odd n gets a zero at dst[c * ld + n].
template <typename scalar_t>
PK_TARGET_AVX512 inline void transpose_pairs(uint16_t* dst, int64_t ld, const scalar_t* src, int64_t rs, int64_t n,
                                             int64_t cols) {
  static_assert(sizeof(scalar_t) == 2, "16-bit elements");
  // 32 rows (16 pairs) x 16 columns at a time: pair k of rows interleaved into 32-bit lanes
  // (lane c: rows 2k, 2k + 1 of column c), then a 32-bit transpose (lane k of word row c).
  int32_t* d32 = reinterpret_cast<int32_t*>(dst);
  const int64_t npairs = (n + 1) / 2;
  __m512i r[16];
  for (int64_t k0 = 0; k0 < npairs; k0 += 16) {
    const int64_t nk = std::min<int64_t>(16, npairs - k0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 m = tail_mask(cols - c0);
      for (int64_t k = 0; k < 16; ++k) {
        const int64_t i = 2 * (k0 + k);
        if (k >= nk) {
          r[k] = _mm512_setzero_si512();
          continue;
        }
        const uint16_t* r0 = reinterpret_cast<const uint16_t*>(src + i * rs) + c0;
        const __m256i hi = i + 1 < n ? _mm256_maskz_loadu_epi16(m, r0 + rs) : _mm256_setzero_si256();
        r[k] = pair_words(_mm256_maskz_loadu_epi16(m, r0), hi);
      }
      transpose16x16_epi32(r);
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      for (int64_t c = 0; c < nc; ++c) _mm512_mask_storeu_epi32(d32 + (c0 + c) * (ld / 2) + k0, tail_mask(nk), r[c]);
    }
  }
}

// dst[j * rs + d] = bf16(src[d * lds + j] * mul) for j < n, d < cols: a transposed float tile
// ([dim][key]) stored as bfloat16 rows, 16 x 16 at a time, rounded as c10::BFloat16.
PK_TARGET_AVX512 inline void store_transposed_bf16(c10::BFloat16* dst, int64_t rs, const float* src, int64_t lds,
                                                   int64_t n, int64_t cols, float mul) {
  const __m512 vm = _mm512_set1_ps(mul);
  __m512i r[16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    const __mmask16 mj = tail_mask(nj);
    for (int64_t d0 = 0; d0 < cols; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, cols - d0);
      for (int64_t d = 0; d < 16; ++d)
        r[d] = d < nd ? _mm512_castps_si512(_mm512_maskz_loadu_ps(mj, src + (d0 + d) * lds + j0)) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int64_t j = 0; j < nj; ++j) {
        const __m512i b = ::pk::cpu::bf16_bits_avx512(_mm512_mul_ps(_mm512_castsi512_ps(r[j]), vm));
        _mm256_mask_storeu_epi16(dst + (j0 + j) * rs + d0, tail_mask(nd), _mm512_cvtepi32_epi16(b));
      }
    }
  }
}

// ds[j] = p[j] * (ds[j] - di), j < n: dS from dP in place.
PK_TARGET_AVX512 inline void ds_row_avx512(float* ds, const float* p, int64_t n, float di) {
  const __m512 vd = _mm512_set1_ps(di);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(t, ds + j);
    _mm512_mask_storeu_ps(ds + j, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, p + j), _mm512_sub_ps(x, vd)));
  }
}
#endif  // PK_X86

// ---------------------------------------------------------------------------------------
// Dispatch.

template <typename acc_t>
inline void gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t a_rs, int64_t a_ks, const acc_t* B,
                 int64_t ldb, acc_t* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_avx512()) {
      if (K <= 0) {
        if (!accumulate)
          for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
        return;
      }
      gemm_avx512(M, N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
      return;
    }
  }
#endif
  gemm_ref(M, N, K, A, a_rs, a_ks, B, ldb, C, ldc, accumulate);
}

template <typename acc_t>
inline acc_t row_max(const acc_t* s, int64_t n) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_avx512()) return row_max_avx512(s, n);
  }
#endif
  return row_max_ref(s, n);
}

template <typename acc_t>
inline acc_t exp_sum(acc_t* s, int64_t n, acc_t sub) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_avx512()) return exp_sum_avx512(s, n, sub);
  }
#endif
  return exp_sum_ref(s, n, sub);
}

// s[j] *= f, j < n.
template <typename acc_t>
inline void scale_row(acc_t* s, int64_t n, acc_t f) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_avx512()) return scale_row_avx512(s, n, f);
  }
#endif
  for (int64_t j = 0; j < n; ++j) s[j] *= f;
}

// s[j] = -inf for j < lo and j >= hi (j < n): the keys of a row outside its window.
template <typename acc_t>
inline void mask_outside(acc_t* s, int64_t n, int64_t lo, int64_t hi) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_avx512() && n < (int64_t(1) << 30)) return mask_outside_avx512(s, n, lo, hi);
  }
#endif
  for (int64_t j = 0; j < n; ++j)
    if (j < lo || j >= hi) s[j] = -std::numeric_limits<acc_t>::infinity();
}

// dS = P (dP - Di) on a row, in place: ds[j] = p[j] * (ds[j] - di).
template <typename acc_t>
inline void ds_row(acc_t* ds, const acc_t* p, int64_t n, acc_t di) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_avx512()) return ds_row_avx512(ds, p, n, di);
  }
#endif
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - di);
}

// Element conversions between storage and accumulation types.
#if PK_X86
template <typename scalar_t>
PK_TARGET_AVX512 inline void load_row_avx512(float* dst, const scalar_t* src, int64_t n, float mul) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 t = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, t, _mm512_mul_ps(load16(src + i, t), vm));
  }
}

// load_transposed for float accumulation: 16 rows x 16 columns at a time, an in-register
// transpose of the converted values.
template <typename scalar_t>
PK_TARGET_AVX512 inline void load_transposed_avx512(float* dst, int64_t ld, const scalar_t* src, int64_t rs,
                                                    int64_t rows, int64_t cols) {
  __m512i r[16];
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, rows - j0);
    for (int64_t d0 = 0; d0 < cols; d0 += 16) {
      const __mmask16 m = tail_mask(cols - d0);
      for (int64_t j = 0; j < 16; ++j)
        r[j] = j < nj ? _mm512_castps_si512(load16(src + (j0 + j) * rs + d0, m)) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t nd = std::min<int64_t>(16, cols - d0);
      for (int64_t d = 0; d < nd; ++d)
        _mm512_mask_storeu_ps(dst + (d0 + d) * ld + j0, tail_mask(nj), _mm512_castsi512_ps(r[d]));
    }
  }
}
#endif

template <typename acc_t, typename scalar_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t n, acc_t mul = acc_t(1)) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
    if (isa_avx512()) {
      load_row_avx512(dst, src, n, mul);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * mul;
}

#if PK_X86
// store_row for float to bfloat16 / half, 16 at a time, rounded as c10's conversions round.
template <typename scalar_t>
PK_TARGET_AVX512 inline void store_row_avx512(scalar_t* dst, const float* src, int64_t n, float mul) {
  static_assert(sizeof(scalar_t) == 2, "bfloat16 or half");
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 t = tail_mask(n - i);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, src + i), vm);
    __m256i h;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      h = _mm512_cvtepi32_epi16(::pk::cpu::bf16_bits_avx512(x));
    else
      h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(dst + i, t, h);
  }
}

// sum over d < n of a[d] * b[d] in double (each product exact), eight lanes at a time.
template <typename scalar_t>
PK_TARGET_AVX512 inline double dot_f64_avx512(const scalar_t* a, const scalar_t* b, int64_t n) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 t = tail_mask(n - d);
    const __m512 x = load16(a + d, t), y = load16(b + d, t);
    acc0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), _mm512_cvtps_pd(_mm512_castps512_ps256(y)), acc0);
    acc1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))),
                           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1))), acc1);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}
#endif

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, const acc_t* src, int64_t n, acc_t mul = acc_t(1)) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2) {
    if (isa_avx512()) {
      store_row_avx512(dst, src, n, mul);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * mul);
}

// sum over d < n of a[d] * b[d], in double.
template <typename scalar_t>
inline double dot_f64(const scalar_t* a, const scalar_t* b, int64_t n) {
#if PK_X86
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (isa_avx512()) return dot_f64_avx512(a, b, n);
  }
#endif
  double s = 0;
  for (int64_t d = 0; d < n; ++d) s += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return s;
}

// dst[d * ld + j] = src_j[d] for rows j of src (row stride rs): a transposed tile.
template <typename acc_t, typename scalar_t>
inline void load_transposed(acc_t* dst, int64_t ld, const scalar_t* src, int64_t rs, int64_t rows, int64_t cols) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
    if (isa_avx512()) {
      load_transposed_avx512(dst, ld, src, rs, rows, cols);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < rows; ++j) {
    const scalar_t* s = src + j * rs;
    for (int64_t d = 0; d < cols; ++d) dst[d * ld + j] = static_cast<acc_t>(s[d]);
  }
}

}  // namespace cpu
}  // namespace attention
}  // namespace pk
