// SIMT backward kernels of the CUDA flash attention (any dtype, the caller's mask, any
// head_dim up to 256): the path for float32, for attn_mask, and for GPUs before sm_80. See
// attention_bwd.cu for the scheme.
#pragma once
#include "attention_common.cuh"

namespace pk {
namespace attention {
namespace cuda {

// Di = rowsum(dO * O) - dlse, laid out like lse. One warp per (token, head); dout and out are
// contiguous (tokens, H, Dv).
template <typename T>
__global__ void __launch_bounds__(128) bwd_dot_kernel(const AttnParams p, const T* __restrict__ dout,
                                                      const T* __restrict__ out, const float* __restrict__ dlse,
                                                      float* __restrict__ Di) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rows = p.total_q * p.H;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + warp; r < rows; r += static_cast<int64_t>(gridDim.x) * 4) {
    const T* a = dout + r * p.Dv;
    const T* c = out + r * p.Dv;
    float acc = 0.f;
    for (int d = lane; d < p.Dv; d += 32) acc = fmaf(to_float<T>(a[d]), to_float<T>(c[d]), acc);
    acc = warp_sum(acc);
    if (lane == 0) {
      const int64_t li = lse_index_tok(p, r / p.H, static_cast<int>(r % p.H));
      Di[li] = acc - (dlse != nullptr ? dlse[li] : 0.f);
    }
  }
}

// dQ: one warp per (query row, head). Keys go by 32 at a time, a lane per key:
//   p = exp(s - lse), dp = dO . v, ds = p (dp - Di) (times 1 - tanh^2 under a soft-cap);
// then dq += ds k over the lanes' keys.
template <typename T, int kDPL>
__global__ void __launch_bounds__(128) bwd_dq_rows_kernel(const AttnParams p, const T* __restrict__ dout,
                                                          const float* __restrict__ lse, const float* __restrict__ Di,
                                                          T* __restrict__ dq) {
  __shared__ float q_sh[4][32 * kDPL];
  __shared__ float do_sh[4][32 * kDPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qs = q_sh[warp];
  float* dos = do_sh[warp];
  const int G = p.H / p.Hk;
  const Dropout drop = resolve_dropout(p);
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const Seq s = seq_info(p, b);
    const Window w = seq_window(p, s);
    const int64_t rows = s.lq * p.H;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + warp; r < rows; r += static_cast<int64_t>(gridDim.x) * 4) {
      const int64_t i = r / p.H;
      const int h = static_cast<int>(r % p.H), hk = h / G;
      const int64_t li = lse_index(p, b, s, h, i);
      const float L = lse[li], di = Di[li];
      const float L2 = L * kLog2e;
      const T* qrow = static_cast<const T*>(p.q) + s.q_off + i * p.q_ss + h * p.q_sh;
      const T* dorow = dout + ((s.tok0 + i) * p.H + h) * p.Dv;
      const T* kbase = static_cast<const T*>(p.k) + s.k_off + hk * p.k_sh;
      const T* vbase = static_cast<const T*>(p.v) + s.v_off + hk * p.v_sh;
      // with score modifiers: natural-log scores, modified, then base 2 (as the forward)
      const bool mod = p.has_score_mod();
      const float slope = alibi_slope(p, b, h);
      __syncwarp();
      for (int d = lane; d < 32 * kDPL; d += 32) {
        qs[d] = d < p.D ? to_float<T>(qrow[d]) * (mod ? p.scale : p.scale_log2) : 0.f;
        dos[d] = d < p.Dv ? to_float<T>(dorow[d]) : 0.f;
      }
      __syncwarp();
      float acc[kDPL];
#pragma unroll
      for (int y = 0; y < kDPL; ++y) acc[y] = 0.f;
      const int64_t kb = key_lo(w, i), ke = L == -INFINITY ? kb : key_hi(w, i, s.lk);
      DropoutRow keep(dropout_row_index(b, h, p.H, i));
      for (int64_t jc = kb; jc < ke; jc += 32) {
        const int64_t j = jc + lane;
        const float mf = keep.factor(drop, jc, lane);  // every lane, before the branch (it shuffles)
        float ds = 0.f;
        if (j < ke) {
          float x = dot_row<T>(qs, kbase + j * p.k_ss, p.D, p.k_vec), dcap = 1.f;
          if (mod) x = modified_score_log2(p, x, slope, w, i, j, &dcap);
          if (p.has_mask()) x += mask_log2(p, b, h, i, j);
          const float pj = exp2f(x - L2);
          const float dp = dot_row<T>(dos, vbase + j * p.v_ss, p.Dv, p.v_vec);
          ds = pj * (dp * mf - di) * dcap;
        }
        const int n = static_cast<int>(imin(32, ke - jc));
        for (int jj = 0; jj < n; ++jj) {
          const float dsv = __shfl_sync(0xffffffffu, ds, jj);
          if (dsv == 0.f) continue;
          const T* kr = kbase + (jc + jj) * p.k_ss;
#pragma unroll
          for (int y = 0; y < kDPL; ++y) {
            const int d = lane + 32 * y;
            if (d < p.D) acc[y] = fmaf(dsv, to_float<T>(kr[d]), acc[y]);
          }
        }
      }
      T* dst = dq + ((s.tok0 + i) * p.H + h) * p.D;
#pragma unroll
      for (int y = 0; y < kDPL; ++y) {
        const int d = lane + 32 * y;
        if (d < p.D) dst[d] = from_float<T>(acc[y] * p.scale);
      }
    }
  }
}

