// Device-side pieces shared by the CUDA attention kernels (attention_fwd_*.cuh,
// attention_bwd_*.cuh, attention_decode.cu): the problem description handed to every kernel,
// per-sequence bookkeeping, the caller's mask and small warp helpers. It stays free of ATen so
// that the per-(dtype, head dim) kernel files of csrc/cuda/instances/ compile quickly; the
// host-side checks and launch decisions live in attention_host.cuh.
//
// The visibility rules (causal / sliding window / bottom-right alignment / prefix-LM) and the tile
// skipping come from csrc/common/attention.h, the same functions the CPU kernels call, so
// both backends see exactly the same keys for every query.
//
// Robustness without host synchronisation: cu_seqlens and cache_seqlens live on the GPU and
// are never read by the host. The kernels clamp every offset they read from cu_seqlens into
// the tensors' bounds, so a malformed tensor cannot make a kernel touch memory outside its
// inputs (the CPU op validates cu_seqlens and raises; the CUDA op cannot without a sync). A
// cache row whose tokens do not fit follows one rule on both backends (cache_rows_fit), and
// prefix_lens values are clamped into [0, keys of the sequence] (make_window), as on the CPU
// for the values it accepts.
#pragma once
#include "cuda_seams.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/attention.h"
#include "../common/attention_dropout.h"

namespace pk {
namespace attention {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxSplits = 64;

// Everything a kernel needs to know about one call. Element strides are in elements.
struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;  // sb unused for varlen (tokens start at cu[b])
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  bool q_vec = false, k_vec = false, v_vec = false;  // rows may be read in 16-byte chunks
  bool dout_vec = false;  // backward: dout (contiguous) may be read in 16-byte chunks

  void* out = nullptr;         // (tokens, H, Dv), contiguous, input dtype
  float* lse = nullptr;        // (B, H, sq) dense, (H, total_q) varlen
  float* out_part = nullptr;   // split-KV partial outputs [splits][total_q][H][Dv] (float), or null
  float* lse_part = nullptr;   // split-KV partial lse [splits][total_q][H]

  int batch = 0, H = 0, Hk = 0, D = 0, Dv = 0;
  int64_t sq = 0, sk = 0;      // dense lengths (for a kv cache: sk is the cache length)
  int64_t total_q = 0, total_k = 0;
  const int32_t* cu_q = nullptr;       // varlen offsets [batch + 1] (device)
  const int32_t* cu_k = nullptr;
  const int32_t* seqlens_k = nullptr;  // kv cache: keys per row (device), plus seqlens_k_extra
  int64_t seqlens_k_extra = 0;
  const int32_t* prefix_lens = nullptr;  // prefix-LM: bidirectional prefix per sequence [batch] (device), or null
  // Paged kv cache: key j of row b lives in block block_table[b * bt_sb + j / page_size], slot
  // j % page_size (paged_offset, csrc/common/attention.h); k_sb / v_sb are then the caches'
  // block strides and k_ss / v_ss their slot strides.
  const int32_t* block_table = nullptr;
  int64_t bt_sb = 0, page_size = 0;

  const bool* mask_bool = nullptr;     // (b, h, i, j) through strides; true = attend
  const float* mask_float = nullptr;   // added to the scores (natural-log units)
  int64_t m_sb = 0, m_sh = 0, m_si = 0, m_sj = 0;

  float scale = 1.f;        // softmax scale
  float scale_log2 = 1.f;   // scale * log2(e): the kernels work in base 2
  // Score modifiers (csrc/common/attention.h): soft-cap (0: off) and ALiBi slopes (device,
  // float32, b * alibi_sb + h * alibi_sh; alibi_sb 0 for [heads] slopes), or null.
  float softcap = 0.f;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = true;
  // Attention dropout (csrc/common/attention_dropout.h), on the SIMT and the tensor-core kernels
  // alike. seed / offset from the host, or read from dropout.seed_dev (resolve_dropout).
  Dropout dropout;

  bool pack_gqa = false;    // tensor-core forward: the G query heads of a kv head share a block
  bool fwd_tall = false;    // tensor-core forward: 128-row blocks (two m-tiles per warp), else 64
  int n_splits = 1;         // split-KV: key range of a query cut into this many pieces
  int64_t split_keys = 0;   // keys per piece (a multiple of the kernel's key block)

