// Forward kernels of the CUDA flash attention (see attention_fwd.cu for the essay):
//   fwd_mma_kernel   float16 / bfloat16 on tensor cores (ldmatrix + mma.sync m16n8k16, fp32
//                    accumulation)
//   fwd_rows_kernel  any dtype (float32 inputs, GPUs before sm_80), one warp per query row
//   combine_kernel   merges the split-KV partial results
// Both attention kernels write either the final output and lse, or (split-KV) a float
// partial output and lse per key split that combine_kernel merges.
#pragma once
#include "attention_common.cuh"

namespace pk {
namespace attention {
namespace cuda {

// ---- PTX wrappers (sm_80+) ----------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#elif defined(PK_CUDA_EMULATION)
  ::pk::emu::cp_async16(smem, gmem, src_bytes);
#else
  // No cp.async: plain copy (zero fill when src_bytes is 0).
  uint4 v = make_uint4(0, 0, 0, 0);
  if (src_bytes > 0) v = *reinterpret_cast<const uint4*>(gmem);
  *reinterpret_cast<uint4*>(smem) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(PK_CUDA_EMULATION)
  ::pk::emu::cp_async_commit();
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#elif defined(PK_CUDA_EMULATION)
  ::pk::emu::cp_async_wait(N);
#endif
}

// D += A B for one m16n8k16 tile: A 16x16 row-major (4 registers of 2 halves), B 16x8
// column-major (2 registers), D 16x8 float. Fragment layout (PTX ISA, "mma.m16n8k16"):
// with g = lane / 4 and t = lane % 4,
//   A: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1),
//      a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9)
//   B: b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g)
//   D: d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g+8, cols 2t, 2t+1)
// The lower 16 bits of a register hold the element with the lower index.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(PK_CUDA_EMULATION)
  ::pk::emu::mma_m16n8k16<__half>(d, a, b0, b1);
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(PK_CUDA_EMULATION)
  ::pk::emu::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#else
  __trap();
#endif
}

// Two floats as one register of two 16-bit values (x in the lower half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Four 8x8 matrices of 16-bit elements from shared memory (ldmatrix .x4, sm_80+): lane j
// gives the address of row j % 8 of matrix j / 8 (16 contiguous, 16-byte aligned bytes);
// register i receives matrix i in the mma fragment layout (row lane / 4, columns
// 2 (lane % 4) and 2 (lane % 4) + 1), or its transpose when kTrans.
template <bool kTrans>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#elif defined(PK_CUDA_EMULATION)
  ::pk::emu::ldmatrix_x4(r, row, kTrans);
#else
  __trap();
#endif
}

// Operand fragments of m16n8k16 from row-major shared-memory tiles with row length kLd
// (elements; kLd * 2 bytes a multiple of 16), one ldmatrix each:
//   frag_a:      A = tile[r0 .. r0+16)[c0 .. c0+16)
//   frag_b_nk:   B[k][n] = tile[n][k] (keys x head dim read as K^T), n in [n0, n0+16),
//                k in [k0, k0+16): b[0], b[1] for n-tile n0, b[2], b[3] for n-tile n0 + 8
//   frag_b_kn:   B[k][n] = tile[k][n] (V in P V), k in [k0, k0+16), n in [n0, n0+16): same
//                register order
template <int kLd>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const uint16_t* tile, int r0, int c0, int lane) {
  ldsm_x4<false>(a, tile + (r0 + (lane & 15)) * kLd + c0 + (lane >> 4) * 8);
}
template <int kLd>
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const uint16_t* tile, int n0, int k0, int lane) {
  ldsm_x4<false>(b, tile + (n0 + (lane >> 4) * 8 + (lane & 7)) * kLd + k0 + ((lane >> 3) & 1) * 8);
}
template <int kLd>
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const uint16_t* tile, int k0, int n0, int lane) {
  ldsm_x4<true>(b, tile + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kLd + n0 + (lane >> 4) * 8);
}

// Zeroes mma accumulators (n tiles of 4 floats per thread).
template <int kN>
__device__ __forceinline__ void zero_acc(float (&acc)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}
template <int kM, int kN>
__device__ __forceinline__ void zero_acc(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int m = 0; m < kM; ++m) zero_acc(acc[m]);
}

