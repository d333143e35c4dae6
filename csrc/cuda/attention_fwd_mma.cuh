// Tensor-core forward of the CUDA flash attention (float16 / bfloat16; ldmatrix + mma.sync
// m16n8k16, fp32 accumulation) and its launcher, instantiated once per (dtype, head dim) in
// csrc/cuda/instances/. See attention_fwd.cu for the essay.
#pragma once
#include "attention_tiles.cuh"

namespace pk {
namespace attention {
namespace cuda {

// ---- tensor-core forward --------------------------------------------------------------------

template <typename T, int kD, int kMT>
__global__ void __launch_bounds__(FwdTile<kD, kMT>::kThreads) fwd_mma_kernel(const AttnParams p) {
  using Tile = FwdTile<kD, kMT>;
  constexpr int kBM = Tile::kBM, kBN = Tile::kBN, kLd = Tile::kLd, kThreads = Tile::kThreads;
  constexpr int kWR = 16 * kMT;  // rows per warp
  constexpr int kNT = kBN / 8;   // score n-tiles per m-tile
  constexpr int kDT = kD / 8;    // output n-tiles per m-tile
  constexpr int kR = 2 * kMT;    // rows per thread: m-tile mt holds rows g and g + 8 of its 16
  uint16_t* smem = dynamic_smem<uint16_t>();
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBM * kLd;
  uint16_t* sV = sK + kBN * kLd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int G = p.H / p.Hk;
  // Rows of the block. Unpacked: row r is query r of one head. Packed (pack_gqa): row r is
  // query r / G of head hk G + r % G, so the G heads that share a kv head share its K/V tiles
  // (decode reads the cache once instead of G times).
  const int P = p.pack_gqa ? G : 1;
  // The caller's mask goes to 64-row blocks only (the launcher's choice): its per-element
  // reads would cost the registers two m-tiles need.
  const bool user_mask = kMT == 1 && p.has_mask();
  const bool mod = p.has_score_mod();
  const Dropout drop = resolve_dropout(p);
  const int n_groups = fwd_row_groups(p);
  const int64_t hs_total = static_cast<int64_t>(n_groups) * p.n_splits;

  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const Seq s = seq_info(p, b);
    const Window w = seq_window(p, s);
    const int64_t rows = s.lq * P;
    for (int64_t hy = blockIdx.y; hy < hs_total; hy += gridDim.y) {
      const int grp = static_cast<int>(hy % n_groups), split = static_cast<int>(hy / n_groups);
      const int h0 = p.pack_gqa ? grp * G : grp, hk = p.pack_gqa ? grp : grp / G;
      const uint16_t* qg = static_cast<const uint16_t*>(p.q) + s.q_off + h0 * p.q_sh;
      const uint16_t* kg = static_cast<const uint16_t*>(p.k) + s.k_off + hk * p.k_sh;
      const uint16_t* vg = static_cast<const uint16_t*>(p.v) + s.v_off + hk * p.v_sh;
      // Query blocks last to first: under a causal mask the last rows see the most keys, and
      // starting the longest blocks first shortens the tail of the grid.
      const int64_t n_mb = (rows + kBM - 1) / kBM;
      for (int64_t mb = blockIdx.x; mb < n_mb; mb += gridDim.x) {
        const int64_t r0 = (n_mb - 1 - mb) * kBM, r1 = imin(r0 + kBM, rows);
        const int64_t i0 = r0 / P, i1 = (r1 - 1) / P + 1;  // the queries of the block's rows
        int64_t kb, ke;
        const int64_t k_lo = key_lo(w, i0), k_hi = key_hi(w, i1 - 1, s.lk);
        split_range(p, split, dropout_key_start(drop, k_lo, k_hi), k_hi, kb, ke);

        // Pipeline: copy groups complete in order. Here Q + K(kb), then V(kb); in the loop
        // K(j + 1) is issued once every warp is done with K(j) and runs under the softmax and
        // P V(j), V(j + 1) once every warp is done with V(j) and runs under S(j + 1).
        __syncthreads();  // shared memory is free (the previous item's output staging is done)
        load_tile_rows<kD, kBM, kThreads>(
            sQ, [&](int64_t r) { return qg + ((r0 + r) / P) * p.q_ss + ((r0 + r) % P) * p.q_sh; }, r1 - r0, p.D,
            p.q_vec);
        if (kb < ke)
          load_kv_tile<kD, kBN, kThreads>(sK, p, s, kg, kb, p.k_sb, p.k_ss, imin(kBN, ke - kb), p.D, p.k_vec);
        cp_async_commit();
        if (kb < ke)
          load_kv_tile<kD, kBN, kThreads>(sV, p, s, vg, kb, p.v_sb, p.v_ss, imin(kBN, ke - kb), p.Dv, p.v_vec);
        cp_async_commit();
        cp_async_wait<1>();  // Q and K(kb) have landed
        __syncthreads();

        float o[kMT][kDT][4];
        zero_acc(o);
        // this thread's rows: row0 + 8 x for x = 2 mt + rr (rows g and g + 8 of m-tile mt);
        // row r is query r / P of head h0 + r % P
        const int64_t row0 = r0 + warp * kWR + g;
        float m_run[kR], l_run[kR];
#pragma unroll
        for (int x = 0; x < kR; ++x) {
          m_run[x] = -INFINITY;
          l_run[x] = 0.f;
        }

        // A warp whose rows all lie past the block's last row (decode: G packed rows in a
        // 64-row block; the last block of a sequence) loads and waits with the others but
        // skips the arithmetic.
        const bool warp_rows = r0 + warp * kWR < r1;
        for (int64_t j0 = kb; j0 < ke; j0 += kBN) {
          const int nk = static_cast<int>(imin(kBN, ke - j0));
          const bool more = j0 + kBN < ke;

          // S = Q K^T for this warp's rows x kBN keys.
          float sc[kMT][kNT][4];
          zero_acc(sc);
          if (warp_rows) mma_rows_tiles_t<T, kLd, kD, kMT, kNT>(sc, sQ, warp * kWR, sK, lane);
          __syncthreads();  // every warp is done with sK
          if (more) {
            load_kv_tile<kD, kBN, kThreads>(sK, p, s, kg, j0 + kBN, p.k_sb, p.k_ss, imin(kBN, ke - j0 - kBN), p.D,
                                            p.k_vec);
            cp_async_commit();
          }

          // Scale, mask, online softmax (base 2). Each row's 4 threads (same g) share it.
          const bool need_mask = user_mask || nk < kBN || !tile_full(w, i0, i1, j0, j0 + nk, s.lk);
          // kMod: the soft-cap / ALiBi (modified_score_log2) on every element; chosen per tile,
          // so that calls without them run the plain loop.
          const auto softmax_rows = [&](auto mod_tag) {
            constexpr bool kMod = decltype(mod_tag)::value;
#pragma unroll
            for (int x = 0; x < kR; ++x) {
              const int mt = x >> 1, rr = x & 1;
              // The row's visible keys as tile columns [c_lo, c_hi) (csrc/common/attention.h: an
              // interval per query), and where its row of the caller's mask starts (-1: none).
              int c_lo = 0, c_hi = kBN;
              int64_t m_off = -1;
              if (need_mask) {
                const int64_t row = row0 + 8 * x, i = row / P;
                c_lo = static_cast<int>(imin(kBN, imax(0, key_lo(w, i) - j0)));
                c_hi = static_cast<int>(imax(0, imin(nk, key_hi(w, i, s.lk) - j0)));
                if (user_mask && i < s.lq) m_off = mask_row_offset(p, b, h0 + static_cast<int>(row % P), i) + j0 * p.m_sj;
              }
              float slope = 0.f;
              int64_t mi = 0;  // the row's query (kMod)
              if constexpr (kMod) {
                const int64_t row = row0 + 8 * x;
                mi = row / P;
                slope = alibi_slope(p, b, h0 + static_cast<int>(row % P));
              }
              float mx = -INFINITY;
#pragma unroll
              for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  float v;
                  if constexpr (kMod)
                    v = modified_score_log2(p, sc[mt][nt][2 * rr + e] * p.scale, slope, w, mi, j0 + nt * 8 + 2 * t + e);
                  else
                    v = sc[mt][nt][2 * rr + e] * p.scale_log2;
                  if (need_mask) {
                    const int c = nt * 8 + 2 * t + e;
                    if (c < c_lo || c >= c_hi)
                      v = -INFINITY;
                    else if (m_off >= 0)
                      v += mask_log2_at(p, m_off + c * p.m_sj);
                  }
                  sc[mt][nt][2 * rr + e] = v;
                  mx = fmaxf(mx, v);
                }
              mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
              mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
              const float m_new = fmaxf(m_run[x], mx);
              const float m_safe = m_new == -INFINITY ? 0.f : m_new;
              const float alpha = exp2f(m_run[x] - m_safe);
              float sum = 0.f;
#pragma unroll
              for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const float pe = exp2f(sc[mt][nt][2 * rr + e] - m_safe);
                  sc[mt][nt][2 * rr + e] = pe;
                  sum += pe;
                }
              l_run[x] = l_run[x] * alpha + sum;  // this thread's partial row sum
              m_run[x] = m_new;
#pragma unroll
              for (int dn = 0; dn < kDT; ++dn) {
                o[mt][dn][2 * rr] *= alpha;
                o[mt][dn][2 * rr + 1] *= alpha;
              }
            }
          };
          if (warp_rows) {
            if (mod)
              softmax_rows(std::true_type{});
            else
              softmax_rows(std::false_type{});
            // Dropout: zero the dropped entries of P for P V; the row sums above stay without
            // it (attention_dropout.h), the kept entries' 1 / (1 - p) is applied at the end.
            if (drop.on()) {
#pragma unroll
              for (int x = 0; x < kR; ++x) {
                const int mt = x >> 1, rr = x & 1;
                const int64_t row = row0 + 8 * x;
                const uint32_t keep = dropout_keep_query_row<kNT>(
                    drop, dropout_row_index(b, h0 + static_cast<int>(row % P), p.H, row / P), j0, t);
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                  for (int e = 0; e < 2; ++e)
                    if (!((keep >> (2 * nt + e)) & 1u)) sc[mt][nt][2 * rr + e] = 0.f;
              }
            }
          }

          if (more)
            cp_async_wait<1>();  // V(j0) has landed; K(j0 + kBN) may still be in flight
          else
            cp_async_wait<0>();
          __syncthreads();

          // O += P V: the score accumulators are the A fragments of P, 16 keys at a time.
          if (warp_rows) mma_acc_tiles<T, kLd, kMT, kNT, kDT>(o, sc, sV, lane);
          if (more) cp_async_wait<0>();  // K(j0 + kBN) has landed
          __syncthreads();               // every warp is done with sV; K(j0 + kBN) is visible
          if (more) {
            load_kv_tile<kD, kBN, kThreads>(sV, p, s, vg, j0 + kBN, p.v_sb, p.v_ss, imin(kBN, ke - j0 - kBN), p.Dv,
                                            p.v_vec);
            cp_async_commit();
          }
        }
        cp_async_wait<0>();  // nothing in flight (the Q copy when there was no key tile)
        __syncthreads();

        // Finish: full row sums, normalise, write.
#pragma unroll
        for (int x = 0; x < kR; ++x) {
          const int mt = x >> 1, rr = x & 1;
          float L = l_run[x];
          L += __shfl_xor_sync(0xffffffffu, L, 1);
          L += __shfl_xor_sync(0xffffffffu, L, 2);
          const float inv = L > 0.f ? (drop.on() ? drop.rscale : 1.f) / L : s.empty_scale;
          const float lse = L > 0.f ? (m_run[x] + log2f(L)) * kLn2 : s.empty_lse;
          const int64_t i = (row0 + 8 * x) / P;
          const int h = h0 + static_cast<int>((row0 + 8 * x) % P);
          if (p.n_splits > 1) {
            if (row0 + 8 * x < rows) {
              const int64_t pr = (split * p.total_q + s.tok0 + i) * p.H + h;
              float* dst = p.out_part + pr * p.Dv;
#pragma unroll
              for (int dn = 0; dn < kDT; ++dn) {
                const int d = dn * 8 + 2 * t;
                if (d < p.Dv) dst[d] = o[mt][dn][2 * rr] * inv;
                if (d + 1 < p.Dv) dst[d + 1] = o[mt][dn][2 * rr + 1] * inv;
              }
              if (t == 0) p.lse_part[pr] = lse;
            }
          } else {
            // stage the row in this warp's own rows of sQ, copied out below
            uint16_t* srow = sQ + (warp * kWR + g + 8 * x) * kLd;
#pragma unroll
            for (int dn = 0; dn < kDT; ++dn) {
              const uint32_t v2 = pack2<T>(o[mt][dn][2 * rr] * inv, o[mt][dn][2 * rr + 1] * inv);
              *reinterpret_cast<uint32_t*>(srow + dn * 8 + 2 * t) = v2;
            }
            if (t == 0 && row0 + 8 * x < rows) p.lse[lse_index(p, b, s, h, i)] = lse;
          }
        }
        if (p.n_splits <= 1) {
          __syncwarp();
          uint16_t* outp = static_cast<uint16_t*>(p.out);
          const bool vec_out = (p.Dv % 8) == 0;
          for (int r = 0; r < kWR; ++r) {
            const int64_t row = r0 + warp * kWR + r;
            if (row >= rows) break;
            const int64_t i = row / P;
            const int h = h0 + static_cast<int>(row % P);
            uint16_t* dst = outp + ((s.tok0 + i) * p.H + h) * p.Dv;
            const uint16_t* src = sQ + (warp * kWR + r) * kLd;
            if (vec_out) {
              for (int c = lane * 8; c < p.Dv; c += 256)
                *reinterpret_cast<uint4*>(dst + c) = *reinterpret_cast<const uint4*>(src + c);
            } else {
              for (int c = lane; c < p.Dv; c += 32) dst[c] = src[c];
            }
          }
        }
      }
    }
  }
}

