// Shared per-token logic of the MLM masking ops, compiled into both the CPU and the CUDA
// kernels so that the two backends make exactly the same decisions for the same seed.
//
// Random words (philox index = row << 32 | counter):
//   selection word of token (b, l): philox_draw(seed, index(b, l / 4), kMaskOffset).v[l % 4]
//       -> Bernoulli selection (uniform < mask_prob), or the priority key of exact counts.
//       One Philox block serves four neighbouring tokens: selection is the only draw every
//       token needs, so this is what bounds the kernel's arithmetic.
//   action word of a selected token: philox_draw(seed, index(b, l), kActionOffset).v[0]
//       -> mask / random / keep.
//   PhiloxStream(seed, index(b, l), kRandomTokenOffset): the random replacement token.
// Span masking draws its spans (starts, actions, length trials) from one stream per row:
// PhiloxStream(seed, b << 32, kSpanOffset).
#pragma once
#include <cstdint>

#include "philox.h"

namespace pk {
namespace masking {

constexpr uint32_t kMaskOffset = 0x4d4c4d00u;         // "MLM\0"
constexpr uint32_t kRandomTokenOffset = 0x4d4c4d01u;
constexpr uint32_t kSpanOffset = 0x4d4c4d02u;
constexpr uint32_t kActionOffset = 0x4d4c4d03u;

enum Action : int { kMask = 0, kRandom = 1, kKeep = 2 };

struct MaskParams {
  int64_t mask_token_id;
  int64_t vocab_size;
  float replace_prob;
  float random_prob;
  uint64_t seed;
  const int64_t* special;  // sorted ascending (may hold duplicates or ids outside the vocab)
  int64_t n_special;
  int64_t n_allowed;  // vocab ids that are not special: the range of random replacements
};

PK_HD uint64_t token_index(int64_t row, int64_t pos) {
  return (static_cast<uint64_t>(row) << 32) | static_cast<uint32_t>(pos);
}

// Word k of a block without a run-time array index (which would spill to local memory on
// the GPU).
PK_HD uint32_t word_of(const Philox4x32& w, int k) {
  return k == 0 ? w.v[0] : k == 1 ? w.v[1] : k == 2 ? w.v[2] : w.v[3];
}

PK_HD uint32_t selection_word(uint64_t seed, int64_t row, int64_t pos) {
  return word_of(philox_draw(seed, token_index(row, pos >> 2), kMaskOffset), static_cast<int>(pos & 3));
}

PK_HD float action_uniform(uint64_t seed, int64_t row, int64_t pos) {
  return uniform_float(philox_draw(seed, token_index(row, pos), kActionOffset).v[0]);
}

PK_HD bool is_special(const MaskParams& p, int64_t id) {
  int64_t lo = 0, hi = p.n_special;  // binary search in the sorted list
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (p.special[mid] < id) lo = mid + 1; else hi = mid;
  }
  return lo < p.n_special && p.special[lo] == id;
}

// Number of distinct special ids inside [0, vocab_size).
PK_HD int64_t count_specials_in_vocab(const int64_t* special, int64_t n, int64_t vocab) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = special[i];
    if (s < 0 || s >= vocab || (i > 0 && special[i - 1] == s)) continue;
    ++c;
  }
  return c;
}

// The r-th (0-based) vocab id that is not special.
PK_HD int64_t nth_allowed_id(const MaskParams& p, int64_t r) {
  for (int64_t i = 0; i < p.n_special; ++i) {
    const int64_t s = p.special[i];
    if (s < 0 || s >= p.vocab_size || (i > 0 && p.special[i - 1] == s)) continue;
    if (s <= r) ++r; else break;
  }
  return r;
}

// A token may be selected when it is real (attention mask non-zero), inside the vocab
// and not special. Ids outside [0, vocab_size) are never selected and stay unchanged: the
// rule on both backends (the GPU cannot raise without a host sync).
PK_HD bool eligible(const MaskParams& p, int64_t id, bool attended) {
  return attended && id >= 0 && id < p.vocab_size && !is_special(p, id);
}

PK_HD int action_from_uniform(const MaskParams& p, float u) {
  if (u < p.replace_prob) return kMask;
  if (u < p.replace_prob + p.random_prob) return kRandom;
  return kKeep;
}

// New id of a selected token under an action.
PK_HD int64_t apply_action(const MaskParams& p, int action, int64_t id, int64_t row, int64_t pos) {
  if (action == kMask) return p.mask_token_id;
  if (action == kRandom && p.n_allowed > 0) {
    PhiloxStream s(p.seed, token_index(row, pos), kRandomTokenOffset);
    return nth_allowed_id(p, static_cast<int64_t>(uniform_int(s, static_cast<uint32_t>(p.n_allowed))));
  }
  return id;
}

// Priority of a selection unit for exact-count selection: the smallest keys win. The low
// half is the position, so keys are distinct and ties cannot make the count inexact.
PK_HD uint64_t exact_key(uint32_t w, int64_t pos) {
  return (static_cast<uint64_t>(w) << 32) | static_cast<uint32_t>(pos);
}

