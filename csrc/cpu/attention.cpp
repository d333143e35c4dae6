// CPU kernels of the attention family: flash_attn_fwd, flash_attn_bwd (attention_bwd.cpp),
// flash_attn_kvcache. Layout (batch, seqlen, heads, head_dim) like FlashAttention, or packed
// (tokens, heads, head_dim) with int32 cu_seqlens (varlen).
//
// The approach
// ------------
// Attention is softmax(Q K^T * scale + mask) V per (sequence, head). Materialising the
// scores costs O(Sq * Sk) memory and, worse, streams that matrix through memory twice.
// Instead the forward pass walks over tiles: a block of query rows stays in cache (as
// float, pre-multiplied by the scale) together with its output accumulator O, and the keys
// go by in blocks of kBlockK. For each key block:
//   S = Q_blk K_blk^T                (tile GEMM against a packed key panel, see below)
//   soft-cap and ALiBi (csrc/common/attention.h) when asked, on every tile
//   mask S (window / causal / caller's mask) where the tile is not wholly visible
//   online softmax per row: m' = max(m, max S), P = exp(S - m'), l = l e^(m-m') + sum P,
//                            O = O e^(m-m') + P V_blk
// and at the end O / l is the output and m + log l the logsumexp (lse), the only thing the
// backward pass keeps besides the inputs and the output: extra memory O(B * H * Sq), plus
// a packed copy of K and V (the size of the inputs), never O(Sq * Sk).
// Tiles that the causal/window mask hides entirely are never visited: the visible keys
// of a query block form one interval (csrc/common/attention.h; a prefix-LM prefix only
// widens its right end), so the key loop runs over exactly that interval.
//
// The row block holds all query heads that share a key/value head (GQA/MQA) for a run of
// positions, so one packed key tile serves the whole group. Parallel work items are
// (sequence, kv head, query block), enough to keep the cores busy for batch 1.
//
// The backward pass (attention_bwd.cpp) recomputes P = exp(Q K^T * scale - lse) tile by
// tile from the saved lse instead of storing it, and runs over key blocks: a work item
// owns (sequence, kv head, a chunk of key blocks), keeps dK and dV of its key block in
// cache while the query blocks that see it go by, and accumulates dQ into a float buffer
// per chunk; the chunks' buffers are summed in a fixed order afterwards, so the result
// does not depend on the thread count and the pass is deterministic. Extra memory: Di,
// float copies of Q and dO laid out per head, and one float dQ buffer per chunk (more
// than one only when batch x kv heads is small).
//
// Decode (flash_attn_kvcache) writes the new keys and values into the cache in place, then
// runs the forward pass with per-sequence key lengths read from cache_seqlens. A paged cache
// (block_table) changes only where a key lives (Problem::k_row): the rows kernels read keys
// through a row accessor (StridedRows / PagedRows in attention_kernels.h) in the same order
// and groups, and the panels are packed one page at a time, so the result is the contiguous
// cache's bit for bit.
//
// Inner loops (attention_kernels.h), chosen per block at run time from the CPU's features:
//  - packed path: before the tiles, the keys of each (sequence, kv head) are packed once
//    into a transposed float panel (and the values into a contiguous one), so the tile
//    GEMMs read unit-stride rows; panel rows are padded so their stride is never a multiple
//    of 4 KiB. The tile GEMM is a register-blocked AVX-512 kernel (6 rows x 64 columns).
//  - bf16 path (AVX512-BF16): the bf16 inputs stay bf16, keys and values are packed in
//    pairs and both products go through gemm_bf16 (exact products, float sums): AMX tiles
//    (tdpbf16ps) where the CPU and the OS allow them, vdpbf16ps otherwise; P is rounded to
//    bf16 for the P V product, as FlashAttention does on GPUs. The backward does the same
//    for its five products (P and dS rounded to bf16; attention_bwd.cpp). The packing is
//    in-register 16x16 transposes; without score modifiers, float masks or dropout the
//    scaling, softmax and rounding of P take one pass per row (softmax_tile_bf16), and the
//    backward's P and dS one pass per pair of rows (the same bits as the separate passes).
//  - rows path: blocks of at most kSmallRows query rows (decode, short chunks) read the keys
//    in place with dot products, 16 keys per transposed reduction; when every sequence is
//    that short, decode_kernel walks the keys of all heads of a sequence together, in
//    address order, with software prefetch.
//  - portable loops for CPUs without AVX-512 (PK_CPU_ISA=generic forces them) and
//    for float64 (used by gradcheck), which accumulates in double.
// Accumulation is float everywhere else; the softmax statistics and the lse are float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/attention_checks.h"

