// CPU kernels of the MLM masking family: mlm_mask (Bernoulli / exact-count selection,
// optional whole-word units, 80/10/10 actions) and span_mask (SpanBERT spans).
//
// One pass per row, rows in parallel (at::parallel_for). Every decision comes from the
// shared per-token functions in csrc/common/masking.h keyed by (seed, row, position), so
// the thread count never changes the result and the CUDA kernels reproduce it exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common/masking.h"
#include "../common/masking_checks.h"
#include "cpu_isa.h"
#include "direct_calls.h"
#include "philox_avx512.h"

namespace pk {
namespace {

using masking::MaskParams;

// The common case (token units, Bernoulli selection).
//
// Baseline x86-64 and AVX2: blocks of 64 tokens; one vectorised pass computes the 16 Philox
// blocks that hold their selection words, then scalar work per token.
//
// AVX-512: segments of up to kSegment tokens of one row, in four passes, every Philox block
// sixteen at a time (philox_avx512.h) and no branch per token:
//  A. per 64 tokens one Philox call (16 blocks) for the selection words, compared against the
//     threshold word by word and interleaved into token order with pdep (the mask "drawn"), all
//     of the segment's calls first, in a loop of their own so that they overlap;
//     per 16 tokens the masks "inside the vocab", "attended" and, when there are many special
//     ids, "not special" (a binary search of the few drawn tokens); the selected positions and
//     their ids are packed (vpcompress) into a list;
//  A'. with a few special ids (up to kVecSpecials): the listed ids compared against each, 16 at a
//     time; the specials leave the list and the selection masks;
//  B. the action word of each listed token, 16 tokens per Philox call: "mask" stores the mask
//     id into the list, "random" packs the token into a second list;
//  C. the random replacements, 16 tokens per Philox call, uniform_int's product and, with a few
//     special ids, the mapping past them (one compare and masked add per id) in the lanes; the rare
//     rejection of uniform_int, and the mapping past many special ids, scalar;
//  D. per 16 tokens, one store of each output: the list values expanded (vpexpand) into the
//     selected lanes of the ids, and the ids blended into -100 for the labels.
// The same Philox counters as the scalar path, so the results are bit-identical. The round keys
// are broadcast once per segment (cpu::Philox16Keys).
//
// Span masking stays sequential per row (masking::span_mask_row); on AVX-512 the row's eligible
// tokens are counted 16 at a time, and each row's outputs are initialised inside the parallel
// loop, just before its spans are drawn.
constexpr int kBlocks = 16;
constexpr int kTokens = 4 * kBlocks;
constexpr int64_t kSegment = 1024;   // tokens per segment (multiple of 64); its lists stay in L1
constexpr int kVecSpecials = 16;     // up to this many special ids: vector compares, else binary search

template <typename attn_t>
inline bool attended_at(const attn_t* a, int64_t l) {
  return a == nullptr || a[l] != 0;
}

template <typename id_t, typename attn_t>
__attribute__((always_inline)) inline void bernoulli_row_body(const MaskParams& p, const id_t* row, const attn_t* arow,
                                                              id_t* orow, id_t* lrow, int64_t L, int64_t b,
                                                              uint32_t thresh) {
  const uint32_t key0 = static_cast<uint32_t>(p.seed), key1 = static_cast<uint32_t>(p.seed >> 32);
  uint32_t w[4][kBlocks];
  for (int64_t l0 = 0; l0 < L; l0 += kTokens) {
    const int n = static_cast<int>(std::min<int64_t>(kTokens, L - l0));
    philox4x32_10_block<kBlocks>(static_cast<uint32_t>(l0 >> 2), static_cast<uint32_t>(b), masking::kMaskOffset, 0,
                                 key0, key1, w);
    for (int i = 0; i < n; ++i) {
      const int64_t l = l0 + i;
      const bool selected = (w[i & 3][i >> 2] >> 8) < thresh &&
                            masking::eligible(p, static_cast<int64_t>(row[l]), attended_at(arow, l));
      masking::write_token(p, selected, row[l], b, l, orow + l, lrow + l);
    }
  }
}

#if PK_X86
template <typename id_t, typename attn_t>
PK_TARGET_AVX2 void bernoulli_row_avx2(const MaskParams& p, const id_t* row, const attn_t* arow, id_t* orow,
                                       id_t* lrow, int64_t L, int64_t b, uint32_t thresh) {
  bernoulli_row_body(p, row, arow, orow, lrow, L, b, thresh);
}

#define PK_TARGET_AVX512_BMI2 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,bmi,bmi2")))

// 16 ids from `src` (lanes outside `valid` read as 0): one vector for int32, two for int64.
template <typename id_t>
struct Ids16 {
  __m512i lo, hi;  // int64: lanes 0-7 and 8-15; int32: lo holds all 16
};

template <typename id_t>
PK_TARGET_AVX512 inline Ids16<id_t> load_ids16(const id_t* src, __mmask16 valid) {
  Ids16<id_t> r;
  if constexpr (sizeof(id_t) == 8) {
    r.lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), src);
    r.hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid >> 8), src + 8);
  } else {
    r.lo = _mm512_maskz_loadu_epi32(valid, src);
    r.hi = r.lo;
  }
  return r;
}