  __host__ __device__ bool has_mask() const { return mask_bool != nullptr || mask_float != nullptr; }
  __host__ __device__ bool has_score_mod() const { return softcap > 0.f || alibi != nullptr; }
};

// The dropout parameters with the seed and offset resolved: from the seed tensor on the GPU
// when it lives there (no host sync; the offset taken modulo 2^32).
__device__ __forceinline__ Dropout resolve_dropout(const AttnParams& p) {
  Dropout d = p.dropout;
  if (d.on() && d.seed_dev != nullptr) {
    d.seed = static_cast<uint64_t>(d.seed_dev[0]);
    d.offset = static_cast<uint32_t>(d.seed_dev[1]);
  }
  return d;
}

// The factor of element (b, h, i, j) under dropout: rscale when kept, 0 when dropped; 1 without.
__device__ __forceinline__ float dropout_factor(const Dropout& d, int64_t b, int h, int H, int64_t i, int64_t j) {
  if (!d.on()) return 1.f;
  return dropout_keep(d, dropout_row_index(b, h, H, i), j) ? d.rscale : 0.f;
}

// The keep mask of one row (sequence b, head h, query i) for a warp that walks the keys 32 at a
// time, a lane per key. Each Philox block serves 8 neighbouring keys (attention_dropout.h), so
// instead of every lane drawing its key's block (8 lanes drawing the same one), lane L draws
// block c0 + L once and holds it for the next 256 keys; a lane reads its key's words from the
// lane that holds them. Every lane of the warp must call bits() with the same jc (the warp's
// first key), also lanes whose key lies past the range (their value is then unused).
struct DropoutRow {
  uint64_t index;
  int64_t c0 = -1;  // the block lane 0 holds; -1: none drawn yet
  uint32_t w[4];

  __device__ __forceinline__ explicit DropoutRow(uint64_t row_index) : index(row_index) {}

  // The 16-bit value of key j = jc + lane (attention_dropout.h's dropout_bits, bit for bit).
  __device__ __forceinline__ uint32_t bits(const Dropout& d, int64_t jc, int lane) {
    const int64_t lo = jc >> 3, hi = (jc + 31) >> 3;
    if (c0 < 0 || lo < c0 || hi >= c0 + 32) {  // uniform across the warp
      c0 = lo;
      const Philox4x32 b = philox_draw(d.seed, index, d.offset, static_cast<uint32_t>(c0 + lane));
#pragma unroll
      for (int x = 0; x < 4; ++x) w[x] = b.v[x];
    }
    const int64_t j = jc + lane;
    const int src = static_cast<int>((j >> 3) - c0);
    uint32_t word[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) word[x] = __shfl_sync(0xffffffffu, w[x], src);
    const uint32_t v = word[(j & 7) >> 1];
    return (j & 1) ? (v >> 16) : (v & 0xFFFFu);
  }

  // rscale when key j = jc + lane is kept, 0 when dropped (1 without dropout).
  __device__ __forceinline__ float factor(const Dropout& d, int64_t jc, int lane) {
    if (!d.on()) return 1.f;
    return bits(d, jc, lane) >= d.threshold ? d.rscale : 0.f;
  }
};

// ---- dropout on mma.sync fragments ----------------------------------------------------------
// The tensor-core kernels hold scores in m16n8k16 accumulator fragments: lane 4 g + t holds, of
// each 16 x 8 tile, rows g and g + 8 and columns 2 t and 2 t + 1. A Philox block serves 8
// neighbouring keys of one query row (attention_dropout.h), so when the rows are queries (the
// forward, the dQ pass) the 8 keys of a block lie with the 4 lanes of a quad, and when the rows
// are keys (the dK/dV pass) with the 8 lanes of equal t. Instead of every lane drawing the block
// of each of its elements (4 or 8 lanes drawing the same one), each lane draws its share of the
// blocks once, compares the block's 8 values with the threshold into 8 keep bits, and the lanes
// exchange the bits by xor shuffles (3 or 7, one word each): no block is drawn twice in a warp.
// Every lane of the warp must call these together (they shuffle).

// The 8 keep bits of keys 8 c .. 8 c + 7 of row `index` (bit x: key 8 c + x).
__device__ __forceinline__ uint32_t dropout_keep8(const Dropout& d, uint64_t index, uint32_t c) {
  const Philox4x32 w = philox_draw(d.seed, index, d.offset, c);
  uint32_t bits = 0;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    bits |= static_cast<uint32_t>((w.v[x] & 0xFFFFu) >= d.threshold) << (2 * x);
    bits |= static_cast<uint32_t>((w.v[x] >> 16) >= d.threshold) << (2 * x + 1);
  }
  return bits;
}