#include "attention_impl.h"
#include "direct_calls.h"

namespace pk {
namespace attention {
namespace cpu {

namespace {

constexpr int64_t kRowsFwd = 64;   // query rows (positions x heads of a group) per forward block
constexpr int64_t kBlockK = 128;   // keys per forward tile
constexpr int64_t kSmallRows = 8;  // blocks this small (decode) read the keys in place, unpacked
constexpr int64_t kKeyPad = 16;    // packed key panels are padded to this many keys

enum class FwdPath {
  kPacked,      // keys packed transposed once per (sequence, kv head), tile GEMMs in acc_t
  kPackedBf16,  // bfloat16 kept, keys and values packed in pairs for vdpbf16ps
  kRows,        // few rows per block: dot products against the keys in place (AVX-512)
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Online softmax over one tile of scores S (R rows x nk keys, row stride lds; rows are
// g * np + r for query i0 + r of head h0 + g): masks, updates the running max m and sum l,
// rescales the output rows O (stride Dv), and leaves P = exp(S - m) in S.
template <typename acc_t>
void softmax_tile(const Problem& p, acc_t* S, int64_t lds, int64_t R, int64_t np, int64_t nk, const Window& w,
                  int64_t b, int64_t h0, int64_t i0, int64_t j0, bool full, acc_t* m, acc_t* l, acc_t* O) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool mod = p.has_score_mod();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / np, i = i0 + r % np;
    acc_t* s = S + r * lds;
    if (mod) p.modify_row(s, static_cast<acc_t*>(nullptr), nk, w, b, h0 + g, i, j0);
    if (!full || p.has_mask()) p.mask_row(s, nk, w, b, h0 + g, i, j0, full);
    const acc_t mnew = std::max(m[r], row_max(s, nk));
    if (mnew == ninf) {
      std::fill(s, s + nk, acc_t(0));
      continue;
    }
    const acc_t alpha = m[r] == ninf ? acc_t(0) : std::exp(m[r] - mnew);
    const acc_t sum = exp_sum(s, nk, mnew);
    l[r] = l[r] * alpha + sum;
    m[r] = mnew;
    if (alpha != acc_t(1)) scale_row(O + r * p.Dv, p.Dv, alpha);
  }
}

#if PK_X86
// softmax_tile for the bf16 forward on unscaled scores (scale > 0, no score modifier, no
// float mask, no dropout), writing P in bf16 to Pb (row stride lds, rows zero-padded to
// nkp) for the P V product: the window and boolean mask only set -inf, which scaling keeps,
// and max(scale s) = scale max(s), so the results are those of scale_row_avx512,
// softmax_tile and to_bf16_row, bit for bit, in one pass over each row instead of four.
void softmax_tile_bf16(const Problem& p, float* S, int64_t lds, int64_t R, int64_t np, int64_t nk, int64_t nkp,
                       const Window& w, int64_t b, int64_t h0, int64_t i0, int64_t j0, bool full, float scale, float* m,
                       float* l, float* O, uint16_t* Pb) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / np, i = i0 + r % np;
    float* s = S + r * lds;
    if (!full || p.has_mask()) p.mask_row(s, nk, w, b, h0 + g, i, j0, full);
    const float mnew = std::max(m[r], row_max_avx512(s, nk) * scale);
    if (mnew == ninf) {
      std::fill(Pb + r * lds, Pb + r * lds + nkp, uint16_t(0));
      continue;
    }
    const float alpha = m[r] == ninf ? 0.f : std::exp(m[r] - mnew);
    l[r] = l[r] * alpha + exp_row_bf16(s, nk, nkp, scale, mnew, Pb + r * lds);
    m[r] = mnew;
    if (alpha != 1.f) scale_row_avx512(O + r * p.Dv, p.Dv, alpha);
  }
}
#endif

// Writes O / l and the lse of R rows (see softmax_tile for the row order).
template <typename scalar_t, typename acc_t>
void finish_rows(const Problem& p, scalar_t* out, acc_t* lse, int64_t R, int64_t np, int64_t b, int64_t h0, int64_t i0,
                 const acc_t* m, const acc_t* l, const acc_t* O) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / np, i = i0 + r % np, h = h0 + g;
    const acc_t inv = l[r] > 0 ? p.dropout_scale<acc_t>() / l[r] : acc_t(0);
    store_row(out + ((p.tok_q(b) + i) * p.H + h) * p.Dv, O + r * p.Dv, p.Dv, inv);
    lse[p.lse_index(b, h, i)] = l[r] > 0 ? m[r] + std::log(l[r]) : -std::numeric_limits<acc_t>::infinity();
  }
}

