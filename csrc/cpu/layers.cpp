// CPU kernels of the decoder-layer ops pk.rms_norm, pk.swiglu and pk.gelu (the math, the layouts and the
// checks are csrc/common/layers.h, the host side csrc/common/layers_ops.h, both shared with
// csrc/cuda/layers.cu).
//
// rms_norm: at::parallel_for over rows. A row is two passes over x, which stays in L1 between
// them: the sum of squares, then the output. The backward is also two passes per row (the dot
// sum(dy * (offset + w) * x), then dx) and adds dy * n into the weight-gradient partial sums of
// the row's block; the blocks (csrc/common/layers.h, fixed by the row count) are summed in
// order afterwards, so no result depends on the thread count. Only rstd per row is saved by the
// forward. swiglu and gelu: one pass over the flattened tensors, forward and backward (the
// activation recomputed from the input), at::parallel_for over chunks.
//
// With AVX-512 (picked at run time, csrc/cpu/cpu_isa.h) float32, float16 and bfloat16 rows go
// sixteen lanes at a time: the half types are widened to float32 on load and rounded to
// nearest-even on store, and exp is a Cephes-style polynomial scaled by 2^n (_mm512_scalef_ps,
// within 2 ulp of expf). gelu's tanh form is x / (1 + exp(-2u)) (csrc/common/layers.h), one
// exp16 and a division; its exact form needs erfc, here Numerical Recipes' erfcc (Chebyshev fit,
// fractional error below 1.2e-7) with z^2 = hi + lo split exactly (an FMA), so that the lower
// tail keeps its relative accuracy (within the x^2 ulps that rounding x / sqrt 2 costs anyway).
// Elsewhere, and for float64, plain loops in the math dtype (erfcf / expf of the C library).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/layers_ops.h"
#include "cpu_isa.h"

namespace pk {
namespace layers {
namespace {

constexpr int64_t kMaxWgradBlocks = 64;

// ---- AVX-512: sixteen lanes of float32 from / to each dtype ------------------------------------
#if PK_X86
template <typename T>
struct V16;

template <>
struct V16<float> {
  PK_TARGET_AVX512 static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  PK_TARGET_AVX512 static void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
  PK_TARGET_AVX512 static __m512 round(__m512 v) { return v; }
};

template <>
struct V16<c10::BFloat16> {
  PK_TARGET_AVX512 static __m512 load(const c10::BFloat16* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
  PK_TARGET_AVX512 static void store(c10::BFloat16* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(cpu::bf16_bits_avx512(v)));
  }
  PK_TARGET_AVX512 static __m512 round(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(cpu::bf16_bits_avx512(v), 16)); }
};

template <>
struct V16<c10::Half> {
  PK_TARGET_AVX512 static __m512 load(const c10::Half* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  PK_TARGET_AVX512 static void store(c10::Half* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  PK_TARGET_AVX512 static __m512 round(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

PK_TARGET_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// exp of sixteen lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n.
// NaN stays NaN, large inputs give inf, small ones 0.
PK_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// erfc of sixteen lanes (see the top of the file): t = 1 / (1 + z / 2), z = |x|,
// erfc(z) = t exp(-z^2 + P(t)); erfc(x) = 2 - erfc(z) for x < 0. z is capped at 10.5, where
// erfc has long underflowed (so that z^2 stays finite); NaN stays NaN. t is rcp14 refined by one
// Newton step (relative error ~2^-28). Without `gauss` one exp: exp((P - lo) - hi), z^2 = hi + lo
// exactly, whose rounding (half an ulp of z^2 + 1.3) stays below the error that rounding x / sqrt 2
// itself brings (z^2 ulps); with it (the backward) exp(-hi) and exp(P - lo) apart, and *gauss =
// exp(-x^2) = exp(-hi) (1 - lo) (lo < ulp(hi) / 2) for the normal density.
PK_TARGET_AVX512 inline __m512 erfc16(__m512 x, __m512* gauss = nullptr) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_min_ps(_mm512_set1_ps(10.5f), _mm512_abs_ps(x));
  const __m512 d = _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), one);
  const __m512 t0 = _mm512_rcp14_ps(d);
  const __m512 t = _mm512_mul_ps(t0, _mm512_fnmadd_ps(d, t0, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  const __m512 hi = _mm512_mul_ps(z, z);
  const __m512 lo = _mm512_fmsub_ps(z, z, hi);  // z^2 - hi, exactly
  __m512 r;
  if (gauss == nullptr) {
    r = _mm512_mul_ps(t, exp16(_mm512_sub_ps(_mm512_sub_ps(p, lo), hi)));
  } else {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), hi));
    r = _mm512_mul_ps(_mm512_mul_ps(t, e), exp16(_mm512_sub_ps(p, lo)));
    *gauss = _mm512_fnmadd_ps(e, lo, e);
  }
  return _mm512_mask_sub_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_set1_ps(2.0f), r);
}

// gelu of sixteen lanes and its derivative (csrc/common/layers.h).
PK_TARGET_AVX512 inline __m512 gelu16(__m512 x, GeluApprox approx) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (approx == GeluApprox::kTanh) {
    const __m512 m2u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(kGeluKappa)),
                                                                      _mm512_mul_ps(x, x), one)),
                                     _mm512_set1_ps(static_cast<float>(-2 * kGeluBeta)));
    return _mm512_div_ps(x, _mm512_add_ps(one, exp16(m2u)));
  }
  const __m512 c = erfc16(_mm512_mul_ps(x, _mm512_set1_ps(static_cast<float>(-kGeluSqrt1_2))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), c);
}