// How many units to select exactly: round-half-to-even like Python's round(), at least one
// when any unit is eligible, at most max_predictions (<= 0: no cap).
PK_HD int64_t exact_budget(double prob, int64_t n_eligible, int64_t max_predictions) {
  if (n_eligible <= 0) return 0;
  const double x = prob * static_cast<double>(n_eligible);
  double f = floor(x);
  const double d = x - f;
  if (d > 0.5 || (d == 0.5 && fmod(f, 2.0) != 0.0)) f += 1.0;
  int64_t k = static_cast<int64_t>(f);
  if (k < 1) k = 1;
  if (k > n_eligible) k = n_eligible;
  if (max_predictions > 0 && k > max_predictions) k = max_predictions;
  return k;
}

// A per-row masking rate as the kernels use it. Rates live on the device, where checking
// them would need a host sync, so one rule holds on both backends: a rate is clamped into
// [0, 1] and NaN counts as 0.
PK_HD float row_rate(float r) { return r > 0.f ? (r < 1.f ? r : 1.f) : 0.f; }

// The one write-out of a token of mlm_mask: a selected token gets its action (mask / random /
// keep, drawn from (seed, row, pos)) and its label is the original id; any other token is
// copied and labelled -100.
template <typename id_t>
PK_HD void write_token(const MaskParams& p, bool selected, id_t raw, int64_t row, int64_t pos, id_t* out, id_t* label) {
  if (selected) {
    const int action = action_from_uniform(p, action_uniform(p.seed, row, pos));
    *out = static_cast<id_t>(apply_action(p, action, static_cast<int64_t>(raw), row, pos));
    *label = raw;
  } else {
    *out = raw;
    *label = static_cast<id_t>(-100);
  }
}

// Span masking of one row, sequential by nature (each span must avoid the earlier ones).
// out and labels must hold the row's ids and -100 on entry. An attempt draws a start, a
// uniformly drawn position that must be an eligible, unselected token (and a word start when
// word_starts is given), and one action for the whole span (mask / random / keep, as in
// SpanBERT; random tokens are drawn per token). The span then grows one unit at a time (a
// token, or a word when word_starts is given): before each further unit a Bernoulli
// (geometric_p) trial on an exact float uniform ends it, so its length in units is
// geometric(geometric_p) on {1, 2, ...}, clipped to max_span, and CPU and CUDA agree bit for
// bit. It also stops at an ineligible or already selected token, and once exactly
// budget = round(prob * n_eligible) tokens are selected. Drawing the length unit by unit,
// only as far as the span really grows, bounds a row's work by O(L) draws whatever
// geometric_p and max_span are (a length drawn up front costs up to max_span trials per
// attempt, which with a tiny geometric_p and a huge max_span never ends).
// n_eligible: the row's eligible tokens when the caller has counted them (a vectorised count),
// or -1 to count them here.
template <typename id_t, typename label_t, typename attn_t>
PK_HD void span_mask_row(const MaskParams& p, const id_t* ids, const attn_t* attn, const bool* word_starts,
                         id_t* out, label_t* labels, int64_t L, int64_t row, double prob, float geometric_p,
                         int64_t max_span, int64_t n_eligible = -1) {
  if (n_eligible < 0) {
    n_eligible = 0;
    for (int64_t l = 0; l < L; ++l)
      n_eligible += eligible(p, static_cast<int64_t>(ids[l]), attn == nullptr || attn[l] != 0);
  }
  if (n_eligible == 0 || !(prob > 0.0)) return;
  const int64_t budget = exact_budget(prob, n_eligible, 0);
  PhiloxStream s(p.seed, token_index(row, 0), kSpanOffset);
  int64_t selected = 0;
  const int64_t max_attempts = 8 * L + 64;  // bound the rejection loop on sparse rows
  for (int64_t attempt = 0; attempt < max_attempts && selected < budget; ++attempt) {
    const int64_t start = static_cast<int64_t>(uniform_int(s, static_cast<uint32_t>(L)));
    const int action = action_from_uniform(p, uniform_float(s.next()));
    const bool start_ok = eligible(p, static_cast<int64_t>(ids[start]), attn == nullptr || attn[start] != 0) &&
                          labels[start] == -100 && (word_starts == nullptr || start == 0 || word_starts[start]);
    if (!start_ok) continue;
    int64_t units = 0;
    for (int64_t pos = start; pos < L && selected < budget; ++pos) {
      if (word_starts == nullptr || pos == start || word_starts[pos]) {  // a new unit begins here
        if (units >= max_span || (units > 0 && uniform_float(s.next()) < geometric_p)) break;
        ++units;
      }
      const int64_t id = static_cast<int64_t>(ids[pos]);
      if (!eligible(p, id, attn == nullptr || attn[pos] != 0) || labels[pos] != -100) break;
      labels[pos] = static_cast<label_t>(id);
      out[pos] = static_cast<id_t>(apply_action(p, action, id, row, pos));
      ++selected;
    }
  }
}

}  // namespace masking
}  // namespace pk