template <typename id_t>
PK_TARGET_AVX512 inline __mmask16 eq16(const Ids16<id_t>& x, int64_t v) {
  if constexpr (sizeof(id_t) == 8) {
    const __m512i s = _mm512_set1_epi64(v);
    return static_cast<__mmask16>(_mm512_cmpeq_epi64_mask(x.lo, s) | (_mm512_cmpeq_epi64_mask(x.hi, s) << 8));
  } else {
    return _mm512_cmpeq_epi32_mask(x.lo, _mm512_set1_epi32(static_cast<int32_t>(v)));
  }
}

// ids in [0, vocab): one unsigned compare (negative ids wrap to huge values)
template <typename id_t>
PK_TARGET_AVX512 inline __mmask16 in_vocab16(const Ids16<id_t>& x, int64_t vocab) {
  if constexpr (sizeof(id_t) == 8) {
    const __m512i v = _mm512_set1_epi64(vocab);
    return static_cast<__mmask16>(_mm512_cmplt_epu64_mask(x.lo, v) | (_mm512_cmplt_epu64_mask(x.hi, v) << 8));
  } else {
    return _mm512_cmplt_epu32_mask(x.lo, _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(vocab))));
  }
}

// attention mask != 0 for 16 tokens (bool / uint8, int32 or int64 masks, read as they are)
template <typename attn_t>
PK_TARGET_AVX512 inline __mmask16 attended16(const attn_t* a, __mmask16 valid) {
  if (a == nullptr) return valid;
  if constexpr (sizeof(attn_t) == 1) {
    const __m128i x = _mm_maskz_loadu_epi8(valid, a);
    return _mm_test_epi8_mask(x, x);
  } else if constexpr (sizeof(attn_t) == 4) {
    const __m512i x = _mm512_maskz_loadu_epi32(valid, a);
    return _mm512_test_epi32_mask(x, x);
  } else {
    const __m512i lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), a);
    const __m512i hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid >> 8), a + 8);
    return static_cast<__mmask16>(_mm512_test_epi64_mask(lo, lo) | (_mm512_test_epi64_mask(hi, hi) << 8));
  }
}

// Packs the ids of the lanes in m to dst (which has room for 16 more).
template <typename id_t>
PK_TARGET_AVX512 inline void compress_ids16(const Ids16<id_t>& x, __mmask16 m, id_t* dst) {
  if constexpr (sizeof(id_t) == 8) {
    const __mmask8 mlo = static_cast<__mmask8>(m), mhi = static_cast<__mmask8>(m >> 8);
    _mm512_storeu_si512(dst, _mm512_maskz_compress_epi64(mlo, x.lo));
    _mm512_storeu_si512(dst + _mm_popcnt_u32(mlo), _mm512_maskz_compress_epi64(mhi, x.hi));
  } else {
    _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(m, x.lo));
  }
}

// Stores v to the lanes in m of dst[0, 16).
template <typename id_t>
PK_TARGET_AVX512 inline void store_value16(id_t* dst, __mmask16 m, int64_t v) {
  if constexpr (sizeof(id_t) == 8) {
    const __m512i s = _mm512_set1_epi64(v);
    _mm512_mask_storeu_epi64(dst, static_cast<__mmask8>(m), s);
    _mm512_mask_storeu_epi64(dst + 8, static_cast<__mmask8>(m >> 8), s);
  } else {
    _mm512_mask_storeu_epi32(dst, m, _mm512_set1_epi32(static_cast<int32_t>(v)));
  }
}