PK_TARGET_AVX512 inline __m512 gelu_derivative16(__m512 x, GeluApprox approx) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 x2 = _mm512_mul_ps(x, x);
  if (approx == GeluApprox::kTanh) {
    const __m512 m2u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(kGeluKappa)),
                                                                      x2, one)),
                                     _mm512_set1_ps(static_cast<float>(-2 * kGeluBeta)));
    const __m512 e = exp16(m2u);
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __m512 om = _mm512_mask_mul_ps(_mm512_sub_ps(one, s), _mm512_cmp_ps_mask(m2u, _mm512_setzero_ps(), _CMP_LE_OQ),
                                         e, s);
    // x^2 capped (kGeluX2Cap) so that k stays finite where x s (1 - s) is 0 anyway
    const __m512 k = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(6 * kGeluKappa * kGeluBeta)),
                                     _mm512_min_ps(_mm512_set1_ps(static_cast<float>(kGeluX2Cap)), x2),
                                     _mm512_set1_ps(static_cast<float>(2 * kGeluBeta)));
    return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, s), om), k, s);
  }
  __m512 gauss;  // exp(-x^2 / 2)
  const __m512 cdf = _mm512_mul_ps(
      _mm512_set1_ps(0.5f), erfc16(_mm512_mul_ps(x, _mm512_set1_ps(static_cast<float>(-kGeluSqrt1_2))), &gauss));
  const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(kGeluInvSqrt2Pi)), gauss);
  return _mm512_fmadd_ps(x, pdf, cdf);
}

template <typename scalar_t>
PK_TARGET_AVX512 void gelu_fwd_avx512(const scalar_t* x, scalar_t* out, int64_t n, GeluApprox approx) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    V16<scalar_t>::store(out + i, gelu16(V16<scalar_t>::load(x + i, m), approx), m);
  }
}

template <typename scalar_t>
PK_TARGET_AVX512 void gelu_bwd_avx512(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n,
                                      GeluApprox approx) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 d = gelu_derivative16(V16<scalar_t>::load(x + i, m), approx);
    V16<scalar_t>::store(dx + i, _mm512_mul_ps(V16<scalar_t>::load(dy + i, m), d), m);
  }
}

template <typename scalar_t>
PK_TARGET_AVX512 float norm_fwd_row_avx512(const scalar_t* x, scalar_t* y, const float* scale, int64_t D, float eps,
                                           bool round_before) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __m512 v = V16<scalar_t>::load(x + j, tail_mask(D - j));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float rstd = rms_rstd<float>(_mm512_reduce_add_ps(acc), D, eps);
  const __m512 r = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = tail_mask(D - j);
    __m512 n = _mm512_mul_ps(V16<scalar_t>::load(x + j, m), r);
    if (round_before) n = V16<scalar_t>::round(n);
    V16<scalar_t>::store(y + j, _mm512_mul_ps(n, _mm512_maskz_loadu_ps(m, scale + j)), m);
  }
  return rstd;
}

