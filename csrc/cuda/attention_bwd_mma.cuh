// Tensor-core backward kernels of the CUDA flash attention (float16 / bfloat16, head_dim <= 128,
// no attn_mask) and their launcher; the scheme is described in attention_bwd.cu. The launcher
// is instantiated once per (dtype, head dim) in csrc/cuda/instances/ so that the builds run in
// parallel; attention_bwd.cu only declares the instances (attention_mma_instances.cuh).
#pragma once
#include "attention_tiles.cuh"

namespace pk {
namespace attention {
namespace cuda {

constexpr int kBwdWarps = 4;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdRows = 16 * kBwdWarps;  // rows (queries or keys) a block owns

// Which gradients a dK/dV block accumulates. Up to head_dim 128 one pass keeps both in
// registers; at 256 they do not fit beside the score tiles, so two passes each recompute the
// scores and accumulate one of them (the dV pass skips dP = dO V^T).
enum BwdPart { kDkAndDv = 0, kDkOnly = 1, kDvOnly = 2 };

// Where dQ comes from (attention_bwd.cu explains the choice):
//   kDqSeparate  bwd_dq_mma_kernel, its own pass over the key tiles (recomputes S and dP)
//   kDqAtomic    the dK/dV blocks add dS K into a float accumulator with atomics
//   kDqOrdered   the same additions, in a fixed order: the key blocks that see a query tile
//                take turns on it, highest key block first (bit for bit reproducible)
enum DqMode { kDqSeparate = 0, kDqAtomic = 1, kDqOrdered = 2 };

// The fused modes' float accumulator (tokens, H, D), and (ordered) one turn counter per query
// tile, indexed by head and the tile's first token: h * total_q + token.
struct DqAccum {
  int mode = kDqSeparate;
  float* acc = nullptr;
  int* turn = nullptr;
};

template <int kD>
struct BwdTile {
  static constexpr int kLd = kD + 8;
  static constexpr int kBN = kD <= 128 ? 64 : 32;                 // keys per tile in the dQ pass
  static constexpr int kBQ = kD <= 64 ? 64 : (kD <= 128 ? 32 : 16);  // queries per tile, dK/dV pass
  static constexpr bool kSplitDkDv = kD > 128;
  // two stages of the tiles the loop walks over (K and V for dQ; Q, dO, lse and Di for dK/dV):
  // the next tile's cp.async copies run while the current one is computed
  static constexpr int kSmemDq = (2 * kBwdRows + 2 * 2 * kBN) * kLd * 2;
  static constexpr int kSmemDkdv = (2 * kBwdRows + 2 * 2 * kBQ) * kLd * 2 + 2 * 2 * kBQ * 4;
  // Fused dQ: dS^T of the block (keys x queries) staged for dQ = dS K, which the 4 warps split
  // as kBQ / 16 row tiles times 64 / kBQ column groups of kDqCols columns each.
  static constexpr int kLdS = kBQ + 8;
  static constexpr int kSmemDs = kBwdRows * kLdS * 2;
  static constexpr int kDqCols = kD * kBQ / 64;
  static_assert(kDqCols % 16 == 0, "dQ columns per warp: whole x4 fragments");
};

// A fragment of A = M^T (16 x 16) from a tile stored as M (rows k, columns m): one ldmatrix
// .trans; the register order is frag_a's.
template <int kLd>
__device__ __forceinline__ void frag_a_trans(uint32_t (&a)[4], const uint16_t* tile, int m0, int k0, int lane) {
  ldsm_x4<true>(a, tile + (k0 + (lane >> 4) * 8 + (lane & 7)) * kLd + m0 + ((lane >> 3) & 1) * 8);
}

// Turn-taking between the blocks of the ordered dQ accumulation. A block that is not the
// first on a tile waits until the counter shows its predecessor's post (acquire), adds, and
// posts (release) after a fence. Predecessors always have a smaller block index, so they were
// scheduled first and never wait on their successors; a wait longer than 10 s cannot be a
// turn and traps instead of hanging (malformed cu_seqlens that make two sequences share a
// query tile).
__device__ __forceinline__ void turn_acquire(const int* turn, bool first, int value) {
#if defined(PK_CUDA_EMULATION)
  // Blocks run one after the other, so the predecessor has finished: the counter must hold
  // its post exactly, and nothing yet for the first block on the tile.
  if (*turn != (first ? 0 : value)) ::pk::emu::fail("ordered dQ: the turn counter does not match the block's place");
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  if (first) return;
  uint64_t t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (unsigned ns = 32;; ns = ns < 1024 ? 2 * ns : ns) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(turn) : "memory");
    if (v == value) break;
    uint64_t t1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
    if (t1 - t0 > 10000000000ull) __trap();
    __nanosleep(ns);
  }
#else
  if (first) return;
  while (*reinterpret_cast<const volatile int*>(turn) != value) {
  }
  __threadfence();
#endif
}
__device__ __forceinline__ void turn_post(int* turn, int value) {
#if defined(PK_CUDA_EMULATION)
  *turn = value;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(turn), "r"(value) : "memory");
#else
  __threadfence();
  *reinterpret_cast<volatile int*>(turn) = value;
#endif
}