#if PK_X86
constexpr int64_t kMinTasks = 8;       // decode work items to aim for (independent of threads)
constexpr int64_t kInlineDecodeWork = int64_t(1) << 17;  // multiply-adds below which decode stays on the caller's thread

// Decode and short chunks: every sequence's queries fit in one block of at most
// kSmallRows rows per kv head. A work item takes a sequence and a range of kv heads and
// walks the keys in short steps, all its heads per step, so that the rows of a
// (batch, seqlen, heads, dim) cache are read in address order.
template <typename scalar_t>
void decode_kernel(const Problem& p, scalar_t* out, float* lse) {
  // Same key steps as the forward's rows path, so that a sequence gets the same bits
  // either way (a short sequence inside a varlen batch takes the forward's rows path).
  const int64_t G = p.group(), D = p.D, Dv = p.Dv, Hk = p.Hk, BK = kBlockK;
  // A single decode token over a short cache is a few microseconds of work: run it here, in one
  // work item per sequence, rather than wake the thread pool, which costs as much. The heads are
  // independent, so any split gives the same bits.
  const bool here = p.batch * p.H * p.sq * p.sk * (D + Dv) <= kInlineDecodeWork;
  const int64_t n_split =
      here ? 1 : std::max<int64_t>(1, std::min(Hk, (kMinTasks + p.batch - 1) / std::max<int64_t>(1, p.batch)));
  const float scale = static_cast<float>(p.scale);
  const auto body = [&](int64_t t0, int64_t t1) {
    // Scratch kept per thread across calls: a decode step is a few microseconds, of which
    // six allocations and frees would be a good part.
    thread_local std::vector<float> Qf, O, m, l, S;
    thread_local std::vector<uint32_t> bits;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_split, sp = t % n_split;
      const int64_t hk0 = sp * Hk / n_split, hk1 = (sp + 1) * Hk / n_split, nh = hk1 - hk0;
      const int64_t lq = p.len_q(b), lk = p.len_k(b), np = lq, R = np * G;
      if (R == 0 || nh == 0) continue;
      const Window w = p.window(b);
      Qf.resize(nh * R * D);
      O.assign(nh * R * Dv, 0.f);
      m.assign(nh * R, -std::numeric_limits<float>::infinity());
      l.assign(nh * R, 0.f);
      S.resize(R * BK);
      for (int64_t hh = 0; hh < nh; ++hh)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r = 0; r < np; ++r)
            load_row(Qf.data() + (hh * R + g * np + r) * D, p.q_row<scalar_t>(b, r, (hk0 + hh) * G + g), D, scale);
      const int64_t kb = key_lo(w, 0), ke = key_hi(w, lq - 1, lk);
      for (int64_t j0 = kb; j0 < ke; j0 += BK) {
        const int64_t nk = std::min(BK, ke - j0);
        const bool full = tile_full(w, 0, lq, j0, j0 + nk, lk);
        for (int64_t hh = 0; hh < nh; ++hh) {
          const int64_t hk = hk0 + hh;
          p.with_rows<scalar_t>(p.k, b, j0, hk, [&](const auto& rows) {
            qk_rows_avx512<scalar_t>(R, nk, D, Qf.data() + hh * R * D, rows, S.data(), BK);
          });
          softmax_tile(p, S.data(), BK, R, np, nk, w, b, hk * G, 0, j0, full, m.data() + hh * R, l.data() + hh * R,
                       O.data() + hh * R * Dv);
          if (p.has_dropout()) p.dropout_rows(S.data(), BK, R, np, nk, b, hk * G, 0, j0, bits);
          p.with_rows<scalar_t>(p.v, b, j0, hk, [&](const auto& rows) {
            pv_rows_avx512<scalar_t>(R, nk, Dv, S.data(), BK, rows, O.data() + hh * R * Dv);
          });
        }
      }
      for (int64_t hh = 0; hh < nh; ++hh)
        finish_rows(p, out, lse, R, np, b, (hk0 + hh) * G, 0, m.data() + hh * R, l.data() + hh * R,
                    O.data() + hh * R * Dv);
    }
  };
  if (here) {
    body(0, p.batch * n_split);
  } else {
    at::parallel_for(0, p.batch * n_split, 1, body);
  }
}
#endif

