// Shared math of the sampling family (pk.sample, pk.top_k_top_p_filter,
// pk.speculative_accept), compiled into both the CPU and the CUDA kernels.
//
// The approach, sort-free on both backends:
//
//  * Every logit becomes a float32 value v = (x - mx) / T: penalties, then the shift by the
//    row's largest logit mx and the division by the temperature (NaN counts as -inf), so
//    M = max v = 0 and nothing overflows. When some logit is +inf, the row's distribution is
//    the limit of softmax: uniform over the +inf entries, so v := (x == +inf) ? 0 : -inf.
//  * A value's weight is e = exp(v - M) in (0, 1], from exp_nonpos below (a polynomial
//    written with non-contracting float ops, so host and device give the same bits). The
//    weight is turned into a fixed-point integer mass = floor(e * 2^36). All sums are
//    integer sums: exact, so the order of summation (thread count, launch shape) never
//    changes a result, and CPU and CUDA reach the same totals, thresholds and tokens.
//    Tokens with e < 2^-36 (probability below ~1.5e-11 of the most likely token) have
//    mass 0 and are never drawn.
//  * The kept set is always {v >= threshold} (plus the min-p test e >= min_p), so
//    filtering reduces to finding one threshold by selection on the order-preserving
//    32-bit key of v: a radix descent of three levels (11, 11 and 10 bits). Top-k walks
//    count histograms to the k-th largest key; top-p walks mass histograms (restricted to
//    the top-k set) to the smallest key whose strictly-greater mass is below p * Z_k.
//    Both searches take the bin where a running sum over the bins, from the top bin down,
//    first reaches a limit (crossing_* below).
//  * One 64-bit uniform r picks the integer target floor(Z * r / 2^64) in [0, Z); the
//    token is the first kept index (in index order) whose inclusive mass prefix exceeds
//    the target: inverse-CDF sampling over the renormalised kept set.
//
// Random words: philox_draw(seed, index, kSampleOffset) with index = row (one shared seed)
// or 0 (one seed per row); words 0 and 1 form r. unmask_step draws position l of row b with
// philox_draw(seed, index, kUnmaskOffset, l) (words 0 and 1) and, for the random strategy,
// takes its 64-bit ordering key from philox_draw(seed, index, kRevealOffset, l). Speculative acceptance uses
// philox_draw(seed, index, kSpeculativeOffset, j) for draft position j: word 0 is the
// acceptance uniform, words 2 and 3 the 64-bit uniform of the correction / bonus draw.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

namespace pk {
namespace sampling {

constexpr uint32_t kSampleOffset = 0x534d5000u;       // "SMP\0"
constexpr uint32_t kSpeculativeOffset = 0x534d5001u;
constexpr uint32_t kUnmaskOffset = 0x534d5002u;
constexpr uint32_t kRevealOffset = 0x534d5003u;

constexpr float kMassScale = 68719476736.0f;           // 2^36: mass = floor(e * 2^36)
constexpr int64_t kMaxVocab = int64_t(1) << 27;        // keeps every mass sum below 2^63
// Probabilities (speculative decoding) use the same fixed point with 2^36 per unit.

// Radix levels over the 32-bit key: bits [31:21], [20:10], [9:0].
constexpr int kLevels = 3;
constexpr int kMaxBins = 2048;
PK_HD int level_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
PK_HD int level_bins(int level) { return level == 2 ? 1024 : 2048; }
// Does `key` lie in the range fixed by the levels before `level` (prefix holds those bits)?
PK_HD bool level_match(uint32_t key, uint32_t prefix, int level) {
  if (level == 0) return true;
  const int s = level_shift(level - 1);
  return (key >> s) == (prefix >> s);
}
PK_HD uint32_t level_bin(uint32_t key, int level) {
  return (key >> level_shift(level)) & static_cast<uint32_t>(level_bins(level) - 1);
}

// ---- float arithmetic that rounds the same way on host and device ---------------------
// (nvcc contracts a*b+c into an FMA unless told not to; the host build passes
// -ffp-contract=off, so plain operators round each step there.)
#if defined(__CUDA_ARCH__)
PK_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
PK_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
PK_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
PK_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
PK_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
PK_HD uint64_t mulhi64(uint64_t a, uint64_t b) { return __umul64hi(a, b); }
#else
PK_HD float fmul(float a, float b) { return a * b; }
PK_HD float fadd(float a, float b) { return a + b; }
PK_HD float fsub(float a, float b) { return a - b; }
PK_HD float fdiv(float a, float b) { return a / b; }
PK_HD double dmul(double a, double b) { return a * b; }
PK_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}
#endif

PK_HD float pos_inf() { return bits_float(0x7f800000u); }
PK_HD float neg_inf() { return bits_float(0xff800000u); }
PK_HD bool is_nan(float x) { return x != x; }
PK_HD bool is_finite(float x) { return x > neg_inf() && x < pos_inf(); }

// ---- lanes ---------------------------------------------------------------------------------
// Functions written once for a scalar float (both backends) and, on the CPU, for a vector of
// four floats (GCC/Clang vector extensions; SSE2 on the x86-64 baseline, NEON on arm64), so
// that the CPU's vectorised passes perform exactly the scalar operations on every lane. Each
// lane type supplies fadd/fmul/fsub, lane(x, c) (the constant c shaped like x), not_ge(x, c)
// (a lane mask, true also for NaN), select(mask, a, b) and pow2_int(n) (2^n for integral n).
PK_HD float lane(float, float c) { return c; }
PK_HD bool not_ge(float x, float c) { return !(x >= c); }
PK_HD float select(bool m, float a, float b) { return m ? a : b; }
PK_HD float pow2_int(float n) { return bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23); }