// dQ for 64 query rows of one head per block.
template <typename T, int kD>
__global__ void __launch_bounds__(kBwdThreads) bwd_dq_mma_kernel(const AttnParams p, const T* __restrict__ dout,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ Di, T* __restrict__ dq) {
  using Tile = BwdTile<kD>;
  constexpr int kLd = Tile::kLd, kBN = Tile::kBN, kBM = kBwdRows;
  constexpr int kNT = kBN / 8, kDT = kD / 8;
  uint16_t* smem = dynamic_smem<uint16_t>();
  uint16_t* sQ = smem;
  uint16_t* sdO = sQ + kBM * kLd;
  uint16_t* sKV = sdO + kBM * kLd;  // stage st: K tile at sKV + st * 2 kBN kLd, V tile after it
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int G = p.H / p.Hk;
  const bool do_vec = p.dout_vec;  // dout is contiguous (tokens, H, Dv)
  const Dropout drop = resolve_dropout(p);
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const Seq s = seq_info(p, b);
    const Window w = seq_window(p, s);
    for (int64_t hy = blockIdx.y; hy < p.H; hy += gridDim.y) {
      const int h = static_cast<int>(hy), hk = h / G;
      const uint16_t* qg = static_cast<const uint16_t*>(p.q) + s.q_off + h * p.q_sh;
      const uint16_t* kg = static_cast<const uint16_t*>(p.k) + s.k_off + hk * p.k_sh;
      const uint16_t* vg = static_cast<const uint16_t*>(p.v) + s.v_off + hk * p.v_sh;
      const uint16_t* dog = reinterpret_cast<const uint16_t*>(dout) + (s.tok0 * p.H + h) * p.Dv;
      // Query blocks last to first: under a causal mask the last rows see the most keys, and
      // starting the longest blocks first shortens the tail of the grid.
      const int64_t n_mb = (s.lq + kBM - 1) / kBM;
      for (int64_t mb = blockIdx.x; mb < n_mb; mb += gridDim.x) {
        const int64_t i0 = (n_mb - 1 - mb) * kBM;
        const int64_t i1 = imin(i0 + kBM, s.lq);
        const int64_t ke = key_hi(w, i1 - 1, s.lk), kb = dropout_key_start(drop, key_lo(w, i0), ke);
        __syncthreads();
        load_tile<kD, kBM, kBwdThreads>(sQ, qg + i0 * p.q_ss, p.q_ss, i1 - i0, p.D, p.q_vec);
        load_tile<kD, kBM, kBwdThreads>(sdO, dog + i0 * p.H * p.Dv, int64_t(p.H) * p.Dv, i1 - i0, p.Dv, do_vec);
        cp_async_commit();
        const int64_t row0 = i0 + warp * 16 + g;
        float L2[2], di[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int64_t i = row0 + 8 * rr;
          if (i < s.lq) {
            const int64_t li = lse_index(p, b, s, h, i);
            L2[rr] = lse[li] * kLog2e;
            di[rr] = Di[li];
          } else {
            L2[rr] = -INFINITY;
            di[rr] = 0.f;
          }
        }
        float acc[kDT][4];
        zero_acc(acc);
        const bool mod = p.has_score_mod();
        const float slope = alibi_slope(p, b, h);

        const auto load_kv = [&](int64_t j, int stage) {
          const int n = static_cast<int>(imin(kBN, ke - j));
          uint16_t* dst = sKV + stage * 2 * kBN * kLd;
          load_tile<kD, kBN, kBwdThreads>(dst, kg + j * p.k_ss, p.k_ss, n, p.D, p.k_vec);
          load_tile<kD, kBN, kBwdThreads>(dst + kBN * kLd, vg + j * p.v_ss, p.v_ss, n, p.Dv, p.v_vec);
          cp_async_commit();
        };
        if (kb < ke) load_kv(kb, 0);
        int st = 0;
        for (int64_t j0 = kb; j0 < ke; j0 += kBN, st ^= 1) {
          const int nk = static_cast<int>(imin(kBN, ke - j0));
          cp_async_wait<0>();
          __syncthreads();  // tile j0 (and Q, dO) landed for everyone; every warp is done with stage st ^ 1
          if (j0 + kBN < ke) load_kv(j0 + kBN, st ^ 1);
          const uint16_t* sK = sKV + st * 2 * kBN * kLd;
          const uint16_t* sV = sK + kBN * kLd;

          float sc[kNT][4], dp[kNT][4];
          zero_acc(sc);
          zero_acc(dp);
          mma_rows_tile_t<T, kLd, kD, kNT>(sc, sQ, warp * 16, sK, lane);   // S = Q K^T
          mma_rows_tile_t<T, kLd, kD, kNT>(dp, sdO, warp * 16, sV, lane);  // dP = dO V^T
          const bool need_mask = nk < kBN || !tile_full(w, i0, i1, j0, j0 + nk, s.lk);
          // Dropout: the keep bits of the thread's two rows (bit 2 nt + e: column 8 nt + 2 t + e).
          uint32_t keep[2] = {~0u, ~0u};
          if (drop.on()) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
              keep[rr] = dropout_keep_query_row<kNT>(drop, dropout_row_index(b, h, p.H, row0 + 8 * rr), j0, t);
          }
          // kMod: the forward's soft-cap / ALiBi, and dS times the cap's derivative; chosen per tile.
          const auto ds_tile = [&](auto mod_tag) {
            constexpr bool kMod = decltype(mod_tag)::value;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
              for (int x = 0; x < 4; ++x) {
                const int rr = x >> 1;
                const int c = nt * 8 + 2 * t + (x & 1);
                bool ok = L2[rr] != -INFINITY;
                if (need_mask) ok = ok && c < nk && visible(w, row0 + 8 * rr, j0 + c);
                float z, dcap = 1.f;
                if constexpr (kMod)
                  z = modified_score_log2(p, sc[nt][x] * p.scale, slope, w, row0 + 8 * rr, j0 + c, &dcap);
                else
                  z = sc[nt][x] * p.scale_log2;
                const float pe = ok ? exp2f(z - L2[rr]) : 0.f;
                if (drop.on()) {
                  // dropout: dS = P (dP M - Di), M = rscale where kept and 0 where dropped
                  const float m = (keep[rr] >> (2 * nt + (x & 1))) & 1u ? drop.rscale : 0.f;
                  sc[nt][x] = pe * (dp[nt][x] * m - di[rr]);  // dS
                } else {
                  sc[nt][x] = pe * (dp[nt][x] - di[rr]);  // dS
                }
                if constexpr (kMod) sc[nt][x] *= dcap;
              }
          };
          if (mod)
            ds_tile(std::true_type{});
          else
            ds_tile(std::false_type{});
          mma_acc_tile<T, kLd, kNT, kDT>(acc, sc, sK, lane);  // dQ += dS K
        }
        cp_async_wait<0>();
        __syncthreads();
        // stage dQ (scaled) in this warp's rows of sQ, then write the rows out
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          uint16_t* srow = sQ + (warp * 16 + g + 8 * rr) * kLd;
#pragma unroll
          for (int dn = 0; dn < kDT; ++dn)
            *reinterpret_cast<uint32_t*>(srow + dn * 8 + 2 * t) =
                pack2<T>(acc[dn][2 * rr] * p.scale, acc[dn][2 * rr + 1] * p.scale);
        }
        __syncwarp();
        uint16_t* dqp = reinterpret_cast<uint16_t*>(dq);
        for (int r = 0; r < 16; ++r) {
          const int64_t i = i0 + warp * 16 + r;
          if (i >= s.lq) break;
          uint16_t* dst = dqp + ((s.tok0 + i) * p.H + h) * p.D;
          const uint16_t* src = sQ + (warp * 16 + r) * kLd;
          for (int c = lane; c < p.D; c += 32) dst[c] = src[c];
        }
      }
    }
  }
}

