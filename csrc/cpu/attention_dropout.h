// CPU side of attention dropout (semantics: csrc/common/attention_dropout.h): the 16-bit values of
// a run of keys of one row, 8 keys per Philox block. With AVX-512 (cpu_isa.h) sixteen Philox
// blocks run at once, one per 32-bit lane (the 32x32->64-bit products from vpmuludq on even and
// odd lanes, the low halves from vpmulld); elsewhere the scalar philox_draw of
// csrc/common/philox.h. Both give the same bits as dropout_bits(), the reference of every
// backend.
#pragma once
#include <cstdint>
#include <vector>

#include "../common/attention_dropout.h"
#include "cpu_isa.h"

namespace pk {
namespace attention {
namespace cpu {

#if PK_X86
// High and low 32 bits of x * m per 32-bit lane (m broadcast): two vpmuludq (even lanes, odd
// lanes shifted down) and blends, no vpmulld.
PK_TARGET_AVX512 inline void mulhilo16(__m512i x, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Sixteen Philox blocks, one per lane, counters (a, b, offset, d) per lane: out[4 * t + w] = word
// w of lane t. Read as uint16, lane t's block gives the 16-bit values of 8 consecutive keys.
PK_TARGET_AVX512 inline void philox16_avx512(__m512i a, __m512i b, uint32_t offset, __m512i d, uint64_t seed,
                                             uint32_t* out) {
  __m512i c = _mm512_set1_epi32(static_cast<int>(offset));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i M0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i M1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(a, M0, &hi0, &lo0);
    mulhilo16(c, M1, &hi1, &lo1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, b), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, d), _mm512_set1_epi32(static_cast<int>(k1)));
    a = n0;
    b = lo1;
    c = n2;
    d = lo0;
  }
  // 4 x 16 words -> 16 x 4: per 128-bit lane L, t_k holds (a, b, c, d) of lane 4L + k.
  const __m512i ab_lo = _mm512_unpacklo_epi32(a, b), ab_hi = _mm512_unpackhi_epi32(a, b);
  const __m512i cd_lo = _mm512_unpacklo_epi32(c, d), cd_hi = _mm512_unpackhi_epi32(c, d);
  const __m512i t0 = _mm512_unpacklo_epi64(ab_lo, cd_lo), t1 = _mm512_unpackhi_epi64(ab_lo, cd_lo);
  const __m512i t2 = _mm512_unpacklo_epi64(ab_hi, cd_hi), t3 = _mm512_unpackhi_epi64(ab_hi, cd_hi);
  const __m512i x02 = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));  // lanes 0, 8, 1, 9
  const __m512i y02 = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0));  // lanes 2, 10, 3, 11
  const __m512i x13 = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));  // lanes 4, 12, 5, 13
  const __m512i y13 = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1));  // lanes 6, 14, 7, 15
  _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(x02, y02, _MM_SHUFFLE(2, 0, 2, 0)));   // 0..3
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(x13, y13, _MM_SHUFFLE(2, 0, 2, 0)));  // 4..7
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(x02, y02, _MM_SHUFFLE(3, 1, 3, 1)));  // 8..11
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(x13, y13, _MM_SHUFFLE(3, 1, 3, 1)));  // 12..15
}

// Draws d0 .. d0 + 15 of one row: the 16-bit values of keys 8 * d0 .. 8 * d0 + 127 in order.
PK_TARGET_AVX512 inline void dropout_words16_avx512(uint64_t seed, uint64_t index, uint32_t offset, uint32_t d0,
                                                    uint32_t* out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  philox16_avx512(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index))),
                  _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index >> 32))), offset,
                  _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(d0)), lane), seed, out);
}

// Draws d0 .. d0 + 7 of two rows at once (lanes 0-7: row index0, lanes 8-15: row index1): the
// values of keys 8 * d0 .. 8 * d0 + 63 of row index0 in out[0, 32), of row index1 in out[32, 64).
PK_TARGET_AVX512 inline void dropout_words2x8_avx512(uint64_t seed, uint64_t index0, uint64_t index1, uint32_t offset,
                                                     uint32_t d0, uint32_t* out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i a = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index0))),
                                            _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index1))));
  const __m512i b = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index0 >> 32))),
                                            _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index1 >> 32))));
  philox16_avx512(a, b, offset, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(d0)), lane), seed, out);
}
#endif