#if !defined(__CUDACC__)
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef uint32_t u4 __attribute__((vector_size(16)));
inline f4 fmul(f4 a, f4 b) { return a * b; }
inline f4 fadd(f4 a, f4 b) { return a + b; }
inline f4 fsub(f4 a, f4 b) { return a - b; }
inline f4 lane(f4, float c) { return f4{} + c; }
inline i4 not_ge(f4 x, float c) { return ~(x >= c); }
inline f4 select(i4 m, f4 a, f4 b) { return m ? a : b; }
inline f4 pow2_int(f4 n) { return (f4)((__builtin_convertvector(n, i4) + 127) << 23); }  // casts reinterpret bits
#endif

// exp(x) for x <= 0 with ~1 ulp accuracy; 0 below -87 (where expf would be subnormal).
// Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial.
template <typename F>
PK_HD F exp_nonpos_lanes(F x) {
  const auto tiny = not_ge(x, -87.0f);  // also -inf and NaN
  const F xc = select(tiny, lane(x, -87.0f), x);
  const F t = fadd(fmul(xc, lane(x, 1.44269504088896341f)), lane(x, 12582912.0f));  // round via 1.5 * 2^23
  const F n = fsub(t, lane(x, 12582912.0f));
  F r = fsub(xc, fmul(n, lane(x, 0.693359375f)));
  r = fsub(r, fmul(n, lane(x, -2.12194440e-4f)));
  F p = lane(x, 1.9875691500e-4f);
  p = fadd(fmul(p, r), lane(x, 1.3981999507e-3f));
  p = fadd(fmul(p, r), lane(x, 8.3334519073e-3f));
  p = fadd(fmul(p, r), lane(x, 4.1665795894e-2f));
  p = fadd(fmul(p, r), lane(x, 1.6666665459e-1f));
  p = fadd(fmul(p, r), lane(x, 5.0000001201e-1f));
  const F y = fadd(fadd(fmul(fmul(p, r), r), r), lane(x, 1.0f));
  return select(tiny, lane(x, 0.0f), fmul(y, pow2_int(n)));  // n in [-126, 0]
}

PK_HD float exp_nonpos(float x) { return exp_nonpos_lanes(x); }

PK_HD uint64_t mass_of(float e) { return static_cast<uint64_t>(static_cast<int64_t>(fmul(e, kMassScale))); }