// dK and/or dV (kPart) for 64 keys of one kv head per block; with kDq != kDqSeparate the
// pass that computes dS also adds its share of dQ = dS K into dqa.acc (see DqMode).
template <typename T, int kD, int kPart, int kDq>
__global__ void __launch_bounds__(kBwdThreads) bwd_dkdv_mma_kernel(const AttnParams p, const T* __restrict__ dout,
                                                                   const float* __restrict__ lse,
                                                                   const float* __restrict__ Di, T* __restrict__ dk,
                                                                   T* __restrict__ dv, const DqAccum dqa) {
  using Tile = BwdTile<kD>;
  constexpr int kLd = Tile::kLd, kBQ = Tile::kBQ, kBN = kBwdRows;
  constexpr int kNT = kBQ / 8, kDT = kD / 8;
  constexpr bool kDoK = kPart != kDvOnly, kDoV = kPart != kDkOnly;
  constexpr bool kFusedDq = kDq != kDqSeparate;
  static_assert(!kFusedDq || kDoK, "dQ needs the dS of the dK pass");
  constexpr int kDTK = kDoK ? kDT : 2, kDTV = kDoV ? kDT : 2;  // unused accumulators stay tiny
  uint16_t* smem = dynamic_smem<uint16_t>();
  uint16_t* sK = smem;
  uint16_t* sV = sK + kBN * kLd;
  uint16_t* sQd = sV + kBN * kLd;  // stage st: Q tile at sQd + st * 2 kBQ kLd, dO tile after it
  float* sLD = reinterpret_cast<float*>(sQd + 2 * 2 * kBQ * kLd);  // stage st: lse*log2e, then Di
  uint16_t* sdS = reinterpret_cast<uint16_t*>(sLD + 2 * 2 * kBQ);  // fused dQ: dS^T, [key][query]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int G = p.H / p.Hk;
  const bool do_vec = p.dout_vec;
  const bool mod = p.has_score_mod();
  const Dropout drop = resolve_dropout(p);
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const Seq s = seq_info(p, b);
    const Window w = seq_window(p, s);
    const int64_t n_kb = (s.lk + kBN - 1) / kBN;
    // The queries [lo, hi) that see keys [j0, j0 + kBN); both ends grow with j0.
    const auto block_queries = [&](int64_t j0, int64_t& lo, int64_t& hi) {
      lo = query_lo(w, j0, s.lq);
      hi = query_hi(w, imin(j0 + kBN, s.lk), s.lq);
    };
    // Fused dQ: the query tiles [ta, tb) (kBQ rows each) covering queries [lo, hi), aligned to
    // multiples of kBQ so that every key block adds into the same tiles of dQ; the key blocks
    // that see a tile are then consecutive.
    const auto aligned_tiles = [](int64_t lo, int64_t hi, int64_t& ta, int64_t& tb) {
      ta = hi > lo ? lo / kBQ : 0;
      tb = hi > lo ? (hi + kBQ - 1) / kBQ : 0;
    };
    for (int64_t hy = blockIdx.y; hy < p.Hk; hy += gridDim.y) {
      const int hk = static_cast<int>(hy);
      const uint16_t* kg = static_cast<const uint16_t*>(p.k) + s.k_off + hk * p.k_sh;
      const uint16_t* vg = static_cast<const uint16_t*>(p.v) + s.v_off + hk * p.v_sh;
      // Ordered dQ walks the key blocks last to first, so that a block's predecessor on every
      // query tile (the next key block) has a smaller block index.
      for (int64_t x0 = static_cast<int64_t>(blockIdx.x) * kBN; x0 < s.lk; x0 += static_cast<int64_t>(gridDim.x) * kBN) {
        const int64_t j0 = kDq == kDqOrdered ? (n_kb - 1) * kBN - x0 : x0, j1 = imin(j0 + kBN, s.lk);
        const int64_t jb = j0 / kBN;
        int64_t qlo, qhi;
        block_queries(j0, qlo, qhi);
        // the query tiles: from qlo (separate dQ), or aligned (fused)
        int64_t ta = 0, tb = qhi > qlo ? (qhi - qlo + kBQ - 1) / kBQ : 0;
        if constexpr (kFusedDq) aligned_tiles(qlo, qhi, ta, tb);
        __syncthreads();
        load_tile<kD, kBN, kBwdThreads>(sK, kg + j0 * p.k_ss, p.k_ss, j1 - j0, p.D, p.k_vec);
        load_tile<kD, kBN, kBwdThreads>(sV, vg + j0 * p.v_ss, p.v_ss, j1 - j0, p.Dv, p.v_vec);
        cp_async_commit();
        const int64_t key0 = j0 + warp * 16 + g;  // this thread's keys: key0 and key0 + 8
        float ak[kDTK][4], av[kDTV][4];
        zero_acc(ak);
        zero_acc(av);
        // Ordered dQ: the query tiles whose previous turn (key block jb + 1) is also this call's.
        int64_t na = 0, nb = 0;
        if (kDq == kDqOrdered && jb + 1 < n_kb) {
          int64_t lo, hi;
          block_queries(j0 + kBN, lo, hi);
          aligned_tiles(lo, hi, na, nb);
        }

        // The query tiles of every head of the GQA group, as one sequence n = gi * n_qt + tile.
        const int64_t n_qt = tb - ta, n_tiles = G * n_qt;
        const auto tile_row = [&](int64_t n) { return kFusedDq ? (ta + n % n_qt) * kBQ : qlo + (n % n_qt) * kBQ; };
        const auto load_q = [&](int64_t n, int stage) {
          const int h = hk * G + static_cast<int>(n / n_qt);
          const int64_t i0 = tile_row(n);
          const int nq = static_cast<int>(imin(kBQ, qhi - i0));
          uint16_t* dst = sQd + stage * 2 * kBQ * kLd;
          load_tile<kD, kBQ, kBwdThreads>(dst, static_cast<const uint16_t*>(p.q) + s.q_off + h * p.q_sh + i0 * p.q_ss,
                                          p.q_ss, nq, p.D, p.q_vec);
          load_tile<kD, kBQ, kBwdThreads>(dst + kBQ * kLd,
                                          reinterpret_cast<const uint16_t*>(dout) + ((s.tok0 + i0) * p.H + h) * p.Dv,
                                          int64_t(p.H) * p.Dv, nq, p.Dv, do_vec);
          cp_async_commit();
          float* ld = sLD + stage * 2 * kBQ;
          for (int r = threadIdx.x; r < kBQ; r += kBwdThreads) {
            float l2 = -INFINITY, d = 0.f;
            if (r < nq) {
              const int64_t li = lse_index(p, b, s, h, i0 + r);
              l2 = lse[li] * kLog2e;
              d = Di[li];
            }
            ld[r] = l2;
            ld[kBQ + r] = d;
          }
        };
        if (n_tiles > 0) load_q(0, 0);
        {
          int st = 0;
          for (int64_t n = 0; n < n_tiles; ++n, st ^= 1) {
            const int64_t i0 = tile_row(n);
            const int nq = static_cast<int>(imin(kBQ, qhi - i0));
            cp_async_wait<0>();
            __syncthreads();  // tile n landed for everyone; every warp is done with stage st ^ 1 (and sdS)
            if (n + 1 < n_tiles) load_q(n + 1, st ^ 1);
            const uint16_t* sQ = sQd + st * 2 * kBQ * kLd;
            const uint16_t* sdO = sQ + kBQ * kLd;
            const float* sL2 = sLD + st * 2 * kBQ;
            const float* sDi = sL2 + kBQ;

            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x kBQ queries.
            float sc[kNT][4], dp[kNT][4];
            zero_acc(sc);
            zero_acc(dp);
            mma_rows_tile_t<T, kLd, kD, kNT>(sc, sK, warp * 16, sQ, lane);
            if constexpr (kDoK) mma_rows_tile_t<T, kLd, kD, kNT>(dp, sV, warp * 16, sdO, lane);
            const bool need_mask = nq < kBQ || (j1 - j0) < kBN || !tile_full(w, i0, i0 + nq, j0, j1, s.lk);
            // Dropout: the keep bits of the fragment (bit 4 nt + x: register x of n-tile nt).
            const uint32_t keep = drop.on() ? dropout_keep_key_rows<kNT>(drop, b, hk * G + static_cast<int>(n / n_qt),
                                                                          p.H, i0, j0 + warp * 16, g, t)
                                            : ~0u;
            float pt[kNT][4];
            // kMod: the forward's soft-cap / ALiBi, and dS times the cap's derivative; chosen per tile.
            const auto ds_tile = [&](auto mod_tag) {
              constexpr bool kMod = decltype(mod_tag)::value;
              float slope = 0.f;
              if constexpr (kMod) slope = alibi_slope(p, b, hk * G + static_cast<int>(n / n_qt));
#pragma unroll
              for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                  const int rr = x >> 1;
                  const int c = nt * 8 + 2 * t + (x & 1);
                  const float l2 = sL2[c];
                  const int64_t key = key0 + 8 * rr;
                  bool ok = l2 != -INFINITY;
                  if (need_mask) ok = ok && c < nq && key < j1 && visible(w, i0 + c, key);
                  float z, dcap = 1.f;
                  if constexpr (kMod)
                    z = modified_score_log2(p, sc[nt][x] * p.scale, slope, w, i0 + c, key, &dcap);
                  else
                    z = sc[nt][x] * p.scale_log2;
                  const float pe = ok ? exp2f(z - l2) : 0.f;
                  if (drop.on()) {
                    // dropout: dV takes P M, dS = P (dP M - Di), M = rscale where kept and 0 where dropped
                    const float m = (keep >> (4 * nt + x)) & 1u ? drop.rscale : 0.f;
                    pt[nt][x] = pe * m;
                    sc[nt][x] = pe * (dp[nt][x] * m - sDi[c]);  // dS^T
                  } else {
                    pt[nt][x] = pe;
                    sc[nt][x] = pe * (dp[nt][x] - sDi[c]);  // dS^T
                  }
                  if constexpr (kMod) sc[nt][x] *= dcap;
                }
            };
            if (mod)
              ds_tile(std::true_type{});
            else
              ds_tile(std::false_type{});
            // dV += P^T dO, dK += dS^T Q (k dimension: the kBQ queries)
            if constexpr (kDoV) mma_acc_tile<T, kLd, kNT, kDT>(av, pt, sdO, lane);
            if constexpr (kDoK) mma_acc_tile<T, kLd, kNT, kDT>(ak, sc, sQ, lane);
            if constexpr (kFusedDq) {
              // dS^T, rounded to T as in the dK product, to shared memory: dQ needs all 64 keys
#pragma unroll
              for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
                  *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8 * rr) * Tile::kLdS + nt * 8 + 2 * t) =
                      pack2<T>(sc[nt][2 * rr], sc[nt][2 * rr + 1]);
              const int h = hk * G + static_cast<int>(n / n_qt);
              const int64_t tm = ta + n % n_qt;  // the query tile's index
              int* turn = kDq == kDqOrdered ? dqa.turn + int64_t(h) * p.total_q + s.tok0 + i0 : nullptr;
              const bool first = !(na <= tm && tm < nb);  // key block jb + 1 does not see this tile
              if (kDq == kDqOrdered && threadIdx.x == 0) turn_acquire(turn, first, static_cast<int>(jb) + 2);
              __syncthreads();  // sdS complete (and, ordered, this block's turn)
              // This warp's share of the tile's dQ: rows mr + [0, 16), columns mc + [0, kDqCols),
              // in chunks of kCC columns so that few accumulators are live beside dK and dV.
              constexpr int kCC = Tile::kDqCols % 32 == 0 ? 32 : 16, kCT = kCC / 8;
              const int mr = (warp % (kBQ / 16)) * 16, mc = (warp / (kBQ / 16)) * Tile::kDqCols;
              const int row_lo = static_cast<int>(imax(i0, qlo) - i0);  // rows below see no key here
#pragma unroll 1
              for (int cc = mc; cc < mc + Tile::kDqCols; cc += kCC) {
                float aq[1][kCT][4];
                zero_acc(aq);
#pragma unroll
                for (int kk = 0; kk < kBN / 16; ++kk) {
                  uint32_t fa[1][4];
                  frag_a_trans<Tile::kLdS>(fa[0], sdS, mr, kk * 16, lane);
#pragma unroll
                  for (int dn = 0; dn < kCT; dn += 2) {
                    uint32_t fb[4];
                    frag_b_kn<kLd>(fb, sK, kk * 16, cc + dn * 8, lane);
                    mma_mtiles<T>(aq, dn, fa, fb);
                  }
                }
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                  const int r = mr + g + 8 * rr;
                  if (r < row_lo || r >= nq) continue;
                  float* dst = dqa.acc + ((s.tok0 + i0 + r) * p.H + h) * p.D;
#pragma unroll
                  for (int dn = 0; dn < kCT; ++dn)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                      const int c = cc + dn * 8 + 2 * t + e;
                      if (c >= p.D) continue;
                      if constexpr (kDq == kDqAtomic)
                        atomicAdd(dst + c, aq[0][dn][2 * rr + e]);
                      else
                        dst[c] = __ldcg(dst + c) + aq[0][dn][2 * rr + e];
                    }
                }
              }
              if constexpr (kDq == kDqOrdered) {
                __threadfence();
                __syncthreads();  // every thread's additions are done (and fenced)
                if (threadIdx.x == 0) turn_post(turn, static_cast<int>(jb) + 1);
              }
            }
          }
        }
        cp_async_wait<0>();
        __syncthreads();
        // stage dK (scaled) and dV in this warp's rows of sK / sV, then write the rows out
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          uint16_t* krow = sK + (warp * 16 + g + 8 * rr) * kLd;
          uint16_t* vrow = sV + (warp * 16 + g + 8 * rr) * kLd;
          if constexpr (kDoK) {
#pragma unroll
            for (int dn = 0; dn < kDT; ++dn)
              *reinterpret_cast<uint32_t*>(krow + dn * 8 + 2 * t) =
                  pack2<T>(ak[dn][2 * rr] * p.scale, ak[dn][2 * rr + 1] * p.scale);
          }
          if constexpr (kDoV) {
#pragma unroll
            for (int dn = 0; dn < kDT; ++dn)
              *reinterpret_cast<uint32_t*>(vrow + dn * 8 + 2 * t) = pack2<T>(av[dn][2 * rr], av[dn][2 * rr + 1]);
          }
        }
        __syncwarp();
        uint16_t* dkp = reinterpret_cast<uint16_t*>(dk);
        uint16_t* dvp = reinterpret_cast<uint16_t*>(dv);
        for (int r = 0; r < 16; ++r) {
          const int64_t j = j0 + warp * 16 + r;
          if (j >= s.lk) break;
          uint16_t* kd = dkp + ((s.ktok0 + j) * p.Hk + hk) * p.D;
          uint16_t* vd = dvp + ((s.ktok0 + j) * p.Hk + hk) * p.Dv;
          const uint16_t* ks = sK + (warp * 16 + r) * kLd;
          const uint16_t* vs = sV + (warp * 16 + r) * kLd;
          if constexpr (kDoK)
            for (int c = lane; c < p.D; c += 32) kd[c] = ks[c];
          if constexpr (kDoV)
            for (int c = lane; c < p.Dv; c += 32) vd[c] = vs[c];
        }
      }
    }
  }
}