// The 16-bit values of keys j0 .. j0 + n of row `index`; returns a pointer to the value of key
// j0 inside `buf` (resized as needed).
inline const uint16_t* dropout_row_bits(const Dropout& dr, uint64_t index, int64_t j0, int64_t n,
                                        std::vector<uint32_t>& buf) {
  const int64_t d0 = j0 >> 3, d1 = (j0 + n + 7) >> 3;  // draws [d0, d1)
  const int64_t nd = d1 - d0;
#if PK_X86
  if (pk::cpu::has_isa(pk::cpu::Isa::kAvx512)) {
    const int64_t nd16 = (nd + 15) / 16 * 16;
    if (static_cast<int64_t>(buf.size()) < nd16 * 4) buf.resize(nd16 * 4);
    for (int64_t t = 0; t < nd; t += 16)
      dropout_words16_avx512(dr.seed, index, dr.offset, static_cast<uint32_t>(d0 + t), buf.data() + 4 * t);
    return reinterpret_cast<const uint16_t*>(buf.data()) + (j0 & 7);
  }
#endif
  if (static_cast<int64_t>(buf.size()) < nd * 4) buf.resize(nd * 4);
  for (int64_t t = 0; t < nd; ++t) {
    const Philox4x32 w = philox_draw(dr.seed, index, dr.offset, static_cast<uint32_t>(d0 + t));
    for (int x = 0; x < 4; ++x) buf[4 * t + x] = w.v[x];
  }
  return reinterpret_cast<const uint16_t*>(buf.data()) + (j0 & 7);
}

// Forward: P[j] of dropped keys j0 .. j0 + n of row `index` set to 0 (the kept ones are scaled by
// rscale once, on the output).
template <typename acc_t>
void dropout_zero_row(const Dropout& dr, uint64_t index, int64_t j0, int64_t n, acc_t* s, std::vector<uint32_t>& buf) {
  const uint16_t* u = dropout_row_bits(dr, index, j0, n, buf);
  const uint32_t t = dr.threshold;
  for (int64_t j = 0; j < n; ++j) s[j] = u[j] >= t ? s[j] : acc_t(0);
}

// Backward: mult[j] = rscale for kept keys, 0 for dropped ones.
template <typename acc_t>
void dropout_mult_row(const Dropout& dr, uint64_t index, int64_t j0, int64_t n, acc_t* mult,
                      std::vector<uint32_t>& buf) {
  const uint16_t* u = dropout_row_bits(dr, index, j0, n, buf);
  const uint32_t t = dr.threshold;
  const acc_t rs = static_cast<acc_t>(dropout_rscale(t));
  for (int64_t j = 0; j < n; ++j) mult[j] = u[j] >= t ? rs : acc_t(0);
}

// Backward, two rows at once where the keys fit one Philox call (j0 % 8 + n <= 64, AVX-512):
// mult0 / mult1 for rows index0 / index1 as dropout_mult_row; otherwise one row at a time.
template <typename acc_t>
void dropout_mult_rows2(const Dropout& dr, uint64_t index0, uint64_t index1, int64_t j0, int64_t n, acc_t* mult0,
                        acc_t* mult1, std::vector<uint32_t>& buf) {
#if PK_X86
  if ((j0 & 7) + n <= 64 && pk::cpu::has_isa(pk::cpu::Isa::kAvx512)) {
    if (buf.size() < 64) buf.resize(64);
    dropout_words2x8_avx512(dr.seed, index0, index1, dr.offset, static_cast<uint32_t>(j0 >> 3), buf.data());
    const uint16_t* u0 = reinterpret_cast<const uint16_t*>(buf.data()) + (j0 & 7);
    const uint16_t* u1 = u0 + 64;
    const uint32_t t = dr.threshold;
    const acc_t rs = static_cast<acc_t>(dropout_rscale(t));
    for (int64_t j = 0; j < n; ++j) mult0[j] = u0[j] >= t ? rs : acc_t(0);
    for (int64_t j = 0; j < n; ++j) mult1[j] = u1[j] >= t ? rs : acc_t(0);
    return;
  }
#endif
  dropout_mult_row(dr, index0, j0, n, mult0, buf);
  dropout_mult_row(dr, index1, j0, n, mult1, buf);
}

}  // namespace cpu
}  // namespace attention
}  // namespace pk