// Keep bits of one query row (Philox index `index`) across kNT n-tiles of 8 keys from key j0,
// a multiple of 8 (dropout_key_start): bit 2 nt + e is key j0 + 8 nt + 2 t + e, this lane's
// column 2 t + e of n-tile nt. Lane t of a quad draws the blocks of n-tiles t, t + 4, ...
template <int kNT>
__device__ __forceinline__ uint32_t dropout_keep_query_row(const Dropout& d, uint64_t index, int64_t j0, int t) {
  static_assert(kNT <= 16, "two keep bits per n-tile in one word");
  constexpr int kG = (kNT + 3) / 4;
  const uint32_t c0 = static_cast<uint32_t>(j0 >> 3);
  uint32_t own = 0;  // byte k: the keep bits of n-tile 4 k + t
#pragma unroll
  for (int k = 0; k < kG; ++k)
    if (4 * k + t < kNT) own |= dropout_keep8(d, index, c0 + static_cast<uint32_t>(4 * k + t)) << (8 * k);
  uint32_t keep = 0;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint32_t v = r == 0 ? own : __shfl_xor_sync(0xffffffffu, own, r);
    const int src = t ^ r;  // the quad lane that drew these blocks: n-tiles 4 k + src
#pragma unroll
    for (int k = 0; k < kG; ++k) keep |= ((v >> (8 * k + 2 * t)) & 3u) << (2 * (4 * k + src));
  }
  return keep;
}

// Keep bits of a fragment whose rows are keys: keys kr0 + g and kr0 + 8 + g (kr0 a multiple of
// 8) by kNT n-tiles of 8 queries from query i0 of (sequence b, head h of H). Bit 4 nt + x is
// register x of n-tile nt: key kr0 + g + 8 (x >> 1), query i0 + 8 nt + 2 t + (x & 1). Lane g
// draws, for k < kNT / 2, the block of bit 8 k + g of every lane with its t.
template <int kNT>
__device__ __forceinline__ uint32_t dropout_keep_key_rows(const Dropout& d, int64_t b, int h, int H, int64_t i0,
                                                          int64_t kr0, int g, int t) {
  static_assert(kNT % 2 == 0 && kNT <= 8, "four keep bits per n-tile in one word");
  constexpr int kG = kNT / 2;
  const uint32_t c0 = static_cast<uint32_t>(kr0 >> 3);
  uint32_t own = 0;  // byte k: the keep bits of the 8 keys of bit 8 k + g's block
#pragma unroll
  for (int k = 0; k < kG; ++k) {
    const int nt = 2 * k + (g >> 2), rr = (g >> 1) & 1, e = g & 1;
    own |= dropout_keep8(d, dropout_row_index(b, h, H, i0 + 8 * nt + 2 * t + e), c0 + static_cast<uint32_t>(rr))
           << (8 * k);
  }
  uint32_t keep = 0;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const uint32_t v = r == 0 ? own : __shfl_xor_sync(0xffffffffu, own, 4 * r);
    const int src = g ^ r;  // the lane (same t) that drew these blocks: bits 8 k + src
#pragma unroll
    for (int k = 0; k < kG; ++k) keep |= ((v >> (8 * k + g)) & 1u) << (8 * k + src);
  }
  return keep;
}

// The first key of a tensor-core key loop over [lo, hi): under dropout rounded down to a
// multiple of 8, so that the loop's 8-key n-tiles are whole Philox blocks (the keys before lo are
// masked like any hidden key).
__device__ __forceinline__ int64_t dropout_key_start(const Dropout& d, int64_t lo, int64_t hi) {
  return d.on() && lo < hi ? lo & ~int64_t(7) : lo;
}