// The outputs of 16 tokens: lanes in m take the next packed values of `vals` (advancing it) and
// label the original id; the others keep the id and label -100. Lanes outside `valid` are not
// written.
template <typename id_t>
PK_TARGET_AVX512 inline void write16(const Ids16<id_t>& x, __mmask16 m, __mmask16 valid, const id_t*& vals, id_t* out,
                                     id_t* labels) {
  if constexpr (sizeof(id_t) == 8) {
    const __mmask8 mlo = static_cast<__mmask8>(m), mhi = static_cast<__mmask8>(m >> 8);
    const __mmask8 vlo = static_cast<__mmask8>(valid), vhi = static_cast<__mmask8>(valid >> 8);
    const __m512i o_lo = _mm512_mask_expand_epi64(x.lo, mlo, _mm512_loadu_si512(vals));
    vals += _mm_popcnt_u32(mlo);
    const __m512i o_hi = _mm512_mask_expand_epi64(x.hi, mhi, _mm512_loadu_si512(vals));
    vals += _mm_popcnt_u32(mhi);
    const __m512i none = _mm512_set1_epi64(-100);
    _mm512_mask_storeu_epi64(out, vlo, o_lo);
    _mm512_mask_storeu_epi64(out + 8, vhi, o_hi);
    _mm512_mask_storeu_epi64(labels, vlo, _mm512_mask_blend_epi64(mlo, none, x.lo));
    _mm512_mask_storeu_epi64(labels + 8, vhi, _mm512_mask_blend_epi64(mhi, none, x.hi));
  } else {
    const __m512i o = _mm512_mask_expand_epi32(x.lo, m, _mm512_loadu_si512(vals));
    vals += _mm_popcnt_u32(m);
    _mm512_mask_storeu_epi32(out, valid, o);
    _mm512_mask_storeu_epi32(labels, valid, _mm512_mask_blend_epi32(m, _mm512_set1_epi32(-100), x.lo));
  }
}

// Tokens [l, l + 64) of a row (l a multiple of 4): bit i set when token l + i is drawn, i.e.
// when the top 24 bits of its selection word are below thresh. The 16 Philox blocks give word w
// of block t to token 4t + w; the four compares give one 16-bit mask per word, which pdep
// interleaves into token order.
PK_TARGET_AVX512_BMI2 __attribute__((always_inline)) inline uint64_t drawn64(int64_t l, __m512i row_v,
                                                                             const cpu::Philox16Keys& keys,
                                                                             __m512i thresh_v) {
  __m512i a = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(l >> 2)),
                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i b = row_v, c = _mm512_set1_epi32(static_cast<int32_t>(masking::kMaskOffset)), d = _mm512_setzero_si512();
  cpu::philox16_rounds(a, b, c, d, keys);
  const uint64_t ma = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(a, 8), thresh_v);
  const uint64_t mb = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(b, 8), thresh_v);
  const uint64_t mc = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(c, 8), thresh_v);
  const uint64_t md = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(d, 8), thresh_v);
  return _pdep_u64(ma, 0x1111111111111111ull) | _pdep_u64(mb, 0x2222222222222222ull) |
         _pdep_u64(mc, 0x4444444444444444ull) | _pdep_u64(md, 0x8888888888888888ull);
}

