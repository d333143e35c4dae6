// Tile geometry of the tensor-core forward and the cp.async tile loaders shared by the
// tensor-core forward and backward kernels.
#pragma once
#include "attention_ptx.cuh"

namespace pk {
namespace attention {
namespace cuda {

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

// Rows [j0, j0 + nrows) of K or V (g: row 0 of the sequence's kv head) into shared memory,
// strided or through the page table of a paged kv cache (paged_offset, csrc/common/attention.h).
// Paged, each thread follows the page and slot of its rows (they only grow) from one copy to the
// next and reads the table once per page it enters: no division or table read per 16-byte
// copy, and none at all for rows past nrows, whose entries may be invalid. The same copies
// and shared memory contents as load_tile_rows.
template <int kD, int kRows, int kThreads>
__device__ __forceinline__ void load_kv_tile(uint16_t* sm, const AttnParams& p, const Seq& s, const uint16_t* g,
                                             int64_t j0, int64_t sb, int64_t ss, int64_t nrows, int ncols, bool vec) {
  if (s.pages == nullptr) {
    load_tile<kD, kRows, kThreads>(sm, g + j0 * ss, ss, nrows, ncols, vec);
    return;
  }
  constexpr int kLd = kD + 8, kChunks = kD / 8;
  const int64_t page_size = p.page_size;
  int prev = static_cast<int>(threadIdx.x) / kChunks;  // the row of the last copy
  int64_t page = (j0 + prev) / page_size, slot = (j0 + prev) - page * page_size;
  int64_t looked_up = -1;  // the page whose block `base` points at
  const uint16_t* base = g;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    slot += r - prev;
    prev = r;
    if (slot >= page_size) {
      const int64_t n = slot / page_size;
      page += n;
      slot -= n * page_size;
    }
    uint16_t* dst = sm + r * kLd + c;
    const bool live = r < nrows;
    if (live && page != looked_up) {
      base = g + static_cast<int64_t>(s.pages[page]) * sb;
      looked_up = page;
    }
    const uint16_t* src = base + slot * ss;
    if (vec) {
      const bool ok = live && c < ncols;
      cp_async16(dst, ok ? src + c : g, ok ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = (live && c + e < ncols) ? src[c + e] : uint16_t(0);
    }
  }
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
