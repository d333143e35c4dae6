// CPU backward of flash attention (see the essay at the top of attention.cpp).
//
// With P = softmax(S), S = Q K^T * scale (+ mask), O = P V and Di = rowsum(dO * O):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Di),  dQ = scale * dS K,  dK = scale * dS^T Q.
// With a soft-cap the recomputed scores go through the same modify_score as the forward's and
// dS is multiplied by the cap's derivative 1 - tanh^2 (kept per tile element); the ALiBi bias
// is a constant per element and needs nothing more.
// bfloat16 inputs (AVX512-BF16) run all five products on bf16 operands through gemm_bf16 (AMX
// tiles where available), P and dS rounded to bf16 for dV, dK and dQ, with dV and dK kept
// transposed (see use_bf16 below).
// P is recomputed per tile as exp(S - lse). Q is loaded pre-multiplied by the scale, which
// makes dK = dS^T (scale Q) come out already scaled. When the caller also needs the
// gradient of the lse (return_lse=True), d lse_i / d S_ij = P_ij folds into Di -= dlse_i.
//
// With attention dropout (csrc/common/attention_dropout.h) the keep mask of each tile row is
// regenerated (never stored) as a factor M = keep * 65536 / (65536 - threshold):
//   dV = (P M)^T dO,  dS = P * (dP M - Di),
// Di still rowsum(dO * O): the saved output already contains the dropout.
//
// Work items are (sequence, kv head, chunk of key blocks). An item keeps the float dK, dV
// of one key block (and the key block itself, plain and transposed) while the query
// blocks that see it go by, for every query head of the group, and adds its dS K into a
// float dQ buffer of its chunk. The number of chunks depends only on the problem size
// (enough items for the cores when batch x kv heads is small), and the chunk buffers are
// summed in chunk order, so the gradients do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_impl.h"

namespace pk {
namespace attention {
namespace cpu {

namespace {

constexpr int64_t kBlockQ = 64;   // query rows per backward tile
constexpr int64_t kBlockKb = 64;  // keys per backward tile (and per dK/dV block)
constexpr int64_t kMinItems = 8;  // split key blocks into chunks until there are this many items

// The rows j < n of src (row stride rs, `cols` values each) as bf16 pairs along the
// columns: dst[(c / 2) * 2 * ld + 2 * j + c % 2], odd column counts padded with zero.
template <typename scalar_t>
void pack_pairs(uint16_t* dst, int64_t ld, const scalar_t* src, int64_t rs, int64_t n, int64_t cols) {
  if (cols % 2) std::fill(dst + (cols / 2) * 2 * ld, dst + (cols / 2 + 1) * 2 * ld, uint16_t(0));
#if PK_X86
  if constexpr (sizeof(scalar_t) == 2) {
    pack_pairs_avx512(dst, ld, reinterpret_cast<const uint16_t*>(src), rs, n, cols);
    return;
  }
#endif
  (void)ld, (void)src, (void)rs, (void)n;
  TORCH_CHECK(false, "flash_attn_bwd: the bf16 path needs 16-bit inputs and AVX512-BF16");
}

// Keys j and j + 1 (a zero key when j + 1 == end) interleaved: dst[2 d + (0, 1)] = K[j, j + 1][d].
// pack_pairs and this run only on the bf16 path (use_bf16: bfloat16 inputs, AVX512-BF16).
template <typename scalar_t>
void interleave_key_pair(uint16_t* dst, const Problem& p, int64_t b, int64_t j, int64_t end, int64_t hk, int64_t D) {
  const uint16_t* k0 = reinterpret_cast<const uint16_t*>(p.k_row<scalar_t>(b, j, hk));
  const uint16_t* k1 = j + 1 < end ? reinterpret_cast<const uint16_t*>(p.k_row<scalar_t>(b, j + 1, hk)) : nullptr;
#if PK_X86
  if constexpr (sizeof(scalar_t) == 2) {
    interleave_rows(dst, k0, k1, D);
    return;
  }
#endif
  (void)dst, (void)k0, (void)k1, (void)D;
  TORCH_CHECK(false, "flash_attn_bwd: the bf16 path needs 16-bit inputs and AVX512-BF16");
}

template <typename scalar_t>
void copy_padded(uint16_t* dst, const scalar_t* src, int64_t n, int64_t n_pad) {
  std::memcpy(dst, src, n * sizeof(uint16_t));
  for (int64_t i = n; i < n_pad; ++i) dst[i] = 0;
}

// C[r, j] = scale * sum over pairs of A(r) . B(j) (bf16 pairs, see pack_pairs); float only.
template <typename acc_t>
void qk_bf16(int64_t M, int64_t N, int64_t KP, const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ld,
             acc_t* C, int64_t ldc, float scale) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    gemm_bf16(M, N, KP, A, lda, Bp, 2 * ld, C, ldc, false);
    if (scale != 1.f)
      for (int64_t r = 0; r < M; ++r) scale_row_avx512(C + r * ldc, N, scale);
    return;
  }
#endif
  (void)M, (void)N, (void)KP, (void)A, (void)lda, (void)Bp, (void)ld, (void)C, (void)ldc, (void)scale;
  TORCH_CHECK(false, "flash_attn_bwd: the bf16 dot-product path needs float accumulation and AVX512-BF16");
}

// The bf16 products of the backward (float accumulation only; the callers take them when
// use_bf16, which needs AVX512-BF16).
template <typename acc_t>
void bf16_gemm(int64_t M, int64_t N, int64_t KP, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
               acc_t* C, int64_t ldc, bool accumulate) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    gemm_bf16(M, N, KP, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
#endif
  (void)M, (void)N, (void)KP, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)accumulate;
  TORCH_CHECK(false, "flash_attn_bwd: the bf16 path needs float accumulation and AVX512-BF16");
}

// dst = rows r < R of src (n floats each) in bf16, interleaved in pairs of rows (to_bf16_row_pairs).
template <typename acc_t>
void bf16_pv_dv(uint16_t* dst, int64_t ldd, const acc_t* src, int64_t lds, int64_t R, int64_t n) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    to_bf16_row_pairs(dst, ldd * 2, src, lds, R, n);
    return;
  }