// A fragments of P (16 rows x 16 keys) from two score accumulators (n-tiles 2kk, 2kk + 1),
// rounded to the input type: the accumulator layout of m16n8k16 is the A layout.
template <typename T>
__device__ __forceinline__ void frag_a_from_acc(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// The two warp-level products of every attention kernel, for kMT m-tiles of 16 rows each
// (rows r0 + 16 mt + [0, 16) of the calling warp):
//   mma_rows_tiles_t:  acc[mt] (16 x 8 kNT) += A B^T, A = rows r0 + 16 mt + [0, 16) of tile
//                      `a`, B = rows [0, 8 kNT) of tile `b`, both kK columns (S = Q K^T,
//                      dP = dO V^T, ...)
//   mma_acc_tiles:     acc[mt] (16 x 8 kDT) += P[mt] C, P[mt] = 16 x (8 kNP) held in score
//                      accumulators (rounded to T), C = rows [0, 8 kNP) x columns [0, 8 kDT)
//                      of tile `c` (O += P V, dQ += dS K, ...)
// Every B fragment read from shared memory feeds kMT mma, so two m-tiles per warp halve the
// shared-memory traffic per FLOP. mma_rows_tile_t / mma_acc_tile are the one-tile forms.
// acc[mt][n], acc[mt][n + 1] += A[mt] B for every m-tile, B = two n-tiles in one x4 fragment
// (b[0], b[1] for n-tile n, b[2], b[3] for n + 1): one B fragment feeds all kMT m-tiles.
template <typename T, int kMT, int kN>
__device__ __forceinline__ void mma_mtiles(float (&acc)[kMT][kN][4], int n, const uint32_t (&fa)[kMT][4],
                                           const uint32_t (&fb)[4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    mma16816<T>(acc[mt][n], fa[mt], fb[0], fb[1]);
    mma16816<T>(acc[mt][n + 1], fa[mt], fb[2], fb[3]);
  }
}

template <typename T, int kLd, int kK, int kMT, int kNT>
__device__ __forceinline__ void mma_rows_tiles_t(float (&acc)[kMT][kNT][4], const uint16_t* a, int r0,
                                                 const uint16_t* b, int lane) {
  static_assert(kK % 16 == 0 && kNT % 2 == 0, "tile shape");
#pragma unroll
  for (int kt = 0; kt < kK / 16; ++kt) {
    uint32_t fa[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) frag_a<kLd>(fa[mt], a, r0 + 16 * mt, kt * 16, lane);
#pragma unroll
    for (int nt = 0; nt < kNT; nt += 2) {
      uint32_t fb[4];
      frag_b_nk<kLd>(fb, b, nt * 8, kt * 16, lane);
      mma_mtiles<T>(acc, nt, fa, fb);
    }
  }
}

template <typename T, int kLd, int kMT, int kNP, int kDT>
__device__ __forceinline__ void mma_acc_tiles(float (&acc)[kMT][kDT][4], const float (&p)[kMT][kNP][4],
                                              const uint16_t* c, int lane) {
  static_assert(kNP % 2 == 0 && kDT % 2 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < kNP / 2; ++kk) {
    uint32_t fa[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) frag_a_from_acc<T>(fa[mt], p[mt][2 * kk], p[mt][2 * kk + 1]);
#pragma unroll
    for (int dn = 0; dn < kDT; dn += 2) {
      uint32_t fb[4];
      frag_b_kn<kLd>(fb, c, kk * 16, dn * 8, lane);
      mma_mtiles<T>(acc, dn, fa, fb);
    }
  }
}

// One m-tile: the accumulators viewed as a single-tile array (same storage, constant
// indices after unrolling, so they stay in registers).
template <typename T, int kLd, int kK, int kNT>
__device__ __forceinline__ void mma_rows_tile_t(float (&acc)[kNT][4], const uint16_t* a, int r0, const uint16_t* b,
                                                int lane) {
  mma_rows_tiles_t<T, kLd, kK, 1, kNT>(reinterpret_cast<float(&)[1][kNT][4]>(acc), a, r0, b, lane);
}

template <typename T, int kLd, int kNP, int kDT>
__device__ __forceinline__ void mma_acc_tile(float (&acc)[kDT][4], const float (&p)[kNP][4], const uint16_t* c,
                                             int lane) {
  mma_acc_tiles<T, kLd, 1, kNP, kDT>(reinterpret_cast<float(&)[1][kDT][4]>(acc),
                                     reinterpret_cast<const float(&)[1][kNP][4]>(p), c, lane);
}

// ---- tile geometry --------------------------------------------------------------------------

// Keys per tile of the forward: 64, and 32 at head_dim 256. (128-key tiles at head_dim <= 64,
// FlashAttention 2's choice, spilled 116 bytes per thread in 128-row blocks on sm_90.)
constexpr int fwd_key_block(int kd) { return kd <= 128 ? 64 : 32; }

// Query rows of a forward block: 4 warps of one (short) or two (tall) 16-row m-tiles.
constexpr int fwd_block_rows(bool tall) { return 16 * (tall ? 2 : 1) * 4; }

// A block of 4 warps owns kBM query rows; each warp owns kMT m-tiles of 16 rows. Tall blocks
// (kMT = 2, 128 rows) serve head_dim <= 128 when a (sequence, head) has more than 64 rows:
// every K/V fragment read from shared memory then feeds two mma instead of one. Short blocks
// (kMT = 1, 64 rows) serve head_dim 256 (the accumulators of two m-tiles do not fit in
// registers), calls with an attn_mask, and decode / short chunks, where a tall block would be
// mostly padding.
template <int kD, int kMT>
struct FwdTile {
  static_assert(kMT == 1 || (kMT == 2 && kD <= 128), "tall blocks need head_dim <= 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kWarps == 4, "fwd_block_rows counts 4 warps");
  static constexpr int kBM = fwd_block_rows(kMT == 2);          // query rows per block
  static constexpr int kBN = fwd_key_block(kD);                 // keys per tile
  static constexpr int kLd = kD + 8;                            // smem row length (bank spread)
  static constexpr int kSmemBytes = (kBM + 2 * kBN) * kLd * 2;
};

// Copies rows [0, nrows) x columns [0, ncols) of a global tile (16-bit elements; row r starts
// at row(r)) into shared memory rows of kD + 8 elements; everything else becomes zero.
// vec: 16-byte cp.async (row starts and ncols multiples of 8 elements); else element copies.
template <int kD, int kRows, int kThreads, typename RowPtr>
__device__ __forceinline__ void load_tile_rows(uint16_t* sm, RowPtr row, int64_t nrows, int ncols, bool vec) {
  constexpr int kLd = kD + 8, kChunks = kD / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    uint16_t* dst = sm + r * kLd + c;
    if (vec) {
      const bool ok = r < nrows && c < ncols;
      cp_async16(dst, ok ? row(r) + c : row(0), ok ? 16 : 0);
    } else {
      const uint16_t* src = r < nrows ? row(r) : nullptr;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = (r < nrows && c + e < ncols) ? src[c + e] : uint16_t(0);
    }
  }
}

// The same for rows `stride` elements apart.
template <int kD, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* sm, const uint16_t* g, int64_t stride, int64_t nrows, int ncols,
                                          bool vec) {
  load_tile_rows<kD, kRows, kThreads>(sm, [=](int64_t r) { return g + r * stride; }, nrows, ncols, vec);
}