// dK, dV: one warp per (key, kv head). For every query head of the group, the queries that
// see the key go by 32 at a time, a lane per query:
//   p = exp(s - lse), dp = dO . v, ds = p (dp - Di); dv += p dO, dk += ds q
// (with dropout, M the keep factor: ds = p (dp M - Di), dv += p M dO).
template <typename T, int kDPL>
__global__ void __launch_bounds__(128) bwd_dkdv_rows_kernel(const AttnParams p, const T* __restrict__ dout,
                                                            const float* __restrict__ lse,
                                                            const float* __restrict__ Di, T* __restrict__ dk,
                                                            T* __restrict__ dv) {
  __shared__ float k_sh[4][32 * kDPL];
  __shared__ float v_sh[4][32 * kDPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* ks = k_sh[warp];
  float* vs = v_sh[warp];
  const int G = p.H / p.Hk;
  const Dropout drop = resolve_dropout(p);
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const Seq s = seq_info(p, b);
    const Window w = seq_window(p, s);
    const int64_t rows = s.lk * p.Hk;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + warp; r < rows; r += static_cast<int64_t>(gridDim.x) * 4) {
      const int64_t j = r / p.Hk;
      const int hk = static_cast<int>(r % p.Hk);
      const T* krow = static_cast<const T*>(p.k) + s.k_off + j * p.k_ss + hk * p.k_sh;
      const T* vrow = static_cast<const T*>(p.v) + s.v_off + j * p.v_ss + hk * p.v_sh;
      const bool mod = p.has_score_mod();
      __syncwarp();
      for (int d = lane; d < 32 * kDPL; d += 32) {
        ks[d] = d < p.D ? to_float<T>(krow[d]) * (mod ? p.scale : p.scale_log2) : 0.f;
        vs[d] = d < p.Dv ? to_float<T>(vrow[d]) : 0.f;
      }
      __syncwarp();
      float ak[kDPL], av[kDPL];
#pragma unroll
      for (int y = 0; y < kDPL; ++y) ak[y] = av[y] = 0.f;
      const int64_t qlo = query_lo(w, j, s.lq), qhi = query_hi(w, j + 1, s.lq);
      for (int g = 0; g < G; ++g) {
        const int h = hk * G + g;
        const float slope = alibi_slope(p, b, h);
        const T* qbase = static_cast<const T*>(p.q) + s.q_off + h * p.q_sh;
        const T* dobase = dout + (s.tok0 * p.H + h) * p.Dv;
        for (int64_t ic = qlo; ic < qhi; ic += 32) {
          const int64_t i = ic + lane;
          float pi = 0.f, ds = 0.f;
          if (i < qhi && visible(w, i, j)) {
            const int64_t li = lse_index(p, b, s, h, i);
            const float L = lse[li];
            if (L != -INFINITY) {
              float x = dot_row<T>(ks, qbase + i * p.q_ss, p.D, p.q_vec), dcap = 1.f;
              if (mod) x = modified_score_log2(p, x, slope, w, i, j, &dcap);
              if (p.has_mask()) x += mask_log2(p, b, h, i, j);
              pi = exp2f(x - L * kLog2e);
              const float dp = dot_row<T>(vs, dobase + i * p.H * p.Dv, p.Dv, false);
              const float mf = dropout_factor(drop, b, h, p.H, i, j);
              ds = pi * (dp * mf - Di[li]) * dcap;
              pi *= mf;  // dV takes P M
            }
          }
          const int n = static_cast<int>(imin(32, qhi - ic));
          for (int ii = 0; ii < n; ++ii) {
            const float pv = __shfl_sync(0xffffffffu, pi, ii);
            const float dsv = __shfl_sync(0xffffffffu, ds, ii);
            if (pv == 0.f && dsv == 0.f) continue;
            const T* qr = qbase + (ic + ii) * p.q_ss;
            const T* dr = dobase + (ic + ii) * p.H * p.Dv;
#pragma unroll
            for (int y = 0; y < kDPL; ++y) {
              const int d = lane + 32 * y;
              if (d < p.D) ak[y] = fmaf(dsv, to_float<T>(qr[d]), ak[y]);
              if (d < p.Dv) av[y] = fmaf(pv, to_float<T>(dr[d]), av[y]);
            }
          }
        }
      }
      T* dkr = dk + ((s.ktok0 + j) * p.Hk + hk) * p.D;
      T* dvr = dv + ((s.ktok0 + j) * p.Hk + hk) * p.Dv;
#pragma unroll
      for (int y = 0; y < kDPL; ++y) {
        const int d = lane + 32 * y;
        if (d < p.D) dkr[d] = from_float<T>(ak[y] * p.scale);
        if (d < p.Dv) dvr[d] = from_float<T>(av[y]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