template <typename scalar_t>
PK_TARGET_AVX512 void norm_bwd_row_avx512(const scalar_t* dy, const scalar_t* x, scalar_t* dx, float* dw,
                                          const float* scale, int64_t D, float rstd, bool round_before) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = tail_mask(D - j);
    const __m512 dn = _mm512_mul_ps(V16<scalar_t>::load(dy + j, m), _mm512_maskz_loadu_ps(m, scale + j));
    acc = _mm512_fmadd_ps(dn, V16<scalar_t>::load(x + j, m), acc);
  }
  const float dot_over_d = _mm512_reduce_add_ps(acc) * rstd / static_cast<float>(D);
  const __m512 r = _mm512_set1_ps(rstd), k = _mm512_set1_ps(dot_over_d);
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = tail_mask(D - j);
    const __m512 g = V16<scalar_t>::load(dy + j, m);
    const __m512 n = _mm512_mul_ps(V16<scalar_t>::load(x + j, m), r);
    const __m512 dn = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, scale + j));
    V16<scalar_t>::store(dx + j, _mm512_mul_ps(r, _mm512_sub_ps(dn, _mm512_mul_ps(n, k))), m);
    if (dw != nullptr) {
      const __m512 f = round_before ? V16<scalar_t>::round(n) : n;
      _mm512_mask_storeu_ps(dw + j, m, _mm512_fmadd_ps(g, f, _mm512_maskz_loadu_ps(m, dw + j)));
    }
  }
}

template <typename scalar_t>
PK_TARGET_AVX512 void swiglu_fwd_avx512(const scalar_t* g, const scalar_t* u, scalar_t* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 gv = V16<scalar_t>::load(g + i, m);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
    const __m512 a = V16<scalar_t>::round(_mm512_div_ps(gv, den));
    V16<scalar_t>::store(out + i, _mm512_mul_ps(a, V16<scalar_t>::load(u + i, m)), m);
  }
}

template <typename scalar_t>
PK_TARGET_AVX512 void swiglu_bwd_avx512(const scalar_t* dy, const scalar_t* g, const scalar_t* u, scalar_t* dg,
                                        scalar_t* du, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 gv = V16<scalar_t>::load(g + i, m);
    const __m512 dv = V16<scalar_t>::load(dy + i, m);
    const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
    const __m512 s = _mm512_div_ps(one, den);
    const __m512 a = V16<scalar_t>::round(_mm512_div_ps(gv, den));
    V16<scalar_t>::store(du + i, _mm512_mul_ps(dv, a), m);
    const __m512 ds = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, s))));
    V16<scalar_t>::store(dg + i, _mm512_mul_ps(_mm512_mul_ps(dv, V16<scalar_t>::load(u + i, m)), ds), m);
  }
}
#endif  // PK_X86

template <typename scalar_t>
constexpr bool kVectorised = PK_X86 && !std::is_same<scalar_t, double>::value;

inline bool use_avx512() {
#if PK_X86
  return cpu::has_isa(cpu::Isa::kAvx512);
#else
  return false;
#endif
}

// ---- plain loops (any dtype; float64 always) ---------------------------------------------------

template <typename scalar_t, typename acc_t>
acc_t norm_fwd_row(const scalar_t* x, scalar_t* y, const acc_t* scale, int64_t D, acc_t eps, bool round_before) {
  acc_t s = 0;
  for (int64_t j = 0; j < D; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    s += v * v;
  }
  const acc_t rstd = rms_rstd<acc_t>(s, D, eps);
  for (int64_t j = 0; j < D; ++j)
    y[j] = rms_out<scalar_t, acc_t>(static_cast<acc_t>(x[j]), rstd, scale[j], round_before);
  return rstd;
}