template <typename T, int kD, int kMT>
void launch_fwd_mma_tiles(const AttnParams& p, int64_t q_bound, cudaStream_t stream) {
  using Tile = FwdTile<kD, kMT>;
  const auto kernel = fwd_mma_kernel<T, kD, kMT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
  const int64_t mb = std::max<int64_t>(1, ceil_div(fwd_group_rows(p, q_bound), Tile::kBM));
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(mb, 1 << 30)),
                  static_cast<unsigned>(std::min<int64_t>(int64_t(fwd_row_groups(p)) * p.n_splits, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(p.batch, 65535)));
  PK_LAUNCH(grid, Tile::kThreads, Tile::kSmemBytes, stream, kernel)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches fwd_mma_kernel<T, kD, *> in the block shape the host chose (p.fwd_tall);
// instantiated once per (dtype, head dim) in csrc/cuda/instances/ (see
// attention_mma_instances.cuh).
template <typename T, int kD>
void launch_fwd_mma(const AttnParams& p, int64_t q_bound, cudaStream_t stream) {
  if constexpr (kD <= 128) {
    if (p.fwd_tall) return launch_fwd_mma_tiles<T, kD, 2>(p, q_bound, stream);
  }
  launch_fwd_mma_tiles<T, kD, 1>(p, q_bound, stream);
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
