// PTX wrappers of the tensor-core attention kernels (sm_80+: cp.async, ldmatrix, mma.sync
// m16n8k16) and the warp-level products built from them: A B^T from shared-memory tiles and
// P C from score accumulators. The emulator (csrc/emu) computes each instruction from the PTX
// ISA's description.
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

}  // namespace cuda
}  // namespace attention
}  // namespace pk