// Tokens [l_begin, l_begin + n) of row b (l_begin a multiple of 64, n <= kSegment). sp[0, n_sp):
// the distinct special ids inside the vocab when there are at most kVecSpecials of them; n_sp < 0:
// more, checked by the binary search of masking::is_special.
template <typename id_t, typename attn_t>
PK_TARGET_AVX512_BMI2 void bernoulli_segment_avx512(const MaskParams& p, const int64_t* sp, int n_sp, const id_t* row,
                                               const attn_t* arow, id_t* orow, id_t* lrow, int64_t l_begin, int64_t n,
                                               int64_t b, uint32_t thresh) {
  cpu::Philox16Keys keys;
  cpu::philox16_keys(p.seed, &keys);
  alignas(64) uint32_t pos[kSegment + 16];  // positions of the selected tokens
  alignas(64) id_t vals[kSegment + 16];     // their new ids (the ids until an action changes them)
  alignas(64) uint32_t rnd[kSegment + 16];  // indices into pos / vals of the random replacements
  __mmask16 sel[kSegment / 16];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row_v = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(b)));
  const __m512i zero = _mm512_setzero_si512();
  const __m512i thresh_v = _mm512_set1_epi32(static_cast<int32_t>(thresh));
  const int64_t groups = (n + 15) / 16;
  const auto valid_of = [&](int64_t g) -> __mmask16 {
    const int64_t rem = n - 16 * g;
    return rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
  };

  // A. selection: first the drawn bits of the whole segment, in a loop of nothing but Philox
  // rounds (independent calls, so they overlap: twice the rate of one call per 64 tokens
  // between the compares and packs below), then per 16 tokens the other conditions.
  uint64_t drawn[kSegment / 64];
  for (int64_t k = 0; 64 * k < n; ++k) drawn[k] = drawn64(l_begin + 64 * k, row_v, keys, thresh_v);
  int64_t nsel = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t l = l_begin + 16 * g;
    const __mmask16 valid = valid_of(g);
    const Ids16<id_t> x = load_ids16(row + l, valid);
    __mmask16 m = static_cast<__mmask16>(drawn[g >> 2] >> (16 * (g & 3))) & valid;
    m &= in_vocab16(x, p.vocab_size) & attended16(arow ? arow + l : nullptr, valid);
    if (n_sp < 0) {
      for (uint32_t bits = m; bits != 0; bits &= bits - 1) {
        const int k = __builtin_ctz(bits);
        if (masking::is_special(p, static_cast<int64_t>(row[l + k]))) m &= static_cast<__mmask16>(~(1u << k));
      }
    }
    sel[g] = m;
    _mm512_storeu_si512(pos + nsel,
                        _mm512_maskz_compress_epi32(m, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(l)), iota)));
    compress_ids16(x, m, vals + nsel);
    nsel += _mm_popcnt_u32(m);
  }

  // A'. the few special ids: compared on the list of drawn tokens (about mask_prob of the tokens)
  // rather than on every token; the specials leave the list (packed in place) and their bits sel.
  if (n_sp > 0) {
    int64_t kept = 0;
    for (int64_t i = 0; i < nsel; i += 16) {
      const int64_t rem = nsel - i;
      const __mmask16 v = rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
      const Ids16<id_t> x = load_ids16(vals + i, v);
      const __m512i ps = _mm512_maskz_loadu_epi32(v, pos + i);
      __mmask16 special = 0;
      for (int k = 0; k < n_sp; ++k) special |= eq16(x, sp[k]);
      special &= v;
      const __mmask16 keep = static_cast<__mmask16>(v & ~special);
      for (uint32_t bits = special; bits != 0; bits &= bits - 1) {  // before the stores below overwrite pos[i..]
        const int64_t t = static_cast<int64_t>(pos[i + __builtin_ctz(bits)]) - l_begin;
        sel[t >> 4] &= static_cast<__mmask16>(~(1u << (t & 15)));
      }
      _mm512_storeu_si512(pos + kept, _mm512_maskz_compress_epi32(keep, ps));  // kept <= i: reads stay ahead
      compress_ids16(x, keep, vals + kept);
      kept += _mm_popcnt_u32(keep);
    }
    nsel = kept;
  }

  // B. actions
  const __m512 replace = _mm512_set1_ps(p.replace_prob);
  const __m512 replace_or_random = _mm512_set1_ps(p.replace_prob + p.random_prob);
  const __m512 two_m24 = _mm512_set1_ps(5.9604644775390625e-08f);  // uniform_float: (w >> 8) * 2^-24
  int64_t nrnd = 0;
  for (int64_t i = 0; i < nsel; i += 16) {
    const int64_t rem = nsel - i;
    const __mmask16 v = rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
    const __m512i w0 = cpu::philox16_word0(_mm512_maskz_loadu_epi32(v, pos + i), row_v, masking::kActionOffset, zero,
                                           keys);
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w0, 8)), two_m24);
    const __mmask16 to_mask = _mm512_mask_cmp_ps_mask(v, u, replace, _CMP_LT_OQ);
    const __mmask16 to_random = _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(v & ~to_mask), u, replace_or_random,
                                                        _CMP_LT_OQ);
    store_value16(vals + i, to_mask, p.mask_token_id);
    _mm512_storeu_si512(rnd + nrnd, _mm512_maskz_compress_epi32(
                                        to_random, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(i)), iota)));
    nrnd += _mm_popcnt_u32(to_random);
  }

  // C. random replacements (apply_action's draw: PhiloxStream(seed, (b, l), kRandomTokenOffset))
  if (p.n_allowed > 0) {
    const uint32_t n_allowed = static_cast<uint32_t>(p.n_allowed);
    alignas(64) uint32_t w16[16];
    const __m512i n_allowed_v = _mm512_set1_epi32(static_cast<int32_t>(n_allowed)), one = _mm512_set1_epi32(1);
    __m512i sp_v[kVecSpecials];
    for (int k = 0; k < n_sp; ++k) sp_v[k] = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(sp[k])));
    for (int64_t j = 0; j < nrnd; j += 16) {
      const int64_t rem = std::min<int64_t>(16, nrnd - j);
      const __mmask16 v = rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
      const __m512i idx = _mm512_maskz_loadu_epi32(v, rnd + j);
      const __m512i lp = _mm512_mask_i32gather_epi32(zero, v, idx, pos, 4);
      const __m512i w = cpu::philox16_word0(lp, row_v, masking::kRandomTokenOffset, zero, keys);
      if (n_sp < 0) {  // many special ids: the scalar mapping (a binary search would not be shorter)
        _mm512_store_si512(w16, w);
        for (int k = 0; k < rem; ++k) {
          const uint32_t i = rnd[j + k];
          const uint64_t prod = static_cast<uint64_t>(w16[k]) * n_allowed;
          if (static_cast<uint32_t>(prod) < n_allowed) {  // uniform_int may reject: the scalar draw
            vals[i] = static_cast<id_t>(masking::apply_action(p, masking::kRandom, static_cast<int64_t>(vals[i]), b, pos[i]));
          } else {
            vals[i] = static_cast<id_t>(masking::nth_allowed_id(p, static_cast<int64_t>(prod >> 32)));
          }
        }
        continue;
      }
      // uniform_int's w * n_allowed per lane: the high words (the draw) and the low words (a draw
      // with low < n_allowed may be rejected: those take the scalar path), even and odd lanes apart
      const __m512i pe = _mm512_mul_epu32(w, n_allowed_v), po = _mm512_mul_epu32(_mm512_srli_epi64(w, 32), n_allowed_v);
      __m512i r = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
      const __m512i lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
      const __mmask16 reject = _mm512_mask_cmplt_epu32_mask(v, lo, n_allowed_v);
      // nth_allowed_id without a branch: past each special id (ascending) at or below r, r moves
      // up by one; once one is above r, so are the rest
      for (int k = 0; k < n_sp; ++k) r = _mm512_mask_add_epi32(r, _mm512_cmple_epu32_mask(sp_v[k], r), r, one);
      _mm512_store_si512(w16, r);
      for (int k = 0; k < rem; ++k) vals[rnd[j + k]] = static_cast<id_t>(w16[k]);
      for (uint32_t bits = reject; bits != 0; bits &= bits - 1) {  // rare (probability < n_allowed / 2^32)
        const uint32_t i = rnd[j + __builtin_ctz(bits)];
        vals[i] = static_cast<id_t>(masking::apply_action(p, masking::kRandom, static_cast<int64_t>(row[pos[i]]), b, pos[i]));
      }
    }
  }

  // D. one store per output
  const id_t* next = vals;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t l = l_begin + 16 * g;
    const __mmask16 valid = valid_of(g);
    write16(load_ids16(row + l, valid), sel[g], valid, next, orow + l, lrow + l);
  }
}