template <typename scalar_t, typename acc_t>
void forward_kernel(const Problem& p, scalar_t* out, acc_t* lse) {
  const int64_t G = p.group(), D = p.D, Dv = p.Dv, Hk = p.Hk;
  const int64_t BQ = std::max<int64_t>(1, kRowsFwd / G);
  const int64_t BK = kBlockK;
  const acc_t scale = static_cast<acc_t>(p.scale);
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t Dp = round_up(D, 2);

  // Blocks of at most kSmallRows rows read the keys in place; the others use the packed
  // panels. The choice depends on the block alone, so a sequence gets the same result
  // whether it runs alone or packed with others (varlen).
  FwdPath packed_path = FwdPath::kPacked;
  bool rows_ok = false;
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    rows_ok = isa_avx512();
    if (std::is_same_v<scalar_t, c10::BFloat16> && isa_avx512bf16()) packed_path = FwdPath::kPackedBf16;
  }
#endif
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
    bool decode = rows_ok;
    for (int64_t b = 0; b < p.batch && decode; ++b) decode = p.len_q(b) <= BQ && p.len_q(b) * G <= kSmallRows;
    if (decode) {
      decode_kernel<scalar_t>(p, out, lse);
      return;
    }
  }
#endif
  bool need_pack = false;
  for (int64_t b = 0; b < p.batch && !need_pack; ++b) need_pack = !rows_ok || std::min(p.len_q(b), BQ) * G > kSmallRows;
  const FwdPath pack_path = need_pack ? packed_path : FwdPath::kRows;  // what the panels are packed for

  // Packed key/value panels per (sequence, kv head): offsets in padded keys.
  std::vector<int64_t> kofs(p.batch + 1, 0);
  // Panel rows are padded by kKeyPad more keys so that their stride is never a multiple of
  // 4 KiB: rows a power of two apart share L1 sets and evict each other inside the GEMM.
  for (int64_t b = 0; b < p.batch; ++b) kofs[b + 1] = kofs[b] + round_up(p.len_k(b), kKeyPad) + kKeyPad;
  const auto panel = [&](int64_t b, int64_t hk, int64_t width) {
    return (kofs[b] * Hk + hk * (kofs[b + 1] - kofs[b])) * width;
  };
  std::vector<acc_t> Kt_own, Vf_own;
  std::vector<uint16_t> Kp_own, Vp_own;
  acc_t *Kt_all = nullptr, *Vf_all = nullptr;
  uint16_t *Kp_all = nullptr, *Vp_all = nullptr;
  if (pack_path == FwdPath::kPacked) {
    Kt_all = scratch<acc_t>(0, kofs[p.batch] * Hk * D, Kt_own);
    Vf_all = scratch<acc_t>(1, kofs[p.batch] * Hk * Dv, Vf_own);
    at::parallel_for(0, p.batch * Hk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hk, hk = t % Hk, lk = p.len_k(b), skp = kofs[b + 1] - kofs[b];
        acc_t* kt = Kt_all + panel(b, hk, D);
        // keys [j0, j0 + n) in place one after another: all of them, or one page at a time
        const int64_t run = p.paged() ? p.page_size : std::max<int64_t>(lk, 1);
        for (int64_t j0 = 0; j0 < lk; j0 += run)
          load_transposed(kt + j0, skp, p.k_row<scalar_t>(b, j0, hk), p.k.ss, std::min(run, lk - j0), D);
        for (int64_t d = 0; d < D; ++d) std::fill(kt + d * skp + lk, kt + (d + 1) * skp, acc_t(0));
        {  // values as acc_t rows, contiguous
          acc_t* vf = Vf_all + panel(b, hk, Dv);
          for (int64_t j = 0; j < lk; ++j) load_row(vf + j * Dv, p.v_row<scalar_t>(b, j, hk), Dv);
          std::fill(vf + lk * Dv, vf + skp * Dv, acc_t(0));
        }
      }
    });
  } else if (pack_path == FwdPath::kPackedBf16) {
    Kp_all = scratch<uint16_t>(0, kofs[p.batch] * Hk * Dp, Kp_own);
    Vp_all = scratch<uint16_t>(1, kofs[p.batch] * Hk * Dv, Vp_own);
    std::fill(Kp_all, Kp_all + kofs[p.batch] * Hk * Dp, uint16_t(0));  // padding keys and dims read as 0
    std::fill(Vp_all, Vp_all + kofs[p.batch] * Hk * Dv, uint16_t(0));
    at::parallel_for(0, p.batch * Hk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hk, hk = t % Hk, lk = p.len_k(b), skp = kofs[b + 1] - kofs[b];
        uint16_t* kp = Kp_all + panel(b, hk, Dp);
        uint16_t* vp = Vp_all + panel(b, hk, Dv);
#if PK_X86
        if constexpr (sizeof(scalar_t) == 2) {
          // keys: kp[(d / 2) * 2 skp + 2 j + d % 2] = K[j][d], in runs of keys one stride apart
          // (all of them, or one page); values: pairs of keys interleaved,
          // vp[(j / 2) * 2 Dv + 2 d + j % 2] = V[j][d]
          const int64_t run = p.paged() ? p.page_size : std::max<int64_t>(lk, 1);
          for (int64_t j0 = 0; j0 < lk; j0 += run)
            pack_pairs_avx512(kp + 2 * j0, skp, reinterpret_cast<const uint16_t*>(p.k_row<scalar_t>(b, j0, hk)),
                              p.k.ss, std::min(run, lk - j0), D);
          for (int64_t j = 0; j < lk; j += 2)
            interleave_rows(vp + j * Dv, reinterpret_cast<const uint16_t*>(p.v_row<scalar_t>(b, j, hk)),
                            j + 1 < lk ? reinterpret_cast<const uint16_t*>(p.v_row<scalar_t>(b, j + 1, hk)) : nullptr,
                            Dv);
        }
#endif
      }
    });
  }

  struct Task {
    int64_t b, hk, i0;
  };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t lq = p.len_q(b);
    for (int64_t hk = 0; hk < Hk; ++hk)
      for (int64_t i0 = 0; i0 < lq; i0 += BQ) tasks.push_back({b, hk, i0});
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    const int64_t R_max = BQ * G;
    std::vector<acc_t> Qf(R_max * D), O(R_max * Dv), S(R_max * BK);
    std::vector<uint16_t> Qb(pack_path == FwdPath::kPackedBf16 ? R_max * Dp : 0), Pb(Qb.empty() ? 0 : R_max * BK);
    std::vector<acc_t> m(R_max), l(R_max);
    std::vector<uint32_t> bits;
    for (int64_t t = t0; t < t1; ++t) {
      const auto [b, hk, i0] = tasks[t];
      const int64_t lq = p.len_q(b), lk = p.len_k(b), skp = kofs[b + 1] - kofs[b];
      const int64_t i1 = std::min(i0 + BQ, lq), np = i1 - i0, R = np * G;
      const Window w = p.window(b);
      const FwdPath path = rows_ok && R <= kSmallRows ? FwdPath::kRows : packed_path;
      const bool fused_bf16 = path == FwdPath::kPackedBf16 && !p.has_score_mod() && p.mask_float == nullptr &&
                              !p.has_dropout() && scale > 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < np; ++r) {
          const scalar_t* src = p.q_row<scalar_t>(b, i0 + r, hk * G + g);
          if (path == FwdPath::kPackedBf16) {
            uint16_t* dst = Qb.data() + (g * np + r) * Dp;
            std::memcpy(dst, src, D * sizeof(uint16_t));
            if (Dp > D) dst[D] = 0;
          } else {
            load_row(Qf.data() + (g * np + r) * D, src, D, scale);
          }
        }
      std::fill(O.begin(), O.begin() + R * Dv, acc_t(0));
      std::fill(m.begin(), m.begin() + R, ninf);
      std::fill(l.begin(), l.begin() + R, acc_t(0));
      int64_t kb = key_lo(w, i0);
      const int64_t ke = key_hi(w, i1 - 1, lk);
      if (path != FwdPath::kRows) kb = kb / kKeyPad * kKeyPad;  // panel columns stay aligned
      for (int64_t j0 = kb; j0 < ke; j0 += BK) {
        const int64_t nk = std::min(BK, ke - j0);
        const bool full = tile_full(w, i0, i1, j0, j0 + nk, lk);
        // S = Q K^T (scaled)
        if (path == FwdPath::kPacked) {
          gemm<acc_t>(R, nk, D, Qf.data(), D, 1, Kt_all + panel(b, hk, D) + j0, skp, S.data(), BK, false);
        }
#if PK_X86
        if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
          if (path == FwdPath::kRows) {
            p.with_rows<scalar_t>(p.k, b, j0, hk, [&](const auto& rows) {
              qk_rows_avx512<scalar_t>(R, nk, D, Qf.data(), rows, S.data(), BK);
            });
          } else if (path == FwdPath::kPackedBf16) {
            gemm_bf16(R, nk, Dp / 2, Qb.data(), Dp, Kp_all + panel(b, hk, Dp) + 2 * j0, 2 * skp, S.data(), BK,
                      false);
            if (fused_bf16) {  // softmax and P in bf16 in one pass, then O += P V
              const int64_t nkp = round_up(nk, 2);
              softmax_tile_bf16(p, S.data(), BK, R, np, nk, nkp, w, b, hk * G, i0, j0, full, scale, m.data(), l.data(),
                                O.data(), Pb.data());
              gemm_bf16(R, Dv, nkp / 2, Pb.data(), BK, Vp_all + panel(b, hk, Dv) + j0 * Dv, 2 * Dv, O.data(), Dv,
                        true);
              continue;
            }
            for (int64_t r = 0; r < R; ++r) scale_row_avx512(S.data() + r * BK, nk, scale);
          }
        }