// ---- launcher -------------------------------------------------------------------------------

template <typename T, int kD>
void launch_bwd_mma(const AttnParams& p, const T* dout, const float* lse, const float* Di, T* dq, T* dk, T* dv,
                    int64_t q_bound, int64_t k_bound, const DqAccum& dqa, cudaStream_t stream) {
  using Tile = BwdTile<kD>;
  const auto dkdv = [&](auto kernel, int smem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, ceil_div(k_bound, kBwdRows)), 1 << 30)),
                    static_cast<unsigned>(std::min<int64_t>(p.Hk, 65535)),
                    static_cast<unsigned>(std::min<int64_t>(p.batch, 65535)));
    PK_LAUNCH(grid, kBwdThreads, smem, stream, kernel)(p, dout, lse, Di, dk, dv, dqa);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // the pass that computes dS (dK) also yields dQ in the fused modes
  constexpr int kDkPart = Tile::kSplitDkDv ? kDkOnly : kDkAndDv;
  if constexpr (Tile::kSplitDkDv) dkdv(bwd_dkdv_mma_kernel<T, kD, kDvOnly, kDqSeparate>, Tile::kSmemDkdv);
  const int fused_smem = Tile::kSmemDkdv + Tile::kSmemDs;
  switch (dqa.mode) {
    case kDqAtomic: dkdv(bwd_dkdv_mma_kernel<T, kD, kDkPart, kDqAtomic>, fused_smem); return;
    case kDqOrdered: dkdv(bwd_dkdv_mma_kernel<T, kD, kDkPart, kDqOrdered>, fused_smem); return;
    default: dkdv(bwd_dkdv_mma_kernel<T, kD, kDkPart, kDqSeparate>, Tile::kSmemDkdv); break;
  }
  {
    const auto kernel = bwd_dq_mma_kernel<T, kD>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemDq));
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, ceil_div(q_bound, kBwdRows)), 1 << 30)),
                    static_cast<unsigned>(std::min<int64_t>(p.H, 65535)),
                    static_cast<unsigned>(std::min<int64_t>(p.batch, 65535)));
    PK_LAUNCH(grid, kBwdThreads, Tile::kSmemDq, stream, kernel)(p, dout, lse, Di, dq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