// ---- tensor-core forward --------------------------------------------------------------------

template <typename T, int kD, int kMT>
__global__ void __launch_bounds__(FwdTile<kD, kMT>::kThreads) fwd_mma_kernel(const Params p) {
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
        split_range(p, split, key_lo(w, i0), key_hi(w, i1 - 1, s.lk), kb, ke);

        // Pipeline: copy groups complete in order. Here Q + K(kb), then V(kb); in the loop
        // K(j + 1) is issued once every warp is done with K(j) and runs under the softmax and
        // P V(j), V(j + 1) once every warp is done with V(j) and runs under S(j + 1).
        __syncthreads();  // shared memory is free (the previous item's output staging is done)
        load_tile_rows<kD, kBM, kThreads>(
            sQ, [&](int64_t r) { return qg + ((r0 + r) / P) * p.q_ss + ((r0 + r) % P) * p.q_sh; }, r1 - r0, p.D,
            p.q_vec);
        if (kb < ke) load_tile<kD, kBN, kThreads>(sK, kg + kb * p.k_ss, p.k_ss, imin(kBN, ke - kb), p.D, p.k_vec);
        cp_async_commit();
        if (kb < ke) load_tile<kD, kBN, kThreads>(sV, vg + kb * p.v_ss, p.v_ss, imin(kBN, ke - kb), p.Dv, p.v_vec);
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
            load_tile<kD, kBN, kThreads>(sK, kg + (j0 + kBN) * p.k_ss, p.k_ss, imin(kBN, ke - j0 - kBN), p.D,
                                         p.k_vec);
            cp_async_commit();
          }

          // Scale, mask, online softmax (base 2). Each row's 4 threads (same g) share it.
          const bool need_mask = user_mask || nk < kBN || !tile_full(w, i0, i1, j0, j0 + nk, s.lk);
          if (warp_rows) {
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
              float mx = -INFINITY;
#pragma unroll
              for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  float v = sc[mt][nt][2 * rr + e] * p.scale_log2;
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
            load_tile<kD, kBN, kThreads>(sV, vg + (j0 + kBN) * p.v_ss, p.v_ss, imin(kBN, ke - j0 - kBN), p.Dv,
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
          const float inv = L > 0.f ? 1.f / L : s.empty_scale;
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
void launch_fwd_mma_tiles(const Params& p, int64_t q_bound, cudaStream_t stream) {
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
void launch_fwd_mma(const Params& p, int64_t q_bound, cudaStream_t stream) {
  if constexpr (kD <= 128) {
    if (p.fwd_tall) return launch_fwd_mma_tiles<T, kD, 2>(p, q_bound, stream);
  }
  launch_fwd_mma_tiles<T, kD, 1>(p, q_bound, stream);
}

// ---- SIMT forward (any dtype) ---------------------------------------------------------------

// Dot product of a float row in shared memory with a row of K in global memory.
template <typename T>
__device__ __forceinline__ float dot_row(const float* qs, const T* kr, int D, bool vec) {
  float acc = 0.f;
  if constexpr (sizeof(T) == 2) {
    if (vec) {
      for (int d = 0; d < D; d += 8) {
        const uint4 u = *reinterpret_cast<const uint4*>(kr + d);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int x = 0; x < 8; ++x) acc = fmaf(qs[d + x], to_float<T>(e[x]), acc);
      }
      return acc;
    }
  }
  for (int d = 0; d < D; ++d) acc = fmaf(qs[d], to_float<T>(kr[d]), acc);
  return acc;
}

// One warp per (query row, head, split); a lane per key for the scores, a lane per
// head-dim slot for the output. kDPL: head-dim slots per lane (D, Dv <= 32 kDPL).
template <typename T, int kDPL>
__global__ void __launch_bounds__(128) fwd_rows_kernel(const Params p) {
  __shared__ float q_sh[4][32 * kDPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qs = q_sh[warp];
  const int G = p.H / p.Hk;
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const Seq s = seq_info(p, b);
    const Window w = seq_window(p, s);
    const int64_t rows = s.lq * p.H;
    for (int split = blockIdx.y; split < p.n_splits; split += gridDim.y) {
      for (int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + warp; r < rows; r += static_cast<int64_t>(gridDim.x) * 4) {
        const int64_t i = r / p.H;
        const int h = static_cast<int>(r % p.H), hk = h / G;
        int64_t kb, ke;
        split_range(p, split, key_lo(w, i), key_hi(w, i, s.lk), kb, ke);
        const T* qrow = static_cast<const T*>(p.q) + s.q_off + i * p.q_ss + h * p.q_sh;
        const T* kbase = static_cast<const T*>(p.k) + s.k_off + hk * p.k_sh;
        const T* vbase = static_cast<const T*>(p.v) + s.v_off + hk * p.v_sh;
        __syncwarp();
        for (int d = lane; d < 32 * kDPL; d += 32) qs[d] = d < p.D ? to_float<T>(qrow[d]) * p.scale_log2 : 0.f;
        __syncwarp();
        float o[kDPL];
#pragma unroll
        for (int x = 0; x < kDPL; ++x) o[x] = 0.f;
        float m_run = -INFINITY, l_run = 0.f;
        for (int64_t jc = kb; jc < ke; jc += 32) {
          const int64_t j = jc + lane;
          float x = -INFINITY;
          if (j < ke) {  // [kb, ke) lies inside the window: only the caller's mask can hide a key
            x = dot_row<T>(qs, kbase + j * p.k_ss, p.D, p.k_vec);
            if (p.has_mask()) x += mask_log2(p, b, h, i, j);
          }
          const float m_new = fmaxf(m_run, warp_max(x));
          const float m_safe = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m_run - m_safe);
          const float pj = exp2f(x - m_safe);
          l_run = l_run * alpha + warp_sum(pj);
          m_run = m_new;
#pragma unroll
          for (int y = 0; y < kDPL; ++y) o[y] *= alpha;
          const int n = static_cast<int>(imin(32, ke - jc));
          for (int jj = 0; jj < n; ++jj) {
            const float pv = __shfl_sync(0xffffffffu, pj, jj);
            if (pv == 0.f) continue;  // the same for every lane
            const T* vr = vbase + (jc + jj) * p.v_ss;
#pragma unroll
            for (int y = 0; y < kDPL; ++y) {
              const int d = lane + 32 * y;
              if (d < p.Dv) o[y] = fmaf(pv, to_float<T>(vr[d]), o[y]);
            }
          }
        }
        const float inv = l_run > 0.f ? 1.f / l_run : s.empty_scale;
        const float lse = l_run > 0.f ? (m_run + log2f(l_run)) * kLn2 : s.empty_lse;
        if (p.n_splits > 1) {
          const int64_t pr = (split * p.total_q + s.tok0 + i) * p.H + h;
#pragma unroll
          for (int y = 0; y < kDPL; ++y) {
            const int d = lane + 32 * y;
            if (d < p.Dv) p.out_part[pr * p.Dv + d] = o[y] * inv;
          }
          if (lane == 0) p.lse_part[pr] = lse;
        } else {
          T* dst = static_cast<T*>(p.out) + ((s.tok0 + i) * p.H + h) * p.Dv;
#pragma unroll
          for (int y = 0; y < kDPL; ++y) {
            const int d = lane + 32 * y;
            if (d < p.Dv) dst[d] = from_float<T>(o[y] * inv);
          }
          if (lane == 0) p.lse[lse_index(p, b, s, h, i)] = lse;
        }
      }
    }
  }
}

// ---- split-KV combine -----------------------------------------------------------------------

// One warp per (token, head): out = sum_s e^(lse_s - lse) out_s, lse = log sum_s e^lse_s.
// Splits that saw no key (lse_s = -inf) are skipped, so their partial rows are never read.
template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(const Params p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rows = p.total_q * p.H;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + warp; r < rows; r += static_cast<int64_t>(gridDim.x) * 4) {
    const int64_t tok = r / p.H;
    const int h = static_cast<int>(r % p.H);
    float mx = -INFINITY;
    bool nan = false;  // a kv-cache row that does not fit (its pieces are NaN)
    for (int sp = 0; sp < p.n_splits; ++sp) {
      const float ls = p.lse_part[sp * rows + r];
      nan = nan || ls != ls;
      mx = fmaxf(mx, ls);
    }
    T* dst = static_cast<T*>(p.out) + r * p.Dv;
    if (nan) {
      for (int d = lane; d < p.Dv; d += 32) dst[d] = from_float<T>(NAN);
      if (lane == 0) p.lse[lse_index_tok(p, tok, h)] = NAN;
      continue;
    }
    if (mx == -INFINITY) {
      for (int d = lane; d < p.Dv; d += 32) dst[d] = from_float<T>(0.f);
      if (lane == 0) p.lse[lse_index_tok(p, tok, h)] = -INFINITY;
      continue;
    }
    float sum = 0.f;
    for (int sp = 0; sp < p.n_splits; ++sp) {
      const float ls = p.lse_part[sp * rows + r];
      if (ls != -INFINITY) sum += expf(ls - mx);
    }
    const float inv = 1.f / sum;
    for (int d = lane; d < p.Dv; d += 32) {
      float acc = 0.f;
      for (int sp = 0; sp < p.n_splits; ++sp) {
        const float ls = p.lse_part[sp * rows + r];
        if (ls != -INFINITY) acc = fmaf(expf(ls - mx), p.out_part[(sp * rows + r) * p.Dv + d], acc);
      }
      dst[d] = from_float<T>(acc * inv);
    }
    if (lane == 0) p.lse[lse_index_tok(p, tok, h)] = mx + logf(sum);
  }
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
