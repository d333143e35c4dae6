// CPU side of attention dropout (semantics: csrc/common/attention_dropout.h): the 16-bit values of
// a run of keys of one row, 8 keys per Philox block. With AVX-512 (cpu_isa.h) sixteen Philox
// blocks run at once, one per 32-bit lane (philox_avx512.h); elsewhere the scalar philox_draw of
// csrc/common/philox.h. Both give the same bits as dropout_bits(), the reference of every
// backend.
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/attention_dropout.h"
#include "cpu_isa.h"
#include "philox_avx512.h"

namespace pk {
namespace attention {
namespace cpu {

#if PK_X86
using pk::cpu::philox16_avx512;

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

#if PK_X86
// s[j] = u[j] >= t ? s[j] : 0 (sel = nullptr) or u[j] >= t ? *sel : 0, 16 keys per mask compare.
PK_TARGET_AVX512 inline void dropout_select_avx512(const uint16_t* u, uint32_t t, int64_t n, float* s,
                                                   const float* sel) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, u + j));
    const __mmask16 keep = _mm512_mask_cmpge_epu32_mask(m, v, vt);
    const __m512 x = sel != nullptr ? _mm512_set1_ps(*sel) : _mm512_maskz_loadu_ps(m, s + j);
    _mm512_mask_storeu_ps(s + j, m, _mm512_maskz_mov_ps(keep, x));
  }
}
#endif

// Forward: P[j] of dropped keys j0 .. j0 + n of row `index` set to 0 (the kept ones are scaled by
// rscale once, on the output).
template <typename acc_t>
void dropout_zero_row(const Dropout& dr, uint64_t index, int64_t j0, int64_t n, acc_t* s, std::vector<uint32_t>& buf) {
  const uint16_t* u = dropout_row_bits(dr, index, j0, n, buf);
  const uint32_t t = dr.threshold;
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (pk::cpu::has_isa(pk::cpu::Isa::kAvx512)) return dropout_select_avx512(u, t, n, s, nullptr);
  }
#endif
  for (int64_t j = 0; j < n; ++j) s[j] = u[j] >= t ? s[j] : acc_t(0);
}

// mult[j] = rscale for kept keys, 0 for dropped ones, from their 16-bit values u.
template <typename acc_t>
void dropout_mult_from_bits(const uint16_t* u, uint32_t t, int64_t n, acc_t* mult) {
  const acc_t rs = static_cast<acc_t>(dropout_rscale(t));
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (pk::cpu::has_isa(pk::cpu::Isa::kAvx512)) return dropout_select_avx512(u, t, n, mult, &rs);
  }
#endif
  for (int64_t j = 0; j < n; ++j) mult[j] = u[j] >= t ? rs : acc_t(0);
}

// Backward: mult[j] = rscale for kept keys, 0 for dropped ones.
template <typename acc_t>
void dropout_mult_row(const Dropout& dr, uint64_t index, int64_t j0, int64_t n, acc_t* mult,
                      std::vector<uint32_t>& buf) {
  dropout_mult_from_bits(dropout_row_bits(dr, index, j0, n, buf), dr.threshold, n, mult);
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
    dropout_mult_from_bits(u0, dr.threshold, n, mult0);
    dropout_mult_from_bits(u0 + 64, dr.threshold, n, mult1);
    return;
  }
#endif
  dropout_mult_row(dr, index0, j0, n, mult0, buf);
  dropout_mult_row(dr, index1, j0, n, mult1, buf);
}

}  // namespace cpu
}  // namespace attention
}  // namespace pk