#endif
  (void)dst, (void)ldd, (void)src, (void)lds, (void)R, (void)n;
}

// The fused bf16 rows of the plain backward (no score modifier, float mask or dropout), two
// query rows at a time (exp_rows_bf16_pair, ds_rows_bf16_pair); float accumulation only.
// P: S[r] (unscaled scores, masked) -> exp(scale S[r] - L[r]) in place, and in bf16 to Pv.
template <typename acc_t>
void bf16_p_rows(acc_t* S, int64_t lds, const acc_t* L, int64_t R, int64_t n, acc_t scale, uint16_t* Pv) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t r = 0; r < R; r += 2)
      exp_rows_bf16_pair(S + r * lds, r + 1 < R ? S + (r + 1) * lds : nullptr, n, scale, L[r], r + 1 < R ? L[r + 1] : 0.f,
                         Pv + r * lds);
    return;
  }
#endif
  (void)S, (void)lds, (void)L, (void)R, (void)n, (void)scale, (void)Pv;
}

// dS[r] = P[r] (dP[r] - Di[r]) in bf16, as rows (dSb, padded to even n) and in pairs of rows (dSv).
template <typename acc_t>
void bf16_ds_rows(const acc_t* dP, const acc_t* P, int64_t lds, const acc_t* Di, int64_t R, int64_t n, uint16_t* dSb,
                  uint16_t* dSv) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t r = 0; r < R; r += 2) {
      const bool two = r + 1 < R;
      ds_rows_bf16_pair(dP + r * lds, two ? dP + (r + 1) * lds : nullptr, P + r * lds, two ? P + (r + 1) * lds : nullptr,
                        n, (n + 1) / 2 * 2, Di[r], two ? Di[r + 1] : 0.f, dSb + r * lds,
                        two ? dSb + (r + 1) * lds : nullptr, dSv + r * lds);
    }
    return;
  }
#endif
  (void)dP, (void)P, (void)lds, (void)Di, (void)R, (void)n, (void)dSb, (void)dSv;
}

// dst = rows r < R of src (n floats each) in bf16, each padded with a zero to even n.
template <typename acc_t>
void bf16_rows(uint16_t* dst, int64_t ldd, const acc_t* src, int64_t lds, int64_t R, int64_t n) {
#if PK_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t r = 0; r < R; ++r) to_bf16_row(dst + r * ldd, src + r * lds, n, (n + 1) / 2 * 2);
    return;
  }