// One sequence of the batch: where its rows live and how long it is.
struct Seq {
  int64_t tok0 = 0;          // first query token in out (tokens, H, Dv)
  int64_t ktok0 = 0;         // first key token in dk / dv (tokens, Hk, D)
  int64_t lq = 0, lk = 0;
  int64_t prefix = 0;        // prefix_lens[b] as given (make_window clamps it into [0, lk])
  int64_t q_off = 0, k_off = 0, v_off = 0;  // element offset of row 0 (head 0)
  const int32_t* pages = nullptr;           // paged kv cache: the row's block_table entries
  // Output factor and lse of a row that sees no key: 0 and -inf, or NaN for a kv-cache row
  // whose tokens do not fit (cache_rows_fit in csrc/common/attention.h).
  float empty_scale = 0.f, empty_lse = -INFINITY;
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

__device__ __forceinline__ Seq seq_info(const AttnParams& p, int64_t b) {
  Seq s;
  if (p.cu_q != nullptr) {
    const int64_t q0 = clamp64(p.cu_q[b], 0, p.total_q), q1 = clamp64(p.cu_q[b + 1], q0, p.total_q);
    const int64_t k0 = clamp64(p.cu_k[b], 0, p.total_k), k1 = clamp64(p.cu_k[b + 1], k0, p.total_k);
    s.tok0 = q0;
    s.ktok0 = k0;
    s.lq = q1 - q0;
    s.lk = k1 - k0;
    s.q_off = q0 * p.q_ss;
    s.k_off = k0 * p.k_ss;
    s.v_off = k0 * p.v_ss;
  } else {
    s.tok0 = b * p.sq;
    s.ktok0 = b * p.sk;
    s.lq = p.sq;
    s.lk = p.sk;
    if (p.seqlens_k != nullptr) {
      const int64_t len = p.seqlens_k[b];
      const bool fits = cache_rows_fit(len, p.seqlens_k_extra, p.sk);
      s.lk = fits ? len + p.seqlens_k_extra : 0;
      if (!fits) s.empty_scale = s.empty_lse = NAN;
    }
    s.q_off = b * p.q_sb;
    if (p.block_table != nullptr) {
      s.pages = p.block_table + b * p.bt_sb;
    } else {
      s.k_off = b * p.k_sb;
      s.v_off = b * p.v_sb;
    }
  }
  if (p.prefix_lens != nullptr) s.prefix = p.prefix_lens[b];
  return s;
}

// Element offset of key (or value) row j of a sequence from its row 0 (head 0): j rows of
// stride ss, or through the page table (sb: the cache's block stride).
__device__ __forceinline__ int64_t kv_row_offset(const AttnParams& p, const Seq& s, int64_t j, int64_t sb,
                                                 int64_t ss) {
  return s.pages != nullptr ? paged_offset(s.pages, p.page_size, j, sb, ss) : j * ss;
}

__device__ __forceinline__ int64_t lse_index(const AttnParams& p, int64_t b, const Seq& s, int h, int64_t i) {
  return p.cu_q != nullptr ? h * p.total_q + s.tok0 + i : (b * p.H + h) * p.sq + i;
}

// lse index of (token, head) without the sequence (used by the per-token passes).
__device__ __forceinline__ int64_t lse_index_tok(const AttnParams& p, int64_t tok, int h) {
  if (p.cu_q != nullptr) return h * p.total_q + tok;
  const int64_t b = tok / p.sq, i = tok - b * p.sq;
  return (b * p.H + h) * p.sq + i;
}

// Score adjustment from the caller's mask, in base-2 units: 0, -inf, or mask * log2(e), for
// the element at offset `off` (mask_row_offset + j * m_sj).
__device__ __forceinline__ float mask_log2_at(const AttnParams& p, int64_t off) {
  if (p.mask_bool != nullptr) return p.mask_bool[off] ? 0.f : -INFINITY;
  if (p.mask_float != nullptr) return p.mask_float[off] * kLog2e;
  return 0.f;
}
__device__ __forceinline__ int64_t mask_row_offset(const AttnParams& p, int64_t b, int h, int64_t i) {
  return b * p.m_sb + h * p.m_sh + i * p.m_si;
}
__device__ __forceinline__ float mask_log2(const AttnParams& p, int64_t b, int h, int64_t i, int64_t j) {
  return mask_log2_at(p, mask_row_offset(p, b, h, i) + j * p.m_sj);
}

// ALiBi slope of (sequence b, head h); 0 without slopes.
__device__ __forceinline__ float alibi_slope(const AttnParams& p, int64_t b, int h) {
  return p.alibi != nullptr ? p.alibi[b * p.alibi_sb + h * p.alibi_sh] : 0.f;
}

// A score with the modifiers (modify_score, csrc/common/attention.h), in base-2 units: `s` is
// the scaled score scale * q.k in natural-log units; *dcap (optional) gets 1 - tanh^2.
__device__ __forceinline__ float modified_score_log2(const AttnParams& p, float s, float slope, const Window& w,
                                                     int64_t i, int64_t j, float* dcap = nullptr) {
  const float bias = p.alibi != nullptr ? alibi_bias(slope, w, i, j) : 0.f;
  return modify_score(s, p.softcap, bias, dcap) * kLog2e;
}

__device__ __forceinline__ Window seq_window(const AttnParams& p, const Seq& s) {
  return make_window(p.window_left, p.window_right, p.bottom_right, s.lq, s.lk, s.prefix);
}

// Keys [lo, hi) that split `split` of a query block's interval [kb, ke) covers.
__device__ __forceinline__ void split_range(const AttnParams& p, int split, int64_t kb, int64_t ke, int64_t& lo,
                                            int64_t& hi) {
  if (p.n_splits <= 1) {
    lo = kb;
    hi = ke;
    return;
  }
  lo = imax(kb, split * p.split_keys);
  // the last piece runs to the end, whatever bound the split size was computed from
  hi = split == p.n_splits - 1 ? ke : imin(ke, (split + 1) * p.split_keys);
}

// ---- element conversions ------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- warp helpers -------------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tensor-core forward layout: the head groups a grid row walks (query heads, or kv heads
// when pack_gqa puts a GQA group's heads in one block), and the block rows per group for
// sequences of up to q_bound queries.
PK_HD int fwd_row_groups(const AttnParams& p) { return p.pack_gqa ? p.Hk : p.H; }
PK_HD int64_t fwd_group_rows(const AttnParams& p, int64_t q_bound) {
  return p.pack_gqa ? q_bound * (p.H / p.Hk) : q_bound;
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