#endif
        // online softmax
        softmax_tile(p, S.data(), BK, R, np, nk, w, b, hk * G, i0, j0, full, m.data(), l.data(), O.data());
        // dropout: P V with the dropped entries of P zeroed (the statistics m, l stay without it)
        if (p.has_dropout()) p.dropout_rows(S.data(), BK, R, np, nk, b, hk * G, i0, j0, bits);
        // O += P V
        if (path == FwdPath::kPacked) {
          const acc_t* Vp = Vf_all + panel(b, hk, Dv) + j0 * Dv;
          const int64_t ldv = Dv;
          gemm<acc_t>(R, Dv, nk, S.data(), BK, 1, Vp, ldv, O.data(), Dv, true);
        }
#if PK_X86
        if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
          if (path == FwdPath::kRows) {
            p.with_rows<scalar_t>(p.v, b, j0, hk, [&](const auto& rows) {
              pv_rows_avx512<scalar_t>(R, nk, Dv, S.data(), BK, rows, O.data());
            });
          } else if (path == FwdPath::kPackedBf16) {
            const int64_t nkp = round_up(nk, 2);
            for (int64_t r = 0; r < R; ++r) to_bf16_row(Pb.data() + r * BK, S.data() + r * BK, nk, nkp);
            gemm_bf16(R, Dv, nkp / 2, Pb.data(), BK, Vp_all + panel(b, hk, Dv) + j0 * Dv, 2 * Dv, O.data(),
                      Dv, true);
          }
        }
