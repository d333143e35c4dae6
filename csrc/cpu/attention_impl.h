// Problem description shared by the CPU attention kernels (forward, backward, decode):
// where each sequence's rows live, the mask, the scale. See attention.cpp for the essay.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/attention.h"
#include "../common/attention_checks.h"
#include "attention_dropout.h"
#include "attention_kernels.h"

namespace pk {
namespace attention {
namespace cpu {

// Per-thread scratch for the large per-call buffers (packed key/value panels, float copies).
// They are rewritten on every call; a fresh multi-megabyte std::vector instead costs a zeroing
// pass plus a page fault per 4 KiB page on every call, about a fifth of a short forward pass
// (sequence 256). The memory stays with the calling thread for the next call; buffers over
// kScratchKeepBytes are allocated for the call alone. Contents are unspecified on return:
// callers write (or zero) what they read. Each live buffer of one call uses its own slot.
constexpr size_t kScratchKeepBytes = size_t(64) << 20;
constexpr int kScratchSlots = 8;

template <typename T>
T* scratch(int slot, size_t n, std::vector<T>& owned) {
  static thread_local std::vector<T> keep[kScratchSlots];
  if (n * sizeof(T) > kScratchKeepBytes) {
    owned.resize(n);
    return owned.data();
  }
  std::vector<T>& v = keep[slot];
  if (v.size() < n) {
    std::vector<T>().swap(v);
    v.resize(n);
  }
  return v.data();
}

// Strided view of one operand: element (b, s, h, d) at b * sb + s * ss + h * sh + d.
// For packed (varlen) operands sb is unused: sequence b starts at token cu[b].
struct Operand {
  const void* ptr = nullptr;
  int64_t sb = 0, ss = 0, sh = 0;
};

struct Problem {
  int64_t batch = 0;            // sequences
  int64_t H = 0, Hk = 0;        // query heads, key/value heads (H % Hk == 0)
  int64_t D = 0, Dv = 0;        // head dims of q/k and of v/out
  int64_t sq = 0, sk = 0;       // dense lengths (also the maxima for varlen)
  const int32_t* cu_q = nullptr;  // varlen offsets [batch + 1], or null
  const int32_t* cu_k = nullptr;
  const int32_t* seqlens_k = nullptr;  // per-sequence key count (kv cache, new tokens included), or null
  const int32_t* prefix_lens = nullptr;  // prefix-LM: bidirectional prefix per sequence [batch], or null
  // Paged kv cache: key j of sequence b lives in block block_table[b * bt_sb + j / page_size],
  // slot j % page_size (paged_offset in csrc/common/attention.h); k.sb / v.sb are then the
  // caches' block strides and k.ss / v.ss their slot strides.
  const int32_t* block_table = nullptr;
  int64_t bt_sb = 0, page_size = 0;
  Operand q, k, v;
  // Mask from the caller (SDPA): bool (true = attend) or float32 (added to the scores),
  // indexed (b, h, i, j) through strides (zero where broadcast).
  const bool* mask_bool = nullptr;
  const float* mask_float = nullptr;
  int64_t m_sb = 0, m_sh = 0, m_si = 0, m_sj = 0;
  double scale = 1.0;
  // Score modifiers (csrc/common/attention.h): soft-cap (0: off) and ALiBi slopes, float32
  // indexed b * alibi_sb + h * alibi_sh (alibi_sb 0 for [heads] slopes), or null.
  double softcap = 0.0;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = true;
  // Attention dropout (csrc/common/attention_dropout.h); off unless dropout.on().
  Dropout dropout;

  int64_t total_q = 0;          // tokens on the query side (B * sq dense, cu_q[B] varlen)

  int64_t group() const { return H / Hk; }
  int64_t len_q(int64_t b) const { return cu_q ? int64_t(cu_q[b + 1]) - cu_q[b] : sq; }
  int64_t len_k(int64_t b) const {
    if (seqlens_k) return seqlens_k[b];
    return cu_k ? int64_t(cu_k[b + 1]) - cu_k[b] : sk;
  }
  // First token of sequence b in a (tokens, heads, dim) view of q-side / k-side tensors.
  int64_t tok_q(int64_t b) const { return cu_q ? int64_t(cu_q[b]) : b * sq; }
  int64_t tok_k(int64_t b) const { return cu_k ? int64_t(cu_k[b]) : b * sk; }
  template <typename T>
  const T* q_row(int64_t b, int64_t i, int64_t h) const {
    return static_cast<const T*>(q.ptr) + (cu_q ? (cu_q[b] + i) * q.ss : b * q.sb + i * q.ss) + h * q.sh;
  }
  template <typename T>
  const T* kv_row(const Operand& o, int64_t b, int64_t j, int64_t hk) const {
    const int64_t row = block_table ? paged_offset(block_table + b * bt_sb, page_size, j, o.sb, o.ss)
                                    : (cu_k ? (cu_k[b] + j) * o.ss : b * o.sb + j * o.ss);
    return static_cast<const T*>(o.ptr) + row + hk * o.sh;
  }
  template <typename T>
  const T* k_row(int64_t b, int64_t j, int64_t hk) const { return kv_row<T>(k, b, j, hk); }
  template <typename T>
  const T* v_row(int64_t b, int64_t j, int64_t hk) const { return kv_row<T>(v, b, j, hk); }
  bool paged() const { return block_table != nullptr; }
  // Keys or values from j0 on of sequence b (kv head hk) for the rows kernels: f(rows) with
  // rows(j) the address of key j0 + j, strided (one pointer and a row stride) or paged; rows
  // j < len_k(b) - j0 are prefetched past the block, the others not.
  template <typename T, typename F>
  void with_rows(const Operand& o, int64_t b, int64_t j0, int64_t hk, F&& f) const {
    if (block_table)
      f(PagedRows<T>{static_cast<const T*>(o.ptr) + hk * o.sh, block_table + b * bt_sb, page_size, o.sb, o.ss, j0,
                         len_k(b) - j0});
    else
      f(StridedRows<T>{kv_row<T>(o, b, j0, hk), o.ss, len_k(b) - j0});
  }
  // Outputs and the logsumexp are contiguous: out (tokens, H, Dv), lse (B, H, sq) dense or
  // (H, total_q) varlen, as FlashAttention lays them out.
  int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return cu_q ? h * total_q + cu_q[b] + i : (b * H + h) * sq + i;
  }
  Window window(int64_t b) const {
    return make_window(window_left, window_right, bottom_right, len_q(b), len_k(b), prefix_lens ? prefix_lens[b] : 0);
  }
  bool has_mask() const { return mask_bool || mask_float; }
  bool has_dropout() const { return dropout.on(); }
  // The factor of the output rows: 65536 / (65536 - threshold) with dropout (0 when every
  // element is dropped), else 1.
  template <typename acc_t>
  acc_t dropout_scale() const {
    return has_dropout() ? static_cast<acc_t>(dropout_rscale(dropout.threshold)) : acc_t(1);
  }