// The eligible tokens of a row (span masking's budget), 16 at a time.
template <typename id_t>
PK_TARGET_AVX512 int64_t count_eligible_avx512(const MaskParams& p, const int64_t* sp, int n_sp, const id_t* row,
                                               const bool* arow, int64_t L) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; l += 16) {
    const int64_t rem = L - l;
    const __mmask16 valid = rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
    const Ids16<id_t> x = load_ids16(row + l, valid);
    __mmask16 m = in_vocab16(x, p.vocab_size) & attended16(arow ? arow + l : nullptr, valid);
    if (n_sp >= 0) {
      for (int i = 0; i < n_sp; ++i) m &= static_cast<__mmask16>(~eq16(x, sp[i]));
    } else {
      for (uint32_t bits = m; bits != 0; bits &= bits - 1) {
        const int k = __builtin_ctz(bits);
        if (masking::is_special(p, static_cast<int64_t>(row[l + k]))) m &= static_cast<__mmask16>(~(1u << k));
      }
    }
    n += _mm_popcnt_u32(m);
  }
  return n;
}

// The AVX-512 segments (which also use BMI2's pdep, present on every AVX-512 CPU).
inline bool segmented_path() {
  static const bool ok = cpu::has_isa(cpu::Isa::kAvx512) && __builtin_cpu_supports("bmi2");
  return ok;
}
#endif