#endif
  (void)dst, (void)ldd, (void)src, (void)lds, (void)R, (void)n;
}

// Writes the nk keys from j0 of a key block's dK (times scale) and dV: [dim][key] (row
// stride BK) when bf16, [key][dim] otherwise.
template <typename scalar_t, typename acc_t>
void store_dk_dv(const Problem& p, int64_t b, int64_t j0, int64_t nk, int64_t hk, acc_t scale, bool use_bf16,
                 const acc_t* dK, const acc_t* dV, int64_t BK, scalar_t* dk, scalar_t* dv) {
  const int64_t D = p.D, Dv = p.Dv, Hk = p.Hk, tok0 = p.tok_k(b) + j0;
#if PK_X86
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (use_bf16) {
      store_transposed_bf16(dk + (tok0 * Hk + hk) * D, Hk * D, dK, BK, nk, D, scale);
      store_transposed_bf16(dv + (tok0 * Hk + hk) * Dv, Hk * Dv, dV, BK, nk, Dv, 1.f);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t tok = tok0 + j;
    if (use_bf16) {  // dK^T, dV^T: [dim][key], row stride BK
      scalar_t* dkr = dk + (tok * Hk + hk) * D;
      scalar_t* dvr = dv + (tok * Hk + hk) * Dv;
      for (int64_t d = 0; d < D; ++d) dkr[d] = static_cast<scalar_t>(dK[d * BK + j] * scale);
      for (int64_t d = 0; d < Dv; ++d) dvr[d] = static_cast<scalar_t>(dV[d * BK + j]);
    } else {
      store_row(dk + (tok * Hk + hk) * D, dK + j * D, D);
      store_row(dv + (tok * Hk + hk) * Dv, dV + j * Dv, Dv);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const Problem& p, const scalar_t* dout, const scalar_t* out, const acc_t* lse, const acc_t* dlse,
                     scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  const int64_t G = p.group(), D = p.D, Dv = p.Dv, H = p.H, Hk = p.Hk;
  const int64_t BQ = kBlockQ, BK = kBlockKb;
  const acc_t scale = static_cast<acc_t>(p.scale);
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool mod = p.has_score_mod();

  // Di = rowsum(dO * O) - dlse, laid out like lse.
  std::vector<acc_t> Di(static_cast<size_t>(H * p.total_q));
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lq = p.len_q(b);
      for (int64_t i = 0; i < lq; ++i)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t off = ((p.tok_q(b) + i) * H + h) * Dv;
          // in double: dS = P (dP - Di) cancels, Di should carry no extra error
          const double s = dot_f64(dout + off, out + off, Dv);
          const int64_t li = p.lse_index(b, h, i);
          Di[li] = static_cast<acc_t>(s - (dlse ? static_cast<double>(dlse[li]) : 0.0));
        }
    }
  });

  int64_t max_kb = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_kb = std::max(max_kb, num_blocks(p.len_k(b), BK));
  const int64_t items = std::max<int64_t>(1, p.batch * Hk);
  const int64_t n_chunks = std::max<int64_t>(1, std::min(max_kb, (kMinItems + items - 1) / items));
  // dQ accumulators, Q (times the scale) and dO as per-head panels [head][token][dim]:
  // converted once, read with unit row stride by every key block.
  const int64_t q_elems = p.total_q * H * D;
  std::vector<acc_t> dq_own;
  acc_t* dq_acc = scratch<acc_t>(4, static_cast<size_t>(n_chunks * q_elems), dq_own);
  std::fill(dq_acc, dq_acc + n_chunks * q_elems, acc_t(0));
  // bfloat16 inputs: all five products take the bf16 values with gemm_bf16 (AMX tiles or
  // vdpbf16ps: exact products, float sums), S = Q K^T and dP = dO V^T straight from the inputs,
  // the other three with P and dS rounded to bf16 as FlashAttention does on GPUs:
  //   dV^T += dO^T (P),  dK^T += Q^T dS  (the pair index along the queries),  dQ += dS K.
  // dV and dK are accumulated transposed ([dim][key]), so that the query blocks' P and dS
  // serve as B operands (two rows interleaved per pair) and Q^T, dO^T come from panels built
  // once: per head [dim][query pair] (Qt_all, dOt_all), each sequence starting at an even
  // column (qofs), with a zero column after an odd length. Query blocks then start at an even
  // query (a row before the first one that sees the key block sees none of it: P = 0).
  bool use_bf16 = false;
