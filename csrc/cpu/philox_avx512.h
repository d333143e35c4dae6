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
// The keys of the ten rounds of a seed, broadcast: a kernel that draws many blocks with one seed
// computes them once (in the rounds they are memory operands of vpternlogd).
struct Philox16Keys {
  __m512i k0[10], k1[10];
};

PK_TARGET_AVX512 inline void philox16_keys(uint64_t seed, Philox16Keys* keys) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    keys->k0[r] = _mm512_set1_epi32(static_cast<int>(k0));
    keys->k1[r] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The ten rounds on sixteen blocks in place: (a, b, c, d) hold the counters (c0, c1, c2, c3) of
// each lane on entry and words 0..3 of its block on return.
//
// Inside, the even and the odd lanes run as two sets of eight blocks, one block per 64-bit lane
// with its word in the low half (the odd lanes shifted down once on entry). vpmuludq reads only
// the low halves and leaves the whole 64-bit product, so a round is per set two vpmuludq, two
// vpshufd (the high half of a product down to the low half) and two vpternlogd (the three-way
// xor with the key); the high halves carry garbage that never reaches a low half. Twelve
// vector instructions a round for sixteen blocks, and four independent chains to overlap.
PK_TARGET_AVX512 inline void philox16_rounds(__m512i& a, __m512i& b, __m512i& c, __m512i& d,
                                             const Philox16Keys& keys) {
  const __m512i M0 = _mm512_set1_epi64(0xD2511F53u);
  const __m512i M1 = _mm512_set1_epi64(0xCD9E8D57u);
  __m512i a0 = a, b0 = b, c0 = c, d0 = d;  // even lanes
  __m512i a1 = _mm512_srli_epi64(a, 32), b1 = _mm512_srli_epi64(b, 32);  // odd lanes
  __m512i c1 = _mm512_srli_epi64(c, 32), d1 = _mm512_srli_epi64(d, 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m512i K0 = keys.k0[r], K1 = keys.k1[r];
    const __m512i p00 = _mm512_mul_epu32(a0, M0), p10 = _mm512_mul_epu32(c0, M1);
    const __m512i p01 = _mm512_mul_epu32(a1, M0), p11 = _mm512_mul_epu32(c1, M1);
    a0 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p10, _MM_PERM_CDAB), b0, K0, 0x96);
    c0 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p00, _MM_PERM_CDAB), d0, K1, 0x96);
    a1 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p11, _MM_PERM_CDAB), b1, K0, 0x96);
    c1 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p01, _MM_PERM_CDAB), d1, K1, 0x96);
    b0 = p10;
    d0 = p00;
    b1 = p11;
    d1 = p01;
  }
  // the odd lanes' low halves back up into the odd lanes
  a = _mm512_mask_shuffle_epi32(a0, 0xAAAA, a1, _MM_PERM_CDAB);
  b = _mm512_mask_shuffle_epi32(b0, 0xAAAA, b1, _MM_PERM_CDAB);
  c = _mm512_mask_shuffle_epi32(c0, 0xAAAA, c1, _MM_PERM_CDAB);
  d = _mm512_mask_shuffle_epi32(d0, 0xAAAA, d1, _MM_PERM_CDAB);
}

PK_TARGET_AVX512 inline void philox16_rounds(__m512i& a, __m512i& b, __m512i& c, __m512i& d, uint64_t seed) {
  Philox16Keys keys;
  philox16_keys(seed, &keys);
  philox16_rounds(a, b, c, d, keys);
}

// Word 0 of sixteen blocks, counters (a, b, offset, d) per lane.
PK_TARGET_AVX512 inline __m512i philox16_word0(__m512i a, __m512i b, uint32_t offset, __m512i d,
                                               const Philox16Keys& keys) {
  __m512i c = _mm512_set1_epi32(static_cast<int>(offset));
  philox16_rounds(a, b, c, d, keys);
  return a;
}

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