template <typename scalar_t, typename acc_t>
void norm_bwd_row(const scalar_t* dy, const scalar_t* x, scalar_t* dx, acc_t* dw, const acc_t* scale, int64_t D,
                  acc_t rstd, bool round_before) {
  acc_t dot = 0;
  for (int64_t j = 0; j < D; ++j) dot += static_cast<acc_t>(dy[j]) * scale[j] * static_cast<acc_t>(x[j]);
  const acc_t dot_over_d = dot * rstd / static_cast<acc_t>(D);
  for (int64_t j = 0; j < D; ++j) {
    const acc_t g = static_cast<acc_t>(dy[j]);
    const acc_t n = static_cast<acc_t>(x[j]) * rstd;
    dx[j] = static_cast<scalar_t>(rms_dx<acc_t>(g * scale[j], n, rstd, dot_over_d));
    if (dw != nullptr) dw[j] += g * rms_wgrad_factor<scalar_t, acc_t>(n, round_before);
  }
}

// ---- the CPU backend of csrc/common/layers_ops.h ------------------------------------------------

template <typename scalar_t>
void rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out, at::Tensor& rstd,
                      const NormParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  const acc_t* sp = scale.data_ptr<acc_t>();
  acc_t* rp = rstd.data_ptr<acc_t>();
  const int64_t D = p.D;
  const bool avx = kVectorised<scalar_t> && use_avx512();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#if PK_X86
      if constexpr (kVectorised<scalar_t>) {
        if (avx) {
          rp[r] = norm_fwd_row_avx512<scalar_t>(xp + r * D, yp + r * D, sp, D, static_cast<float>(p.eps),
                                                p.round_before_weight);
          continue;
        }
      }
#endif
      rp[r] = norm_fwd_row<scalar_t, acc_t>(xp + r * D, yp + r * D, sp, D, static_cast<acc_t>(p.eps),
                                            p.round_before_weight);
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& rstd,
                      at::Tensor& dx, const at::Tensor& partial, const NormParams& p, int64_t rows_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const acc_t* sp = scale.data_ptr<acc_t>();
  const acc_t* rp = rstd.data_ptr<acc_t>();
  acc_t* pw = partial.defined() ? partial.data_ptr<acc_t>() : nullptr;
  const int64_t D = p.D;
  const bool avx = kVectorised<scalar_t> && use_avx512();
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* dw = pw != nullptr ? pw + b * D : nullptr;
      const int64_t end = std::min(p.rows, (b + 1) * rows_per_block);
      for (int64_t r = b * rows_per_block; r < end; ++r) {
#if PK_X86
        if constexpr (kVectorised<scalar_t>) {
          if (avx) {
            norm_bwd_row_avx512<scalar_t>(gp + r * D, xp + r * D, dxp + r * D, dw, sp, D, rp[r],
                                          p.round_before_weight);
            continue;
          }
        }
#endif
        norm_bwd_row<scalar_t, acc_t>(gp + r * D, xp + r * D, dxp + r * D, dw, sp, D, rp[r], p.round_before_weight);
      }
    }
  });
}

constexpr int64_t kElementwiseGrain = 8192;

struct CpuBackend {
  static constexpr int64_t kWgradBlocks = kMaxWgradBlocks;