// One row (or the segments [s0, s1) of it on AVX-512) of the Bernoulli path.
template <typename id_t, typename attn_t>
void bernoulli_row(const MaskParams& p, const int64_t* sp, int n_sp, const id_t* row, const attn_t* arow, id_t* orow,
                   id_t* lrow, int64_t L, int64_t b, int64_t s0, int64_t s1, uint32_t thresh) {
#if PK_X86
  if (segmented_path()) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t l = s * kSegment;
      bernoulli_segment_avx512(p, sp, n_sp, row, arow, orow, lrow, l, std::min(kSegment, L - l), b, thresh);
    }
    return;
  }
  if (s0 != 0) return;  // the other paths take whole rows
  if (cpu::has_isa(cpu::Isa::kAvx2)) return bernoulli_row_avx2(p, row, arow, orow, lrow, L, b, thresh);
#endif
  if (s0 != 0) return;
  bernoulli_row_body(p, row, arow, orow, lrow, L, b, thresh);
}

// Selection on the raw word: uniform_float(w) < pr  <=>  (w >> 8) < ceil(pr * 2^24).
inline uint32_t selection_threshold(float pr) {
  return pr >= 1.0f ? (1u << 24) : static_cast<uint32_t>(std::ceil(pr * 16777216.0f));
}

// The distinct special ids inside the vocab (the only ones an eligible id can equal), for the
// vector compares when they are few: n_sp of them, or n_sp = -1 when there are more than
// kVecSpecials (then the binary search of masking::is_special).
struct VecSpecials {
  std::vector<int64_t> ids;
  int n_sp;
  explicit VecSpecials(const MaskParams& p) {
    for (int64_t i = 0; i < p.n_special; ++i) {
      const int64_t s = p.special[i];
      if (s >= 0 && s < p.vocab_size && (i == 0 || p.special[i - 1] != s)) ids.push_back(s);
    }
    n_sp = ids.size() <= static_cast<size_t>(kVecSpecials) ? static_cast<int>(ids.size()) : -1;
  }
};

template <typename id_t, typename attn_t>
void bernoulli_rows(const MaskParams& p, const id_t* ids, const attn_t* attn, const float* prob_rows, double prob,
                    id_t* out, id_t* labels, int64_t B, int64_t L) {
  const VecSpecials vs(p);
  const std::vector<int64_t>& sp = vs.ids;
  const int n_sp = vs.n_sp;
  bool segmented = false;
#if PK_X86
  segmented = segmented_path();
#endif
  const int64_t nseg = segmented ? (L + kSegment - 1) / kSegment : 1;  // work units per row
  const int64_t unit = segmented ? std::min(L, kSegment) : L;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(unit, 1));
  const auto run = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      const int64_t b = u / nseg, s0 = u - b * nseg, s1 = std::min(nseg, s0 + (u1 - u));
      const float pr = prob_rows ? masking::row_rate(prob_rows[b]) : static_cast<float>(prob);
      bernoulli_row<id_t, attn_t>(p, sp.data(), n_sp, ids + b * L, attn ? attn + b * L : nullptr, out + b * L,
                                  labels + b * L, L, b, s0, s1, selection_threshold(pr));
      u += s1 - s0;
    }
  };
  if (B * nseg <= grain) {
    run(0, B * nseg);  // tiny inputs: no thread-pool dispatch
  } else {
    at::parallel_for(0, B * nseg, grain, run);
  }
}