#endif
      }
      finish_rows(p, out, lse, R, np, b, hk * G, i0, m.data(), l.data(), O.data());
    }
  });
}

// ---- argument checks ------------------------------------------------------------------

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// The values of cu_seqlens (its shape is checked by check_layout): the CPU reads them on the
// host, so malformed offsets raise here.
void check_cu_seqlens_values(const at::Tensor& cu, const char* name, int64_t batch, int64_t total) {
  const at::Tensor c = cu.contiguous();
  const int32_t* x = c.data_ptr<int32_t>();
  TORCH_CHECK(x[0] == 0, name, ": expected to start at 0, got ", x[0]);
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(x[b + 1] >= x[b], name, ": expected non-decreasing offsets, got ", x[b], " then ", x[b + 1],
                " at index ", b + 1);
  TORCH_CHECK(x[batch] == total, name, ": expected to end at the token count ", total, ", got ", x[batch]);
}

Operand operand(const at::Tensor& t, bool varlen) {
  Operand o;
  o.ptr = t.data_ptr();
  if (varlen) {
    o.sb = 0;
    o.ss = t.stride(0);
    o.sh = t.stride(1);
  } else {
    o.sb = t.stride(0);
    o.ss = t.stride(1);
    o.sh = t.stride(2);
  }
  return o;
}

}  // namespace