  static void norm_forward(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out, at::Tensor& rstd,
                           const NormParams& p) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_rms_norm_cpu",
                                    [&] { rms_norm_fwd_cpu<scalar_t>(x, scale, out, rstd, p); });
  }

  static void norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& rstd, at::Tensor& dx, const at::Tensor& partial, const NormParams& p,
                            int64_t rows_per_block) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_rms_norm_backward_cpu", [&] {
      rms_norm_bwd_cpu<scalar_t>(dy, x, scale, rstd, dx, partial, p, rows_per_block);
    });
  }

  // The partial sums [blocks, D] summed over the blocks in order, then cast into dw.
  static void sum_blocks(const at::Tensor& partial, at::Tensor& dw) {
    at::Tensor acc = at::zeros({partial.size(1)}, partial.options());
    AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "pk_rms_norm_sum_blocks", [&] {
      const scalar_t* pp = partial.data_ptr<scalar_t>();
      scalar_t* ap = acc.data_ptr<scalar_t>();
      const int64_t blocks = partial.size(0), D = partial.size(1);
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t j = 0; j < D; ++j) ap[j] += pp[b * D + j];
    });
    dw.copy_(acc);
  }

  static void swiglu_forward(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
    const int64_t n = g.numel();
    const bool avx = use_avx512();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pk_swiglu_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* up = u.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
#if PK_X86
        if constexpr (kVectorised<scalar_t>) {
          if (avx) {
            swiglu_fwd_avx512<scalar_t>(gp + i0, up + i0, op + i0, i1 - i0);
            return;
          }
        }
#endif
        for (int64_t i = i0; i < i1; ++i)
          op[i] = swiglu_out<scalar_t, acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(up[i]));
      });
    });
  }

  static void swiglu_backward(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& dg,
                              at::Tensor& du) {
    const int64_t n = g.numel();
    const bool avx = use_avx512();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pk_swiglu_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* dp = dy.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* up = u.data_ptr<scalar_t>();
      scalar_t* dgp = dg.data_ptr<scalar_t>();
      scalar_t* dup = du.data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
#if PK_X86
        if constexpr (kVectorised<scalar_t>) {
          if (avx) {
            swiglu_bwd_avx512<scalar_t>(dp + i0, gp + i0, up + i0, dgp + i0, dup + i0, i1 - i0);
            return;
          }
        }
#endif
        for (int64_t i = i0; i < i1; ++i) {
          acc_t a, b;
          swiglu_grad<scalar_t, acc_t>(static_cast<acc_t>(dp[i]), static_cast<acc_t>(gp[i]),
                                       static_cast<acc_t>(up[i]), a, b);
          dgp[i] = static_cast<scalar_t>(a);
          dup[i] = static_cast<scalar_t>(b);
        }
      });
    });
  }

  static void gelu_forward(const at::Tensor& x, at::Tensor& out, GeluApprox approx) {
    const int64_t n = x.numel();
    const bool avx = use_avx512();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_gelu_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
#if PK_X86
        if constexpr (kVectorised<scalar_t>) {
          if (avx) {
            gelu_fwd_avx512<scalar_t>(xp + i0, op + i0, i1 - i0, approx);
            return;
          }
        }
#endif
        for (int64_t i = i0; i < i1; ++i) op[i] = gelu_out<scalar_t, acc_t>(static_cast<acc_t>(xp[i]), approx);
      });
    });
  }

  static void gelu_backward(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, GeluApprox approx) {
    const int64_t n = x.numel();
    const bool avx = use_avx512();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_gelu_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* dp = dy.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t i0, int64_t i1) {
#if PK_X86
        if constexpr (kVectorised<scalar_t>) {
          if (avx) {
            gelu_bwd_avx512<scalar_t>(dp + i0, xp + i0, dxp + i0, i1 - i0, approx);
            return;
          }
        }
#endif
        for (int64_t i = i0; i < i1; ++i)
          dxp[i] = gelu_grad<scalar_t, acc_t>(static_cast<acc_t>(dp[i]), static_cast<acc_t>(xp[i]), approx);
      });
    });
  }
};

// ---- entry points --------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                double eps, double offset, bool round_before_weight) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  return rms_norm_host<CpuBackend>(x, weight, eps, offset, round_before_weight);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const at::Tensor& rstd, double offset,
                                                         bool round_before_weight, bool weight_grad) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  return rms_norm_backward_host<CpuBackend>(grad, x, weight, rstd, offset, round_before_weight, weight_grad);
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu(), "gate: expected a CPU tensor, got one on ", gate.device());
  return swiglu_host<CpuBackend>(gate, up);
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu(), "gate: expected a CPU tensor, got one on ", gate.device());
  return swiglu_backward_host<CpuBackend>(grad, gate, up);
}

at::Tensor gelu_cpu(const at::Tensor& x, c10::string_view approximate) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  return gelu_host<CpuBackend>(x, approximate);
}

at::Tensor gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x, c10::string_view approximate) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  return gelu_backward_host<CpuBackend>(grad, x, approximate);
}

}  // namespace
}  // namespace layers
}  // namespace pk

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) {
  m.impl("rms_norm", &pk::layers::rms_norm_cpu);
  m.impl("rms_norm_backward", &pk::layers::rms_norm_backward_cpu);
  m.impl("swiglu", &pk::layers::swiglu_cpu);
  m.impl("swiglu_backward", &pk::layers::swiglu_backward_cpu);
  m.impl("gelu", &pk::layers::gelu_cpu);
  m.impl("gelu_backward", &pk::layers::gelu_backward_cpu);
}
