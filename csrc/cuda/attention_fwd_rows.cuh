// SIMT forward of the CUDA flash attention (any dtype: float32 inputs, GPUs before sm_80),
// one warp per query row. See attention_fwd.cu for the essay.
#pragma once
#include "attention_common.cuh"

namespace pk {
namespace attention {
namespace cuda {

// ---- SIMT forward (any dtype) ---------------------------------------------------------------


// One warp per (query row, head, split); a lane per key for the scores, a lane per
// head-dim slot for the output. kDPL: head-dim slots per lane (D, Dv <= 32 kDPL).
template <typename T, int kDPL>
__global__ void __launch_bounds__(128) fwd_rows_kernel(const AttnParams p) {
  __shared__ float q_sh[4][32 * kDPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qs = q_sh[warp];
  const int G = p.H / p.Hk;
  const Dropout drop = resolve_dropout(p);
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
        // With score modifiers the scores are formed in natural-log units (scale, not
        // scale * log2 e), modified, then taken to base 2.
        const bool mod = p.has_score_mod();
        const float qscale = mod ? p.scale : p.scale_log2, slope = alibi_slope(p, b, h);
        __syncwarp();
        for (int d = lane; d < 32 * kDPL; d += 32) qs[d] = d < p.D ? to_float<T>(qrow[d]) * qscale : 0.f;
        __syncwarp();
        float o[kDPL];
#pragma unroll
        for (int x = 0; x < kDPL; ++x) o[x] = 0.f;
        float m_run = -INFINITY, l_run = 0.f;
        DropoutRow keep(dropout_row_index(b, h, p.H, i));
        for (int64_t jc = kb; jc < ke; jc += 32) {
          const int64_t j = jc + lane;
          float x = -INFINITY;
          int64_t v_off = 0;  // paged: value row j's offset, looked up here once for the warp
          if (j < ke) {  // [kb, ke) lies inside the window: only the caller's mask can hide a key
            x = dot_row<T>(qs, kbase + kv_row_offset(p, s, j, p.k_sb, p.k_ss), p.D, p.k_vec);
            if (s.pages != nullptr) v_off = kv_row_offset(p, s, j, p.v_sb, p.v_ss);
            if (mod) x = modified_score_log2(p, x, slope, w, i, j);
            if (p.has_mask()) x += mask_log2(p, b, h, i, j);
          }
          const float m_new = fmaxf(m_run, warp_max(x));
          const float m_safe = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m_run - m_safe);
          float pj = exp2f(x - m_safe);
          l_run = l_run * alpha + warp_sum(pj);  // the statistics stay without dropout
          if (drop.on() && keep.bits(drop, jc, lane) < drop.threshold && j < ke) pj = 0.f;
          m_run = m_new;
#pragma unroll
          for (int y = 0; y < kDPL; ++y) o[y] *= alpha;
          const int n = static_cast<int>(imin(32, ke - jc));
          for (int jj = 0; jj < n; ++jj) {
            const float pv = __shfl_sync(0xffffffffu, pj, jj);
            if (pv == 0.f) continue;  // the same for every lane
            const T* vr = vbase + (s.pages != nullptr ? __shfl_sync(0xffffffffu, v_off, jj) : (jc + jj) * p.v_ss);
#pragma unroll
            for (int y = 0; y < kDPL; ++y) {
              const int d = lane + 32 * y;
              if (d < p.Dv) o[y] = fmaf(pv, to_float<T>(vr[d]), o[y]);
            }
          }
        }
        const float inv = l_run > 0.f ? (drop.on() ? drop.rscale : 1.f) / l_run : s.empty_scale;
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

}  // namespace cuda
}  // namespace attention
}  // namespace pk