// Builds the problem and checks every argument; q/k/v may be replaced by copies whose last
// dimension is contiguous, cu_seqlens by contiguous ones (the caller keeps them alive).
Problem make_problem(at::Tensor& q, at::Tensor& k, at::Tensor& v, std::optional<at::Tensor>& cu_q,
                     std::optional<at::Tensor>& cu_k, std::optional<at::Tensor>& mask, double scale,
                     int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                     const std::optional<at::Tensor>& alibi_slopes, std::optional<at::Tensor>& prefix_lens,
                     double dropout_p, const std::optional<at::Tensor>& dropout_seed, Layout* layout) {
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor, got one on ", q.device());
  const Layout l = check_layout(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, q.device(), true);
  if (layout != nullptr) *layout = l;
  Problem p;
  p.batch = l.batch;
  p.H = l.H;
  p.Hk = l.Hk;
  p.D = l.D;
  p.Dv = l.Dv;
  p.sq = l.sq;
  p.sk = l.sk;
  p.total_q = l.total_q;
  if (l.varlen) {
    check_cu_seqlens_values(*cu_q, "cu_seqlens_q", p.batch, q.size(0));
    check_cu_seqlens_values(*cu_k, "cu_seqlens_k", p.batch, k.size(0));
    *cu_q = cu_q->contiguous();
    *cu_k = cu_k->contiguous();
    p.cu_q = cu_q->data_ptr<int32_t>();
    p.cu_k = cu_k->data_ptr<int32_t>();
    for (int64_t b = 0; b < p.batch; ++b) {  // the longest sequences (tile counts)
      p.sq = std::max<int64_t>(p.sq, p.cu_q[b + 1] - p.cu_q[b]);
      p.sk = std::max<int64_t>(p.sk, p.cu_k[b + 1] - p.cu_k[b]);
    }
  }
  q = last_dim_contiguous(q);
  k = last_dim_contiguous(k);
  v = last_dim_contiguous(v);
  p.q = operand(q, l.varlen);
  p.k = operand(k, l.varlen);
  p.v = operand(v, l.varlen);
  if (mask.has_value()) set_attn_mask(p, *mask);
  p.scale = scale;
  p.window_left = l.window_left;
  p.window_right = l.window_right;
  p.bottom_right = bottom_right;
  set_score_mods(p, softcap, alibi_slopes, q.scalar_type(), q.device(), true);
  set_prefix_lens(p, prefix_lens, l.batch, q.device());
  // the CPU reads them on the host: a length outside the sequence's keys raises here
  if (p.prefix_lens) check_prefix_lens_values(p.prefix_lens, p.batch, [&](int64_t b) { return p.len_k(b); });
  set_dropout(p, dropout_p, dropout_seed, q.device(), true);
  return p;
}

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void run_forward(const Problem& p, const at::Tensor& q, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(p, out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in,
                                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                                      const std::optional<at::Tensor>& cu_seqlens_k,
                                                      const std::optional<at::Tensor>& attn_mask, int64_t max_seqlen_q,
                                                      int64_t max_seqlen_k, double scale, int64_t window_left,
                                                      int64_t window_right, bool bottom_right, double softcap,
                                                      const std::optional<at::Tensor>& alibi_slopes,
                                                      const std::optional<at::Tensor>& prefix_lens, double dropout_p,
                                                      const std::optional<at::Tensor>& dropout_seed) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;  // the CPU kernel reads the lengths from cu_seqlens
  at::Tensor q = q_in, k = k_in, v = v_in;
  std::optional<at::Tensor> cu_q = cu_seqlens_q, cu_k = cu_seqlens_k, mask = attn_mask, prefix = prefix_lens;
  const Problem p = make_problem(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, bottom_right, softcap,
                                 alibi_slopes, prefix, dropout_p, dropout_seed);
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.Dv;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = cu_q.has_value() ? at::empty({p.H, p.total_q}, q.options().dtype(lse_dtype(q)))
                                    : at::empty({p.batch, p.H, p.sq}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  run_forward(p, q, out, lse);
  return {out, lse};
}

// Writes rows [pos, pos + n) of src (a (seqlen_new, kv_heads, head_dim) slice) into row b of
// a cache: one copy, or one per page when paged.
void append_rows(at::Tensor& cache, const at::Tensor& src, int64_t b, int64_t pos, const int32_t* pages,
                 int64_t page_size) {
  const int64_t n = src.size(0);
  if (pages == nullptr) {
    cache[b].narrow(0, pos, n).copy_(src);
    return;
  }
  for (int64_t t = 0; t < n;) {
    const int64_t slot = (pos + t) % page_size, take = std::min(n - t, page_size - slot);
    cache[pages[(pos + t) / page_size]].narrow(0, slot, take).copy_(src.narrow(0, t, take));
    t += take;
  }
}

std::tuple<at::Tensor, at::Tensor> flash_attn_kvcache_cpu(const at::Tensor& q_in, at::Tensor& k_cache,
                                                          at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                          const std::optional<at::Tensor>& k_new,
                                                          const std::optional<at::Tensor>& v_new, double scale,
                                                          bool causal, int64_t window_left, int64_t window_right,
                                                          const std::optional<at::Tensor>& block_table, double softcap,
                                                          const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q_in.device().is_cpu(), "q: expected a CPU tensor, got one on ", q_in.device());
  const KvCacheLayout c = check_kvcache(q_in, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, window_left,
                                        window_right, block_table, q_in.device());
  const int64_t B = q_in.size(0), s_new = c.s_new;
  // Checks q against the caches (dtypes, heads, head dims) before anything is written.
  at::Tensor q = q_in, k = kvcache_layout_view(k_cache, B, c.paged), v = kvcache_layout_view(v_cache, B, c.paged);
  std::optional<at::Tensor> none_q, none_k, none_mask, none_prefix;
  Problem p = make_problem(q, k, v, none_q, none_k, none_mask, scale, c.window_left, c.window_right, true, softcap,
                           alibi_slopes, none_prefix, 0.0, std::nullopt);
  p.window_left = c.window_left;  // check_layout clamps against the view's length; the rows hold c.capacity
  p.window_right = c.window_right;
  p.sk = c.capacity;
  const at::Tensor table = c.paged ? block_table->contiguous() : at::Tensor();
  if (c.paged) {
    p.k = operand(k_cache, false);
    p.v = operand(v_cache, false);
    p.block_table = table.data_ptr<int32_t>();
    p.bt_sb = table.size(1);
    p.page_size = c.page_size;
  }
  // A row that does not fit (cache_rows_fit in csrc/common/attention.h) is neither written nor
  // attended: its key count is 0 and its outputs NaN, as on CUDA. A row that uses a block id
  // outside [0, num_blocks) raises here (the CUDA kernels, which cannot, give it the same rule
  // as a row that does not fit: first_bad_page).
  const at::Tensor lens = cache_seqlens.contiguous();
  std::vector<int32_t> keys(B);
  std::vector<int64_t> overflow;
  std::vector<char> fit(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens.data_ptr<int32_t>()[b];
    const bool fits = cache_rows_fit(len, s_new, c.capacity);
    fit[b] = fits;
    if (fits && c.paged) {
      const int32_t* pages = p.block_table + b * p.bt_sb;
      const int64_t bad = first_bad_page(pages, len + s_new, c.page_size, c.num_blocks);
      TORCH_CHECK(bad < 0, "block_table: row ", b, " uses block id ", bad < 0 ? 0 : pages[bad], " at index ", bad,
                  " (positions ", bad * c.page_size, " to ", (bad + 1) * c.page_size - 1,
                  "), outside [0, num_blocks = ", c.num_blocks, ")");
    }
    keys[b] = fits ? static_cast<int32_t>(len + s_new) : 0;
    if (!fits) overflow.push_back(b);
  }
  if (s_new > 0)  // after every check: a call that raises writes nothing
    for (int64_t b = 0; b < B; ++b) {
      if (!fit[b]) continue;
      const int64_t pos = keys[b] - s_new;
      const int32_t* pages = c.paged ? p.block_table + b * p.bt_sb : nullptr;
      append_rows(k_cache, (*k_new)[b], b, pos, pages, c.page_size);
      append_rows(v_cache, (*v_new)[b], b, pos, pages, c.page_size);
    }
  p.seqlens_k = keys.data();
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.Dv;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty({p.batch, p.H, p.sq}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  run_forward(p, q, out, lse);
  for (int64_t b : overflow) {
    out[b].fill_(std::numeric_limits<double>::quiet_NaN());
    lse[b].fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return {out, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, int64_t window_right, bool bottom_right) {
  return flash_attn_fwd_cpu(q, k, v, std::nullopt, std::nullopt, std::nullopt, -1, -1, scale, -1, window_right,
                            bottom_right,
                            0.0, std::nullopt, std::nullopt, 0.0, std::nullopt);
}

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
  m.impl("flash_attn_kvcache", &flash_attn_kvcache_cpu);
}

}  // namespace cpu
}  // namespace attention
}  // namespace pk
