// Shared tile and mask logic of the attention ops, usable from host and device code so
// that the CPU kernels (csrc/cpu/attention_*.cpp) and the CUDA kernels make exactly the
// same visibility decisions and skip exactly the same tiles.
//
// Visibility. Query i of a sequence with sq queries and sk keys sees key j when
//     0 <= j < sk, and
//     window_left  < 0  or  j >= i + offset - window_left,          and
//     window_right < 0  or  j <= i + offset + window_right  or  j < prefix,
// where offset = sk - sq when the mask is aligned bottom-right (FlashAttention >= 2.1:
// the last query sees the last key) and 0 when aligned top-left (torch SDPA's
// is_causal). Causal attention is window_right = 0.
//
// Prefix-LM (prefix_lens, one value per sequence: the bidirectional prefix of prefix-LM,
// UL2, GLM): every query also sees the keys j < prefix, so the prefix attends both ways
// and causal order holds after it. The prefix only widens the right end of a query's keys;
// the left end (a left window) still applies to prefix keys. Without a right window
// (window_right < 0, no causal) it changes nothing. The value reaching the kernels is
// clamped into [0, sk] (make_window): the CUDA kernels cannot raise on a device tensor
// without a host sync, so this is the one rule of both backends (the CPU op checks the
// values and raises before they get here).
//
// The visible keys of a query form one interval [key_lo(i), key_hi(i)):
//     key_lo(i) = max(0, i + offset - window_left)                  (0 without a left window)
//     key_hi(i) = max(min(sk, i + offset + window_right + 1), min(prefix, sk))   (sk without
//                 a right window)
// and both ends are non-decreasing in i, so a block of queries [i0, i1) sees keys
// [key_lo(i0), key_hi(i1 - 1)) and a block of keys [j0, j1) is seen by queries
// [query_lo(j0), query_hi(j1)) (a key j0 < prefix is seen from query 0 on).
//
// A tile (query block x key block) is skipped when no query of it sees any of its keys
// and needs no per-element mask when every query of it sees every key of it.
//
// Score modifiers. With a soft-cap c > 0 the scaled score s = scale * q.k becomes
// c * tanh(s / c) (Gemma-2, FlashAttention's softcap), applied before any mask; ALiBi then adds
// -slope * |i + offset - j| (FlashAttention's -slope * |i + Sk - Sq - j| for bottom-right
// alignment; offset as above, so it is defined for either alignment). The backward pass
// recomputes the same scores and multiplies dS by the derivative of the cap, 1 - tanh^2.
// Both backends call the functions below, with tanhf / tanh from the C library (CUDA's tanhf
// on the GPU), so their scores agree to a few ulps.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace pk {
namespace attention {

constexpr int64_t kMaxHeadDim = 256;

struct Window {
  int64_t left;    // < 0: unbounded
  int64_t right;   // < 0: unbounded; 0 for causal
  int64_t offset;  // key index aligned with query 0
  int64_t prefix;  // keys [0, prefix) are visible to every query the left window allows; in [0, sk]
};

PK_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
PK_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// prefix: the sequence's prefix_lens value (0: none), clamped into [0, sk] here, the rule for
// values outside that range on both backends.
PK_HD Window make_window(int64_t left, int64_t right, bool bottom_right, int64_t sq, int64_t sk, int64_t prefix = 0) {
  Window w;
  w.left = left;
  w.right = right;
  w.offset = bottom_right ? sk - sq : 0;
  w.prefix = prefix < 0 ? 0 : (prefix > sk ? sk : prefix);
  return w;
}

// First visible key of query i (may be >= key_hi when none is visible).
PK_HD int64_t key_lo(const Window& w, int64_t i) { return w.left < 0 ? 0 : imax(0, i + w.offset - w.left); }

// One past the last visible key of query i, for a sequence of sk keys.
// The prefix widens it to at least min(prefix, sk).
PK_HD int64_t key_hi(const Window& w, int64_t i, int64_t sk) {
  return w.right < 0 ? sk : imax(imin(w.prefix, sk), imax(0, imin(sk, i + w.offset + w.right + 1)));
}

// Whether query i sees key j, for 0 <= j < sk: key_lo(i) <= j < key_hi(i).
PK_HD bool visible(const Window& w, int64_t i, int64_t j) {
  return (w.left < 0 || j >= i + w.offset - w.left) && (w.right < 0 || j <= i + w.offset + w.right || j < w.prefix);
}

// First query that sees any key >= j0 (queries of a sequence with sq queries); a lower bound
// (it ignores the left window). A key j0 < prefix is seen from query 0 on.
PK_HD int64_t query_lo(const Window& w, int64_t j0, int64_t sq) {
  return w.right < 0 || j0 < w.prefix ? 0 : imin(sq, imax(0, j0 - w.offset - w.right));
}

// One past the last query that sees any key < j1 (the prefix does not move the left ends).
PK_HD int64_t query_hi(const Window& w, int64_t j1, int64_t sq) {
  return w.left < 0 ? sq : imax(0, imin(sq, j1 - w.offset + w.left));
}

// Whether every query of [i0, i1) sees every key of [j0, j1) (no element mask needed).
PK_HD bool tile_full(const Window& w, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t sk) {
  return key_lo(w, i1 - 1) <= j0 && key_hi(w, i0, sk) >= j1;
}

// Whether some query of [i0, i1) sees some key of [j0, j1).
PK_HD bool tile_any(const Window& w, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t sk) {
  return key_lo(w, i0) < j1 && key_hi(w, i1 - 1, sk) > j0 && key_lo(w, i0) < key_hi(w, i1 - 1, sk);
}

PK_HD float pk_tanh(float x) { return tanhf(x); }
PK_HD double pk_tanh(double x) { return tanh(x); }

// The ALiBi bias of query i and key j for a head with slope `slope`: -slope * |i + offset - j|.
template <typename T>
PK_HD T alibi_bias(T slope, const Window& w, int64_t i, int64_t j) {
  const int64_t d = i + w.offset - j;
  return -slope * static_cast<T>(d < 0 ? -d : d);
}

// The modified score of a scaled score s: softcap * tanh(s / softcap) when softcap > 0 (else s),
// plus `bias` (ALiBi). *dcap, when given, receives d(modified) / ds = 1 - tanh^2 (1 without cap).
template <typename T>
PK_HD T modify_score(T s, T softcap, T bias, T* dcap) {
  if (softcap > T(0)) {
    const T t = pk_tanh(s / softcap);
    s = softcap * t;
    if (dcap != nullptr) *dcap = T(1) - t * t;
  } else if (dcap != nullptr) {
    *dcap = T(1);
  }
  return s + bias;
}

// KV cache. Row b of a cache of `capacity` positions holds `len` = cache_seqlens[b] tokens
// and takes `s_new` more. The rule when they do not fit (len < 0 or len + s_new > capacity),
// the same on both backends because CUDA cannot raise without a host sync: nothing is written
// into that row, it attends to no key, and its outputs are NaN.
PK_HD bool cache_rows_fit(int64_t len, int64_t s_new, int64_t capacity) { return len >= 0 && len + s_new <= capacity; }

// Paged KV cache (vLLM, FlashAttention): the caches are [num_blocks, page_size, kv_heads,
// head_dim] and int32 block_table [batch, max_blocks] maps the pages of a row to blocks:
// logical position t of row b lives in block block_table[b, t / page_size], slot
// t % page_size, so a row holds up to max_blocks * page_size tokens. `pages` is the row
// block_table[b]; s_page and s_slot are the cache's strides (in elements) of its first two
// dimensions. Returns the element offset of position t (head 0, dim 0).
PK_HD int64_t paged_offset(const int32_t* pages, int64_t page_size, int64_t t, int64_t s_page, int64_t s_slot) {
  return static_cast<int64_t>(pages[t / page_size]) * s_page + (t % page_size) * s_slot;
}

// The first of the pages a row reads or writes (those covering positions [0, n)) whose block
// id lies outside [0, num_blocks), or -1 when all are valid. A row that uses such a page
// follows the rule of cache_rows_fit on both backends (the CUDA kernels cannot raise without
// a host sync; the CPU op raises before its kernels run): nothing is written into it, it
// attends to no key and its outputs (and lse) are NaN. Entries past the pages a row uses are
// never read, so they may hold anything (padding such as -1).
PK_HD int64_t first_bad_page(const int32_t* pages, int64_t n, int64_t page_size, int64_t num_blocks) {
  const int64_t used = (n + page_size - 1) / page_size;
  for (int64_t i = 0; i < used; ++i)
    if (pages[i] < 0 || pages[i] >= num_blocks) return i;
  return -1;
}

// Keys a kv-cache row attends to (its new tokens included), or -1 for a row that follows the
// rule of cache_rows_fit: it does not fit, or (paged, `pages` not null) it uses a block id
// outside [0, num_blocks).
PK_HD int64_t cache_row_keys(int64_t len, int64_t s_new, int64_t capacity, const int32_t* pages, int64_t page_size,
                             int64_t num_blocks) {
  if (!cache_rows_fit(len, s_new, capacity)) return -1;
  if (pages != nullptr && first_bad_page(pages, len + s_new, page_size, num_blocks) >= 0) return -1;
  return len + s_new;
}

// Number of blocks of size bs covering n.
PK_HD int64_t num_blocks(int64_t n, int64_t bs) { return (n + bs - 1) / bs; }

}  // namespace attention
}  // namespace pk