// Order-preserving map float -> uint32 (larger float, larger key). -0 and +0 map alike.
PK_HD uint32_t float_key(float v) {
  v = fadd(v, 0.0f);  // -0 -> +0
  const uint32_t b = float_bits(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
PK_HD float key_float(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  return bits_float(b);
}

// ---- per-row knobs ---------------------------------------------------------------------
// Scalar knobs are checked on the host (NaN and out-of-range values raise), and so are
// per-row knob tensors on the CPU. Per-row tensors in device memory cannot be checked without
// a host sync, so the kernels of both backends read every per-row value through
// Params::knobs / *_of below, which apply one rule to the values the CPU would reject:
//   temperature < 0 or NaN -> greedy (as 0);   top_k < 0 -> off (as 0);
//   top_p NaN or > 1 -> off (as 1);            top_p <= 0 -> only the most likely value;
//   min_p NaN or < 0 -> off (as 0);            min_p > 1 -> as 1 (the most likely values);
//   repetition_penalty NaN, <= 0 or +inf -> off (as 1);
//   presence_penalty / frequency_penalty NaN or +-inf -> off (as 0).
// (temperature = +inf is valid: see scaled_value.)
struct RowKnobs {
  float temperature;  // <= 0 (or NaN): greedy
  int64_t top_k;      // <= 0 or >= V: off
  float top_p;        // >= 1 (or NaN): off; <= 0 keeps only the most likely value
  float min_p;        // <= 0 (or NaN): off
  PK_HD bool greedy() const { return !(temperature > 0.0f); }
  PK_HD bool topk_on(int64_t V) const { return top_k > 0 && top_k < V; }
  PK_HD bool topp_on() const { return top_p < 1.0f; }
  PK_HD bool minp_on() const { return min_p > 0.0f; }
};

// Repetition (transformers: positive logits divided, negative multiplied, once per id),
// then presence and frequency (vLLM: minus presence for a seen id, minus frequency times
// its count). `count` >= 1 is the number of occurrences of the id in prev_tokens.
PK_HD float penalize(float x, int64_t count, float repetition, float presence, float frequency) {
  float y = x > 0.0f ? fdiv(x, repetition) : fmul(x, repetition);
  y = fsub(y, fmul(frequency, static_cast<float>(count)));
  return fsub(y, presence);
}

// Row mode from the largest (penalised) logit mx of the row, NaN ignored: normal (mx
// finite), +inf entries (uniform over them), or nothing drawable (every logit -inf or NaN).
enum RowMode : int { kNormal = 0, kInfinite = 1, kEmpty = 2 };
PK_HD int row_mode(float mx) {
  if (mx == pos_inf()) return kInfinite;
  if (mx == neg_inf()) return kEmpty;
  return kNormal;
}

// The value of logit x in a normal row: (x - mx) / temperature, NaN -> -inf. Shifting by the
// row's largest logit before dividing keeps every value in [-inf, 0] with the largest exactly
// 0, so no temperature is too small and no logit too large: x / T would overflow to +inf for
// T = 1e-40 or x = 3e38 at T = 0.5, and the row would turn into "uniform over the +inf
// entries" (or, all logits negative, into "nothing drawable"). Temperature must be > 0; +inf
// is the limit of softmax(x / T): every finite logit becomes -0 (uniform over them) and -inf
// stays -inf (-inf / inf is NaN, read as -inf).
PK_HD float scaled_value(float x, float mx, float temperature) {
  if (is_nan(x)) return neg_inf();
  const float y = fdiv(fsub(x, mx), temperature);
  return is_nan(y) ? neg_inf() : y;
}
// The value used by every pass after the max pass; the row's largest value is 0 in both
// drawable modes (+inf entries: 0 for them, -inf for the rest).
PK_HD float row_value(float x, float mx, float temperature, int mode) {
  if (mode == kInfinite) return x == pos_inf() ? 0.0f : neg_inf();
  return scaled_value(x, mx, temperature);
}

// Whether top_k_top_p_filter may pass logit x through unchanged, before any knob: the entries
// the non-finite rules read as -inf (NaN; every finite entry of a row holding +inf) come out
// -inf even when no knob filters (top_k 0, top_p 1, min_p 0), as they would after a knob.
PK_HD bool filter_passes(float x, int mode) { return mode == kInfinite ? x == pos_inf() : x == x; }

// ---- selection: the bin where a running sum over bins, top bin first, reaches a limit --
// Count (top-k): hist[d] = number of keys in bin d; want the bin holding the rem-th largest.
// Returns the bin and sets *before = the count in the bins above it.
PK_HD int crossing_count(const uint64_t* hist, int nb, uint64_t rem, uint64_t* before) {
  uint64_t cum = 0;
  for (int d = nb - 1; d >= 0; --d) {
    if (cum + hist[d] >= rem) {
      *before = cum;
      return d;
    }
    cum += hist[d];
  }
  *before = cum;
  return -1;
}
// Mass (top-p): the lowest bin holding a key u whose strictly-greater mass A(u) is below
// the limit, i.e. the first bin (top down) where above + mass(bins >= d) >= limit.
PK_HD bool mass_crossed(uint64_t above, uint64_t cum, double limit) {
  return static_cast<double>(above + cum) >= limit;
}
PK_HD int crossing_mass(const uint64_t* hist, int nb, uint64_t above, double limit, uint64_t* before) {
  uint64_t cum = 0;
  for (int d = nb - 1; d >= 0; --d) {
    if (mass_crossed(above, cum + hist[d], limit)) {
      *before = cum;
      return d;
    }
    cum += hist[d];
  }
  *before = cum;
  return -1;
}
PK_HD double topp_limit(float top_p, uint64_t total) { return dmul(static_cast<double>(top_p), static_cast<double>(total)); }

// Target of the inverse-CDF draw in [0, total).
PK_HD uint64_t draw_target(uint64_t total, const Philox4x32& w) {
  const uint64_t r = (static_cast<uint64_t>(w.v[0]) << 32) | w.v[1];
  return mulhi64(total, r);
}
PK_HD uint64_t draw_target_words(uint64_t total, uint32_t hi, uint32_t lo) {
  return mulhi64(total, (static_cast<uint64_t>(hi) << 32) | lo);
}

// log-probability of a drawn value v under the kept set of total mass `total`.
PK_HD float logprob_of(float v, float max_value, uint64_t total) {
  const float z = static_cast<float>(static_cast<double>(total) * (1.0 / 68719476736.0));
  return fsub(fsub(v, max_value), logf(z));
}

// Everything a sampling kernel reads, as plain pointers and scalars (host or device).
// A per-row pointer, when set, overrides the scalar of the same knob.
struct Params {
  int64_t B = 0, V = 0, T = 0;  // T: length of prev_tokens rows (0: no penalties)
  const float* temperature_rows = nullptr;
  const int64_t* top_k_rows = nullptr;
  const float* top_p_rows = nullptr;
  const float* min_p_rows = nullptr;
  const float* repetition_rows = nullptr;
  const float* presence_rows = nullptr;
  const float* frequency_rows = nullptr;
  float temperature = 1.0f;
  int64_t top_k = 0;
  float top_p = 1.0f, min_p = 0.0f;
  float repetition = 1.0f, presence = 0.0f, frequency = 0.0f;
  const int64_t* prev = nullptr;   // [B, T] int64
  uint64_t seed = 0;               // used when seed_ptr is null
  const int64_t* seed_ptr = nullptr;  // one seed, or one per row when per_row_seed
  bool per_row_seed = false;

  PK_HD RowKnobs knobs(int64_t b) const {
    RowKnobs k;
    k.temperature = temperature_rows ? temperature_rows[b] : temperature;
    k.top_k = top_k_rows ? top_k_rows[b] : top_k;
    k.top_p = top_p_rows ? top_p_rows[b] : top_p;
    k.min_p = min_p_rows ? min_p_rows[b] : min_p;
    if (is_nan(k.top_p)) k.top_p = 1.0f;
    if (k.min_p > 1.0f) k.min_p = 1.0f;
    return k;
  }
  PK_HD float repetition_of(int64_t b) const {
    const float r = repetition_rows ? repetition_rows[b] : repetition;
    return (r > 0.0f && r < pos_inf()) ? r : 1.0f;
  }
  PK_HD float presence_of(int64_t b) const {
    const float v = presence_rows ? presence_rows[b] : presence;
    return is_finite(v) ? v : 0.0f;
  }
  PK_HD float frequency_of(int64_t b) const {
    const float v = frequency_rows ? frequency_rows[b] : frequency;
    return is_finite(v) ? v : 0.0f;
  }
  PK_HD bool penalties_on(int64_t b) const {
    return T > 0 && (repetition_of(b) != 1.0f || presence_of(b) != 0.0f || frequency_of(b) != 0.0f);
  }
  PK_HD uint64_t seed_of(int64_t b) const {
    if (seed_ptr == nullptr) return seed;
    return static_cast<uint64_t>(per_row_seed ? seed_ptr[b] : seed_ptr[0]);
  }
  PK_HD uint64_t seed_index(int64_t b) const { return per_row_seed ? 0u : static_cast<uint64_t>(b); }
  PK_HD Philox4x32 words(int64_t b, uint32_t offset, uint32_t draw = 0) const {
    return philox_draw(seed_of(b), seed_index(b), offset, draw);
  }
};


// ---- unmask_step (masked-diffusion sampling step) -----------------------------------------
// Every still-masked position (b, l) draws a token from its own logits with the knobs of row
// b, as pk.sample does for one row, with the counter (seed or seed[b], index, l); the mask
// token itself is never drawn (its logit counts as -inf, after the penalties). Its
// confidence is the drawn token's probability under the final (penalised, tempered,
// filtered, renormalised) distribution, mass / Z in float32; a greedy row (temperature 0)
// draws the argmax and takes its confidence from the same filtered distribution at
// temperature 1 (at temperature 0 every position would have confidence 1). Then each row
// reveals the num_reveal masked positions with the smallest ordering keys (ties: lower
// position first): confidence strategy, key = confidence, most confident first; random
// strategy, a 64-bit Philox word per position. A position without a drawable token (every
// logit -inf or NaN) has confidence -1 and the largest key, and stays masked even when chosen.
enum UnmaskStrategy : int { kConfidence = 0, kRandom = 1 };

PK_HD float unmask_confidence(uint64_t mass, uint64_t total) {
  if (total == 0) return -1.0f;
#if defined(__CUDA_ARCH__)
  return static_cast<float>(__ddiv_rn(static_cast<double>(mass), static_cast<double>(total)));
#else
  return static_cast<float>(static_cast<double>(mass) / static_cast<double>(total));
#endif
}

// The ordering key of a masked position (smaller is revealed first).
PK_HD uint64_t reveal_key(int strategy, int64_t token, float confidence, const Philox4x32& reveal_words) {
  if (token < 0) return ~static_cast<uint64_t>(0);
  if (strategy == kRandom) return (static_cast<uint64_t>(reveal_words.v[0]) << 32) | reveal_words.v[1];
  return static_cast<uint64_t>(~float_key(confidence));  // higher confidence, smaller key
}
// Strict order of (key, position): the k smallest are revealed.
PK_HD bool reveal_before(uint64_t ka, int64_t la, uint64_t kb, int64_t lb) { return ka < kb || (ka == kb && la < lb); }
// The number to reveal in a row with `masked` masked positions: clamp(n, 0, masked).
PK_HD int64_t reveal_count(int64_t n, int64_t masked) { return n < 0 ? 0 : (n > masked ? masked : n); }

// ---- speculative decoding --------------------------------------------------------------
// Probabilities as fixed-point masses (same 2^36 scale; NaN and negatives count as 0).
PK_HD uint64_t prob_mass(float p) {
  if (!(p > 0.0f)) return 0;
  if (p > 1.0f) p = 1.0f;
  return mass_of(p);
}
// Accept draft token d with draft probability pd and target probability pt iff
// u < min(1, pt / pd), evaluated without a division: pt >= pd, or u * pd < pt.
PK_HD bool accept_draft(float u, float pd, float pt) {
  if (is_nan(pt) || !(pt > 0.0f)) return false;
  if (is_nan(pd) || pt >= pd) return true;
  return fmul(u, pd) < pt;
}
// Mass of the residual distribution max(0, pt - pd).
PK_HD uint64_t residual_mass(float pt, float pd) {
  const uint64_t a = prob_mass(pt), b = prob_mass(pd);
  return a > b ? a - b : 0;
}

// The acceptance walk of row b (both backends run this same code, so they accept the same
// drafts): draft position j (ids[j], draft row dp + j V, target row tp + j V) is accepted
// with accept_draft and the uniform of philox word 0 at draw j, while every earlier one was;
// accepted ids go to orow[j]. Returns the number accepted: the first rejected position, or n.
// A draft id outside [0, V) (negative, V or more) is rejected at its position, and the
// caller draws the correction token there as for any rejection.
template <typename scalar_t>
PK_HD int64_t accept_walk(const Params& p, int64_t b, int64_t n, int64_t V, const int64_t* ids, const scalar_t* dp,
                          const scalar_t* tp, int64_t* orow) {
  int64_t j = 0;
  for (; j < n; ++j) {
    const int64_t d = ids[j];
    if (d < 0 || d >= V) break;
    const float u = uniform_float(p.words(b, kSpeculativeOffset, static_cast<uint32_t>(j)).v[0]);
    if (!accept_draft(u, static_cast<float>(dp[j * V + d]), static_cast<float>(tp[j * V + d]))) break;
    orow[j] = d;
  }
  return j;
}

}  // namespace sampling
}  // namespace pk