template <typename id_t>
void mlm_mask_rows(const MaskParams& p, const masking::CheckedInputs& c, double prob, bool exact_count,
                   int64_t max_predictions, at::Tensor& out, at::Tensor& labels) {
  const int64_t B = c.ids.size(0), L = c.ids.size(1);
  const id_t* ids = c.ids.data_ptr<id_t>();
  const bool* attn = c.attn.defined() ? c.attn.data_ptr<bool>() : nullptr;
  const bool* ws = c.word_starts.defined() ? c.word_starts.data_ptr<bool>() : nullptr;
  const float* prob_rows = c.prob_rows.defined() ? c.prob_rows.data_ptr<float>() : nullptr;
  id_t* o = out.data_ptr<id_t>();
  id_t* lab = labels.data_ptr<id_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys;
    std::vector<int64_t> unit_of;  // selection unit (word start or the token itself)
    for (int64_t b = b0; b < b1; ++b) {
      const id_t* row = ids + b * L;
      const bool* arow = attn ? attn + b * L : nullptr;
      const bool* wrow = ws ? ws + b * L : nullptr;
      id_t* orow = o + b * L;
      id_t* lrow = lab + b * L;
      const double prd = prob_rows ? static_cast<double>(masking::row_rate(prob_rows[b])) : prob;
      const float pr = static_cast<float>(prd);
      const auto elig = [&](int64_t l) { return masking::eligible(p, static_cast<int64_t>(row[l]), !arow || arow[l]); };
      unit_of.resize(L);
      int64_t current = 0;
      for (int64_t l = 0; l < L; ++l) {
        if (!wrow || l == 0 || wrow[l]) current = l;
        unit_of[l] = current;
      }
      // Threshold on the unit keys for exact counts: a unit is selected iff key <= threshold.
      uint64_t threshold = 0;
      bool any = false;
      if (exact_count) {
        keys.clear();
        for (int64_t l = 0; l < L; ++l) {
          if (unit_of[l] != l || !elig(l)) continue;
          keys.push_back(masking::exact_key(masking::selection_word(p.seed, b, l), l));
        }
        const int64_t k = prd > 0.0 ? masking::exact_budget(prd, static_cast<int64_t>(keys.size()), max_predictions) : 0;
        if (k > 0) {
          std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
          threshold = keys[k - 1];
          any = true;
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        bool selected = false;
        if (elig(l)) {
          const int64_t u = unit_of[l];
          if (u == l || elig(u)) {
            const uint32_t wu = masking::selection_word(p.seed, b, u);
            selected = exact_count ? (any && masking::exact_key(wu, u) <= threshold) : (uniform_float(wu) < pr);
          }
        }
        masking::write_token(p, selected, row[l], b, l, orow + l, lrow + l);
      }
    }
  });
}

}  // namespace

