// Split-KV combine of the CUDA flash attention: merges the partial outputs and lse that the
// forward kernels write per key split (flash decoding).
#pragma once
#include "attention_common.cuh"

namespace pk {
namespace attention {
namespace cuda {

// ---- split-KV combine -----------------------------------------------------------------------

// One warp per (token, head): out = sum_s e^(lse_s - lse) out_s, lse = log sum_s e^lse_s.
// Splits that saw no key (lse_s = -inf) are skipped, so their partial rows are never read.
template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(const AttnParams p) {
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
