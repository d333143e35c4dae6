// Philox4x32-10 (csrc/common/philox.h) sixteen blocks at a time with AVX-512: one block per
// 32-bit lane, the 32x32->64-bit products from vpmuludq on even and odd lanes. The CPU kernels
// that draw many independent blocks (attention dropout, the masking ops) share it; every lane
// gives the same bits as philox4x32_10 with that lane's counter.
#pragma once
#include <cstdint>

#include "cpu_isa.h"

namespace pk {
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

// The ten rounds on sixteen blocks in place: (a, b, c, d) hold the counters (c0, c1, c2, c3) of
// each lane on entry and words 0..3 of its block on return.
PK_TARGET_AVX512 inline void philox16_rounds(__m512i& a, __m512i& b, __m512i& c, __m512i& d, uint64_t seed) {
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
}

// Word 0 of sixteen blocks, counters (a, b, offset, d) per lane.
PK_TARGET_AVX512 inline __m512i philox16_word0(__m512i a, __m512i b, uint32_t offset, __m512i d, uint64_t seed) {
  __m512i c = _mm512_set1_epi32(static_cast<int>(offset));
  philox16_rounds(a, b, c, d, seed);
  return a;
}

// Sixteen blocks, counters (a, b, offset, d) per lane: out[4 * t + w] = word w of lane t.
PK_TARGET_AVX512 inline void philox16_avx512(__m512i a, __m512i b, uint32_t offset, __m512i d, uint64_t seed,
                                             uint32_t* out) {
  __m512i c = _mm512_set1_epi32(static_cast<int>(offset));
  philox16_rounds(a, b, c, d, seed);
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
#endif

}  // namespace cpu
}  // namespace pk