// The ops' CPU kernels; also called straight from Python (csrc/module.cpp, direct_calls.h).
namespace cpu {

std::tuple<at::Tensor, at::Tensor> mlm_mask(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                                            const std::optional<at::Tensor>& special_ids,
                                            const std::optional<at::Tensor>& word_starts,
                                            const std::optional<at::Tensor>& mask_prob_rows, const at::Tensor& seed,
                                            double mask_prob, int64_t mask_token_id, int64_t vocab_size,
                                            double replace_prob, double random_prob, bool exact_count,
                                            int64_t max_predictions) {
  // The Bernoulli path reads bool, uint8, int32 and int64 attention masks as they are.
  const bool bernoulli = !exact_count && !word_starts.has_value();
  auto c = masking::check_inputs(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed,
                                 mask_token_id, vocab_size, mask_prob, replace_prob, random_prob,
                                 /*native_attn=*/bernoulli);
  auto out = at::empty_like(c.ids);
  auto labels = at::empty_like(c.ids);
  if (c.ids.numel() == 0) return {out, labels};
  const uint64_t s = static_cast<uint64_t>(*seed.data_ptr<int64_t>());  // checked: one int64 on the CPU
  MaskParams p = masking::make_params(c, mask_token_id, vocab_size, replace_prob, random_prob);
  p.seed = s;
  AT_DISPATCH_INDEX_TYPES(c.ids.scalar_type(), "mlm_mask_cpu", [&] {
    if (!bernoulli) return mlm_mask_rows<index_t>(p, c, mask_prob, exact_count, max_predictions, out, labels);
    const float* prob_rows = c.prob_rows.defined() ? c.prob_rows.data_ptr<float>() : nullptr;
    const auto run = [&](const auto* attn) {
      bernoulli_rows(p, c.ids.data_ptr<index_t>(), attn, prob_rows, mask_prob, out.data_ptr<index_t>(),
                     labels.data_ptr<index_t>(), c.ids.size(0), c.ids.size(1));
    };
    if (!c.attn.defined()) return run(static_cast<const bool*>(nullptr));
    switch (c.attn.scalar_type()) {
      case at::kLong: return run(c.attn.data_ptr<int64_t>());
      case at::kInt: return run(c.attn.data_ptr<int32_t>());
      case at::kByte: return run(c.attn.data_ptr<uint8_t>());
      default: return run(c.attn.data_ptr<bool>());
    }
  });
  return {out, labels};
}

std::tuple<at::Tensor, at::Tensor> span_mask(const at::Tensor& input_ids,
                                             const std::optional<at::Tensor>& attention_mask,
                                             const std::optional<at::Tensor>& special_ids,
                                             const std::optional<at::Tensor>& word_starts,
                                             const std::optional<at::Tensor>& mask_prob_rows, const at::Tensor& seed,
                                             double mask_prob, int64_t mask_token_id, int64_t vocab_size,
                                             double replace_prob, double random_prob, double geometric_p,
                                             int64_t max_span) {
  auto c = masking::check_inputs(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed,
                                 mask_token_id, vocab_size, mask_prob, replace_prob, random_prob);
  const int64_t span_cap = masking::check_span_args(geometric_p, max_span, c.ids.size(1));
  auto out = at::empty_like(c.ids);
  auto labels = at::empty_like(c.ids);
  if (c.ids.numel() == 0) return {out, labels};
  const uint64_t s = static_cast<uint64_t>(*seed.data_ptr<int64_t>());  // checked: one int64 on the CPU
  MaskParams p = masking::make_params(c, mask_token_id, vocab_size, replace_prob, random_prob);
  p.seed = s;
  const int64_t B = c.ids.size(0), L = c.ids.size(1);
  AT_DISPATCH_INDEX_TYPES(c.ids.scalar_type(), "span_mask_cpu", [&] {
    const index_t* ids = c.ids.data_ptr<index_t>();
    const bool* attn = c.attn.defined() ? c.attn.data_ptr<bool>() : nullptr;
    const bool* ws = c.word_starts.defined() ? c.word_starts.data_ptr<bool>() : nullptr;
    const float* prob_rows = c.prob_rows.defined() ? c.prob_rows.data_ptr<float>() : nullptr;
    index_t* o = out.data_ptr<index_t>();
    index_t* lab = labels.data_ptr<index_t>();
    const VecSpecials vs(p);
    bool vec = false;
#if PK_X86
    vec = cpu::has_isa(cpu::Isa::kAvx512);
#endif
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        // the row's outputs start as (ids, -100), written here so that the spans find them in cache
        const index_t* row = ids + b * L;
        const bool* arow = attn ? attn + b * L : nullptr;
        std::copy(row, row + L, o + b * L);
        std::fill(lab + b * L, lab + (b + 1) * L, static_cast<index_t>(-100));
        int64_t n_eligible = -1;
#if PK_X86
        if (vec) n_eligible = count_eligible_avx512(p, vs.ids.data(), vs.n_sp, row, arow, L);
#endif
        masking::span_mask_row<index_t, index_t, bool>(
            p, row, arow, ws ? ws + b * L : nullptr, o + b * L, lab + b * L, L, b,
            prob_rows ? static_cast<double>(masking::row_rate(prob_rows[b])) : mask_prob, static_cast<float>(geometric_p),
            span_cap, n_eligible);
      }
    });
  });
  return {out, labels};
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) {
  m.impl("mlm_mask", &cpu::mlm_mask);
  m.impl("span_mask", &cpu::span_mask);
}

}  // namespace pk