  // Forward: zeroes the dropped entries of rows of P (row stride lds; rows g * np + r for query
  // i0 + r of head h0 + g), keys j0 .. j0 + nk of sequence b.
  template <typename acc_t>
  void dropout_rows(acc_t* S, int64_t lds, int64_t R, int64_t np, int64_t nk, int64_t b, int64_t h0, int64_t i0,
                    int64_t j0, std::vector<uint32_t>& buf) const {
    for (int64_t r = 0; r < R; ++r)
      dropout_zero_row(dropout, dropout_row_index(b, h0 + r / np, H, i0 + r % np), j0, nk, S + r * lds, buf);
  }
  bool has_score_mod() const { return softcap > 0 || alibi; }

  // Applies the score modifiers to a row of scaled scores s[0, n) of query i (head h) against
  // keys j0 .. j0 + n, before mask_row: the soft-cap, then the ALiBi bias. dcap, when given,
  // receives the cap's derivative 1 - tanh^2 per element (for the backward pass). float rows
  // on AVX-512 take score_mod_row_avx512 (a vector tanh within a few ulps of tanhf).
  template <typename acc_t>
  void modify_row(acc_t* s, acc_t* dcap, int64_t n, const Window& w, int64_t b, int64_t h, int64_t i,
                  int64_t j0) const {
    const acc_t cap = static_cast<acc_t>(softcap);
    const acc_t slope = alibi ? static_cast<acc_t>(alibi[b * alibi_sb + h * alibi_sh]) : acc_t(0);
#if PK_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t d0 = i + w.offset - j0, lim = int64_t(1) << 30;
      if (isa_avx512() && d0 < lim && d0 > -lim && d0 - n > -lim) {
        score_mod_row_avx512(s, dcap, n, cap, alibi != nullptr, slope, d0);
        return;
      }
    }
#endif
    if (alibi == nullptr && dcap == nullptr) {
      for (int64_t j = 0; j < n; ++j) s[j] = modify_score(s[j], cap, acc_t(0), static_cast<acc_t*>(nullptr));
    } else if (alibi == nullptr) {
      for (int64_t j = 0; j < n; ++j) s[j] = modify_score(s[j], cap, acc_t(0), dcap + j);
    } else {
      for (int64_t j = 0; j < n; ++j)
        s[j] = modify_score(s[j], cap, alibi_bias(slope, w, i, j0 + j), dcap != nullptr ? dcap + j : nullptr);
    }
  }

  // Masks a row of scores s[0, n) of query i (head h) against keys j0 .. j0 + n: invisible
  // keys get -inf, the caller's float mask is added. `full`: the window hides nothing here.
  template <typename acc_t>
  void mask_row(acc_t* s, int64_t n, const Window& w, int64_t b, int64_t h, int64_t i, int64_t j0, bool full) const {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    if (!full) {
      mask_outside(s, n, key_lo(w, i) - j0, key_hi(w, i, j0 + n) - j0);
    }
    if (mask_bool) {
      const bool* m = mask_bool + b * m_sb + h * m_sh + i * m_si + j0 * m_sj;
      for (int64_t j = 0; j < n; ++j)
        if (!m[j * m_sj]) s[j] = ninf;
    } else if (mask_float) {
      const float* m = mask_float + b * m_sb + h * m_sh + i * m_si + j0 * m_sj;
      for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(m[j * m_sj]);
    }
  }
};

// Checks every argument of a forward/backward call and describes it. q/k/v may be replaced
// by copies with a contiguous last dimension and cu_seqlens and prefix_lens by contiguous
// copies; the caller keeps them alive while the Problem is used. `layout`, when given, receives the checked
// shapes (csrc/common/attention_checks.h).
Problem make_problem(at::Tensor& q, at::Tensor& k, at::Tensor& v, std::optional<at::Tensor>& cu_q,
                     std::optional<at::Tensor>& cu_k, std::optional<at::Tensor>& mask, double scale,
                     int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                     const std::optional<at::Tensor>& alibi_slopes, std::optional<at::Tensor>& prefix_lens,
                     double dropout_p, const std::optional<at::Tensor>& dropout_seed, Layout* layout = nullptr);

// float64 for float64 inputs, float32 otherwise.
at::ScalarType lse_dtype(const at::Tensor& q);

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& attn_mask, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& prefix_lens, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool deterministic);

}  // namespace cpu
}  // namespace attention
}  // namespace pk