#if PK_X86
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) use_bf16 = isa_avx512bf16();
#endif
  const int64_t Dp = (D + 1) / 2 * 2, Dvp = (Dv + 1) / 2 * 2, T = p.total_q;
  std::vector<int64_t> qofs(p.batch + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b) qofs[b + 1] = qofs[b] + (p.len_q(b) + 1) / 2 * 2;
  // Panel rows are padded by 32 columns (64 bytes) so that their stride is never a multiple of
  // 4 KiB: the 16 rows of a tile load would share L1 sets.
  const int64_t Tp = qofs[p.batch] + ((qofs[p.batch] + 32) % 2048 == 0 ? 64 : 32);
  // (every row of these panels is written below before it is read)
  std::vector<acc_t> Qs_own, dO_own;
  std::vector<uint16_t> Qb_own, dOb_own, Qt_own, dOt_own;
  acc_t* Qs_all = use_bf16 ? nullptr : scratch<acc_t>(2, static_cast<size_t>(H * T * D), Qs_own);
  acc_t* dO_all = use_bf16 ? nullptr : scratch<acc_t>(3, static_cast<size_t>(H * T * Dv), dO_own);
  // bf16 Q and dO rows of even length serve as A operands in place (rows q.ss and H Dv apart);
  // odd ones are copied with a zero pad.
  const bool q_in_place = D % 2 == 0, do_in_place = Dv % 2 == 0;
  uint16_t* Qb_all = use_bf16 && !q_in_place ? scratch<uint16_t>(2, static_cast<size_t>(H * T * Dp), Qb_own) : nullptr;
  uint16_t* dOb_all = use_bf16 && !do_in_place ? scratch<uint16_t>(3, static_cast<size_t>(H * T * Dvp), dOb_own) : nullptr;
  uint16_t* Qt_all = use_bf16 ? scratch<uint16_t>(5, static_cast<size_t>(H * D * Tp), Qt_own) : nullptr;
  uint16_t* dOt_all = use_bf16 ? scratch<uint16_t>(6, static_cast<size_t>(H * Dv * Tp), dOt_own) : nullptr;
  at::parallel_for(0, p.batch * H, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, tok0 = p.tok_q(b);
      for (int64_t i = 0; i < p.len_q(b); ++i) {
        const scalar_t* qr = p.q_row<scalar_t>(b, i, h);
        const scalar_t* dor = dout + ((tok0 + i) * H + h) * Dv;
        if (use_bf16) {
          if (!q_in_place) copy_padded(Qb_all + (h * T + tok0 + i) * Dp, qr, D, Dp);
          if (!do_in_place) copy_padded(dOb_all + (h * T + tok0 + i) * Dvp, dor, Dv, Dvp);
        } else {
          load_row(Qs_all + (h * T + tok0 + i) * D, qr, D, scale);
          load_row(dO_all + (h * T + tok0 + i) * Dv, dor, Dv);
        }
      }
#if PK_X86
      if constexpr (sizeof(scalar_t) == 2) {
        if (use_bf16) {
          transpose_pairs(Qt_all + h * D * Tp + qofs[b], Tp, p.q_row<scalar_t>(b, 0, h), p.q.ss, p.len_q(b), D);
          transpose_pairs(dOt_all + h * Dv * Tp + qofs[b], Tp, dout + (tok0 * H + h) * Dv, H * Dv, p.len_q(b), Dv);
        }
      }
#endif
    }
  });

  at::parallel_for(0, p.batch * Hk * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    // dK, dV: [key][dim], or transposed [dim][key] (row stride BK) when bf16
    std::vector<acc_t> Kf(use_bf16 ? 0 : BK * D), Kt(use_bf16 ? 0 : D * BK), Vt(use_bf16 ? 0 : Dv * BK),
        dK(BK * D), dV(BK * Dv);
    std::vector<acc_t> S(BQ * BK), dP(BQ * BK), dCap(p.softcap > 0 ? BQ * BK : 0);
    std::vector<uint16_t> Kp(use_bf16 ? Dp * BK : 0), Vp(use_bf16 ? Dvp * BK : 0);
    // bf16: keys in pairs of keys (dQ's B), P and dS in pairs of queries (B of dV^T, dK^T) and dS
    // in pairs of keys (dQ's A)
    std::vector<uint16_t> Kv(use_bf16 ? (BK + 1) * D : 0), Pv(use_bf16 ? (BQ + 1) * BK : 0),
        dSv(use_bf16 ? (BQ + 1) * BK : 0), dSb(use_bf16 ? BQ * BK : 0);
    const bool drop = p.has_dropout();
    std::vector<acc_t> Dm(drop ? BQ * BK : 0), Pd(drop ? BQ * BK : 0);  // dropout factors, P M
    // the fused bf16 path (plain attention): lse and Di of the block's rows
    const bool fused = use_bf16 && !mod && p.mask_float == nullptr && !drop;
    std::vector<acc_t> Lr(fused ? BQ : 0), Dr(fused ? BQ : 0);
    std::vector<uint32_t> bits;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % n_chunks, hk = (t / n_chunks) % Hk, b = t / (n_chunks * Hk);
      const int64_t lq = p.len_q(b), lk = p.len_k(b);
      const int64_t nkb = num_blocks(lk, BK);
      const int64_t kb0 = c * nkb / n_chunks, kb1 = (c + 1) * nkb / n_chunks;
      const Window w = p.window(b);
      acc_t* dq_c = dq_acc + c * q_elems;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t j0 = kb * BK, nk = std::min(BK, lk - j0);
        const int64_t nkp = (nk + 1) / 2 * 2;
        if (use_bf16) {
          pack_pairs(Kp.data(), BK, p.k_row<scalar_t>(b, j0, hk), p.k.ss, nk, D);
          pack_pairs(Vp.data(), BK, p.v_row<scalar_t>(b, j0, hk), p.v.ss, nk, Dv);
          // Kv[(j / 2) * 2 D + 2 d + j % 2] = K[j][d], a zero key after odd nk
          for (int64_t j = 0; j < nkp; j += 2) interleave_key_pair<scalar_t>(Kv.data() + j * D, p, b, j0 + j, j0 + nk, hk, D);
        } else {
          for (int64_t j = 0; j < nk; ++j) load_row(Kf.data() + j * D, p.k_row<scalar_t>(b, j0 + j, hk), D);
          load_transposed(Kt.data(), BK, p.k_row<scalar_t>(b, j0, hk), p.k.ss, nk, D);
          load_transposed(Vt.data(), BK, p.v_row<scalar_t>(b, j0, hk), p.v.ss, nk, Dv);
        }
        std::fill(dK.begin(), dK.end(), acc_t(0));
        std::fill(dV.begin(), dV.end(), acc_t(0));
        const int64_t qhi = query_hi(w, j0 + nk, lq);
        int64_t qlo = query_lo(w, j0, lq);
        if (use_bf16) qlo = qlo / 2 * 2;  // pairs of queries start at an even query (see above)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          for (int64_t i0 = qlo; i0 < qhi; i0 += BQ) {
            const int64_t i1 = std::min(i0 + BQ, qhi), np = i1 - i0;
            if (!tile_any(w, i0, i1, j0, j0 + nk, lk)) continue;
            const bool full = tile_full(w, i0, i1, j0, j0 + nk, lk);
            const int64_t row0 = h * T + p.tok_q(b) + i0;  // panel row of query i0, head h
            const acc_t* Qf = use_bf16 ? nullptr : Qs_all + row0 * D;
            const acc_t* dOf = use_bf16 ? nullptr : dO_all + row0 * Dv;
            const int64_t col0 = qofs[b] + i0, npp = (np + 1) / 2;  // bf16: panel column of query i0, query pairs
            // bf16 A operands of S = Q K^T and dP = dO V^T
            const uint16_t* Qa = !use_bf16 ? nullptr
                                 : q_in_place ? reinterpret_cast<const uint16_t*>(p.q_row<scalar_t>(b, i0, h))
                                              : Qb_all + row0 * Dp;
            const uint16_t* dOa = !use_bf16 ? nullptr
                                  : do_in_place ? reinterpret_cast<const uint16_t*>(dout + ((p.tok_q(b) + i0) * H + h) * Dv)
                                                : dOb_all + row0 * Dvp;
            const int64_t lda_q = q_in_place ? p.q.ss : Dp, lda_do = do_in_place ? H * Dv : Dvp;
            if (fused) {  // S unscaled, masked; P = exp(scale S - lse) in place and in bf16 pairs
              bf16_gemm(np, nk, Dp / 2, Qa, lda_q, Kp.data(), 2 * BK, S.data(), BK, false);
              for (int64_t r = 0; r < np; ++r) {
                if (!full || p.has_mask()) p.mask_row(S.data() + r * BK, nk, w, b, h, i0 + r, j0, full);
                Lr[r] = lse[p.lse_index(b, h, i0 + r)];
                Dr[r] = Di[p.lse_index(b, h, i0 + r)];
              }
              bf16_p_rows(S.data(), BK, Lr.data(), np, nk, scale, Pv.data());
              bf16_gemm(Dv, nk, npp, dOt_all + h * Dv * Tp + col0, Tp, Pv.data(), 2 * BK, dV.data(), BK, true);
              // dP = dO V^T; dS = P (dP - Di) in bf16; dK^T += Q^T dS;  dQ += dS K
              bf16_gemm(np, nk, Dvp / 2, dOa, lda_do, Vp.data(), 2 * BK, dP.data(), BK, false);
              bf16_ds_rows(dP.data(), S.data(), BK, Dr.data(), np, nk, dSb.data(), dSv.data());
              bf16_gemm(D, nk, npp, Qt_all + h * D * Tp + col0, Tp, dSv.data(), 2 * BK, dK.data(), BK, true);
              bf16_gemm(np, D, nkp / 2, dSb.data(), BK, Kv.data(), 2 * D, dq_c + row0 * D, D, true);
              continue;
            }
            // S, then P = exp(S - lse) in place.
            if (use_bf16)
              qk_bf16(np, nk, Dp / 2, Qa, lda_q, Kp.data(), BK, S.data(), BK, static_cast<float>(scale));
            else
              gemm<acc_t>(np, nk, D, Qf, D, 1, Kt.data(), BK, S.data(), BK, false);
            for (int64_t r = 0; r < np; ++r) {
              acc_t* s = S.data() + r * BK;
              if (mod) p.modify_row(s, dCap.empty() ? nullptr : dCap.data() + r * BK, nk, w, b, h, i0 + r, j0);
              if (!full || p.has_mask()) p.mask_row(s, nk, w, b, h, i0 + r, j0, full);
              const acc_t L = lse[p.lse_index(b, h, i0 + r)];
              if (L == ninf)
                std::fill(s, s + nk, acc_t(0));
              else
                exp_sum(s, nk, L);
            }
            // dV += P^T dO (with dropout: (P M)^T dO)
            if (drop) {
              int64_t r = 0;
              for (; r + 1 < np; r += 2)  // two rows per Philox call (8 blocks each)
                dropout_mult_rows2(p.dropout, dropout_row_index(b, h, H, i0 + r), dropout_row_index(b, h, H, i0 + r + 1),
                                   j0, nk, Dm.data() + r * BK, Dm.data() + (r + 1) * BK, bits);
              if (r < np) dropout_mult_row(p.dropout, dropout_row_index(b, h, H, i0 + r), j0, nk, Dm.data() + r * BK, bits);
              for (r = 0; r < np; ++r) {
                const acc_t* mr = Dm.data() + r * BK;
                const acc_t* pr = S.data() + r * BK;
                acc_t* pd = Pd.data() + r * BK;
                for (int64_t j = 0; j < nk; ++j) pd[j] = pr[j] * mr[j];
              }
            }
            if (use_bf16) {
              bf16_pv_dv(Pv.data(), BK, drop ? Pd.data() : S.data(), BK, np, nk);
              bf16_gemm(Dv, nk, npp, dOt_all + h * Dv * Tp + col0, Tp, Pv.data(), 2 * BK, dV.data(), BK, true);
            } else {
              gemm<acc_t>(nk, Dv, np, drop ? Pd.data() : S.data(), 1, BK, dOf, Dv, dV.data(), Dv, true);
            }
            // dP = dO V^T, then dS = P * (dP - Di) in place.
            if (use_bf16)
              qk_bf16(np, nk, Dvp / 2, dOa, lda_do, Vp.data(), BK, dP.data(), BK, 1.f);
            else
              gemm<acc_t>(np, nk, Dv, dOf, Dv, 1, Vt.data(), BK, dP.data(), BK, false);
            for (int64_t r = 0; r < np; ++r) {
              const acc_t di = Di[p.lse_index(b, h, i0 + r)];
              const acc_t* pr = S.data() + r * BK;
              acc_t* ds = dP.data() + r * BK;
              if (drop) {
                const acc_t* mr = Dm.data() + r * BK;
                for (int64_t j = 0; j < nk; ++j) ds[j] = pr[j] * (ds[j] * mr[j] - di);
              } else {
                ds_row(ds, pr, nk, di);
              }
              if (!dCap.empty()) {  // through the soft-cap: dS_raw = dS (1 - tanh^2)
                const acc_t* dc = dCap.data() + r * BK;
                for (int64_t j = 0; j < nk; ++j) ds[j] *= dc[j];
              }
            }
            // dK += dS^T (scale Q);  dQ += dS K (scaled at the end)
            if (use_bf16) {  // dK^T += Q^T dS (scaled at the end);  dQ += dS K
              bf16_pv_dv(dSv.data(), BK, dP.data(), BK, np, nk);
              bf16_gemm(D, nk, npp, Qt_all + h * D * Tp + col0, Tp, dSv.data(), 2 * BK, dK.data(), BK, true);
              bf16_rows(dSb.data(), BK, dP.data(), BK, np, nk);
              bf16_gemm(np, D, nkp / 2, dSb.data(), BK, Kv.data(), 2 * D, dq_c + row0 * D, D, true);
            } else {
              gemm<acc_t>(nk, D, np, dP.data(), 1, BK, Qf, D, dK.data(), D, true);
              gemm<acc_t>(np, D, nk, dP.data(), BK, 1, Kf.data(), D, dq_c + row0 * D, D, true);
            }
          }
        }
        store_dk_dv(p, b, j0, nk, hk, scale, use_bf16, dK.data(), dV.data(), BK, dk, dv);
      }
    }
  });

  // dQ = scale * sum over chunks, in chunk order; from [head][token] panels to (token, head).
  const int64_t rows = T * H;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t tok = r / H, h = r % H, pr = h * T + tok;
      std::copy(dq_acc + pr * D, dq_acc + (pr + 1) * D, acc.begin());
      for (int64_t c = 1; c < n_chunks; ++c) {
        const acc_t* src = dq_acc + c * q_elems + pr * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += src[d];
      }
      store_row(dq + r * D, acc.data(), D, scale);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& attn_mask, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& prefix_lens, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool deterministic) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  (void)deterministic;  // always reproducible: the dQ chunk buffers are summed in a fixed order (attention.cpp)
  at::Tensor q = q_in, k = k_in, v = v_in;
  std::optional<at::Tensor> cu_q = cu_seqlens_q, cu_k = cu_seqlens_k, mask = attn_mask, prefix = prefix_lens;
  Layout l;
  const Problem p = make_problem(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, bottom_right, softcap,
                                 alibi_slopes, prefix, dropout_p, dropout_seed, &l);
  check_backward_inputs(dout_in, out_in, lse_in, dlse_in, q_in, l, lse_dtype(q), q_in.device());
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor dlse = dlse_in.has_value() ? dlse_in->contiguous() : at::Tensor();
  at::Tensor dq = at::empty(q_in.sizes(), q.options());
  at::Tensor dk = at::zeros(k_in.sizes(), k.options());
  at::Tensor dv = at::zeros(v_in.sizes(), v.options());
  if (dq.numel() == 0) {
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(p, dout.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
                                     dlse.defined() ? dlse.data_ptr<acc_t>() : nullptr, dq.data_ptr<scalar_t>(),
                                     dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace attention
}  // namespace pk
