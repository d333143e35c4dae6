// Shared math of the denoising family (noising, loss weights, solver steps), compiled into
// both the CPU and the CUDA kernels so that the two backends compute the same thing.
//
// Every op of the family is "per-sample coefficients, then one elementwise pass":
//
//   * Step::coef(b, c) computes, in double precision, a handful of coefficients for
//     sample b from the per-sample timesteps / sigmas and the alphas_cumprod table (no
//     rounding of alphas_cumprod near 1, so sqrt(1 - alpha_bar) stays exact at t = 0).
//     The CPU runs it once per chunk of a sample, the CUDA kernel once per block.
//   * Step::apply(c, a0, a1, a2, a3, z, o0, o1) is the elementwise body: up to four input
//     values, one standard normal z (from a noise tensor or drawn from Philox), two
//     outputs. It is branch free over elements (clipping is a min/max against +-inf when
//     off), so the CPU loop vectorises. T is float for fp32/fp16/bf16 and double for fp64.
//
// Per-sample parameters are read through PerSample: a device/host pointer of any of
// int32/int64/float32/float64 with stride 0 (one value for the batch) or 1, or a constant
// taken from a CPU scalar tensor (so a CPU 0-d tensor can feed a CUDA kernel without a copy).
//
// Noise: element i (flat index into the contiguous sample) gets a standard normal from the
// Philox block i / 4 (see philox_normal below), with one Philox offset per op, so CPU and
// CUDA draw the same normals for a seed.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "philox.h"

#if defined(__CUDA_ARCH__)
#include <cassert>
#define PK_DEVICE_CHECK(cond) assert(cond)
#else
#define PK_DEVICE_CHECK(cond) ((void)0)
#endif

namespace pk {
namespace diffusion {

constexpr int kNumCoef = 12;

// Philox offsets ("DIF" + op number), one per noisy op.
constexpr uint32_t kDdpmOffset = 0x44494601u;
constexpr uint32_t kDdimOffset = 0x44494602u;
constexpr uint32_t kEulerOffset = 0x44494603u;
constexpr uint32_t kDpmOffset = 0x44494604u;
constexpr uint32_t kFlowOffset = 0x44494605u;

enum Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2, kFlowPrediction = 3 };
enum Target : int { kTargetEpsilon = 0, kTargetV = 1, kTargetSample = 2, kTargetFlow = 3 };
enum Variance : int { kFixedSmall = 0, kFixedSmallLog = 1, kFixedLarge = 2 };
enum Weighting : int { kWeightNone = 0, kWeightMinSnr = 1 };

// A per-sample scalar parameter.
struct PerSample {
  enum Kind : int { kConst = 0, kInt32 = 1, kInt64 = 2, kFloat32 = 3, kFloat64 = 4 };
  const void* ptr = nullptr;
  int kind = kConst;
  int64_t stride = 0;
  double value = 0.0;
  PK_HD double get(int64_t b) const {
    switch (kind) {
      case kInt32: return static_cast<double>(static_cast<const int32_t*>(ptr)[b * stride]);
      case kInt64: return static_cast<double>(static_cast<const int64_t*>(ptr)[b * stride]);
      case kFloat32: return static_cast<double>(static_cast<const float*>(ptr)[b * stride]);
      case kFloat64: return static_cast<const double*>(ptr)[b * stride];
      default: return value;
    }
  }
};

// alphas_cumprod lookup; t < 0 means "before the first step" and gives `final_value`.
struct Table {
  const double* ptr = nullptr;
  int64_t n = 0;
  PK_HD double at(double t, double final_value) const {
    if (t < 0.0) return final_value;
    // compared as a double before the conversion: a value at or above 2^63 has no int64
    PK_DEVICE_CHECK(t < static_cast<double>(n) && "timesteps: index outside alphas_cumprod");
    if (!(t < static_cast<double>(n))) return ptr[n - 1];  // unreachable on the CPU (checked before the launch)
    return ptr[static_cast<int64_t>(t)];
  }
};

PK_HD double inf_d() { return std::numeric_limits<double>::infinity(); }
PK_HD double nan_d() { return std::numeric_limits<double>::quiet_NaN(); }

template <typename T>
PK_HD T clamp_(T x, T lo, T hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// x0 = (px_s * sample + px_m * model_output) * scale for DDPM-type schedules (alpha_bar = a),
// the arithmetic of diffusers: epsilon prediction divides (sample - sqrt(1 - a) model_output)
// by sqrt(a) last. At zero terminal SNR (a = 0) scale is +inf and x0 is +-inf (NaN only
// where the numerator is exactly 0, as in diffusers), which clipping brings back into
// [-range, range]; folding 1/sqrt(a) into both coefficients instead gives inf - inf = NaN.
PK_HD void x0_coefs(int pred, double a, double* px_s, double* px_m, double* scale) {
  const double sa = sqrt(a), sb = sqrt(1.0 - a);
  *scale = 1.0;
  if (pred == kEpsilon) {
    *px_s = 1.0;
    *px_m = -sb;
    *scale = 1.0 / sa;
  } else if (pred == kVPrediction) {
    *px_s = sa;
    *px_m = -sb;
  } else {
    *px_s = 0.0;
    *px_m = 1.0;
  }
}

// ---- add_noise ---------------------------------------------------------------------------
// o0 = x_t = sa * x0 + sb * noise;  o1 = target = tx * x0 + tn * noise.
struct AddNoise {
  PerSample t;
  Table acp;
  int target;
  PK_HD void coef(int64_t b, double* c) const {
    double sa, sb;
    if (target == kTargetFlow) {
      const double s = t.get(b);
      sa = 1.0 - s;
      sb = s;
    } else {
      const double a = acp.at(t.get(b), 1.0);
      sa = sqrt(a);
      sb = sqrt(1.0 - a);
    }
    c[0] = sa;
    c[1] = sb;
    switch (target) {
      case kTargetEpsilon: c[2] = 0.0; c[3] = 1.0; break;
      case kTargetV: c[2] = -sb; c[3] = sa; break;
      case kTargetSample: c[2] = 1.0; c[3] = 0.0; break;
      default: c[2] = -1.0; c[3] = 1.0; break;
    }
  }
  template <typename T>
  PK_HD static void apply(const T* c, T x0, T n, T, T, T, T& o0, T& o1) {
    o0 = c[0] * x0 + c[1] * n;
    o1 = c[2] * x0 + c[3] * n;
  }
};

// ---- Min-SNR-gamma loss weights (Hang et al. 2023) ---------------------------------------
PK_HD double loss_weight(int weighting, int pred, double a, double gamma) {
  if (weighting != kWeightMinSnr) return 1.0;
  const double snr = a / (1.0 - a);
  const double m = snr < gamma ? snr : gamma;
  if (pred == kEpsilon) return snr == 0.0 ? 1.0 : m / snr;
  if (pred == kVPrediction) return m / (snr + 1.0);
  return m;  // sample (x0) prediction
}

// Per-sample loss weights, for the forward (weight(b), read by Backend::loss) and as the
// elementwise step of the backward. loss_b = w_b * mean_j (pred - target)^2;
// backward: d pred = 2 w_b g_b / n * (pred - target).
struct LossWeights {
  PerSample grad;  // dL/dloss_b
  PerSample t;
  Table acp;
  int weighting, pred;
  double gamma, inv_n;
  PK_HD double weight(int64_t b) const {
    return weighting == kWeightNone ? 1.0 : loss_weight(weighting, pred, acp.at(t.get(b), 1.0), gamma);
  }
  PK_HD void coef(int64_t b, double* c) const { c[0] = 2.0 * weight(b) * grad.get(b) * inv_n; }
  template <typename T>
  PK_HD static void apply(const T* c, T p, T y, T, T, T, T& o0, T& o1) {
    o0 = c[0] * (p - y);
    o1 = T(0);
  }
};

// ---- DDPM (Ho et al. 2020), as diffusers' DDPMScheduler.step -------------------------------
struct Ddpm {
  PerSample t, prev_t;
  Table acp;
  int pred, variance;
  double clip_lo, clip_hi;
  PK_HD void coef(int64_t b, double* c) const {
    const double tb = t.get(b);
    const double a_t = acp.at(tb, 1.0), a_prev = acp.at(prev_t.get(b), 1.0);
    const double beta_t = 1.0 - a_t, beta_prev = 1.0 - a_prev;
    const double cur_alpha = a_t / a_prev, cur_beta = 1.0 - cur_alpha;
    x0_coefs(pred, a_t, &c[0], &c[1], &c[7]);
    c[2] = clip_lo;
    c[3] = clip_hi;
    c[4] = sqrt(a_prev) * cur_beta / beta_t;  // x0 coefficient
    c[5] = sqrt(cur_alpha) * beta_prev / beta_t;  // sample coefficient
    double std = 0.0;
    if (tb > 0.0) {
      if (variance == kFixedLarge) {
        std = sqrt(cur_beta);
      } else {
        double v = beta_prev / beta_t * cur_beta;
        v = v < 1e-20 ? 1e-20 : v;
        std = sqrt(v);  // fixed_small and fixed_small_log (exp(0.5 log v)) alike
      }
    }
    c[6] = std;
  }
  template <typename T>
  PK_HD static void apply(const T* c, T mo, T s, T, T, T z, T& o0, T& o1) {
    const T x0 = clamp_((c[0] * s + c[1] * mo) * c[7], c[2], c[3]);
    o0 = c[4] * x0 + c[5] * s + c[6] * z;
    o1 = x0;
  }
};

// ---- DDIM (Song et al. 2021), as diffusers' DDIMScheduler.step -----------------------------
struct Ddim {
  PerSample t, prev_t;
  Table acp;
  int pred;
  double final_alpha, eta, clip_lo, clip_hi;
  bool use_clipped;
  PK_HD void coef(int64_t b, double* c) const {
    const double a_t = acp.at(t.get(b), 1.0), a_prev = acp.at(prev_t.get(b), final_alpha);
    const double sa = sqrt(a_t), sb = sqrt(1.0 - a_t);
    x0_coefs(pred, a_t, &c[0], &c[1], &c[10]);
    c[2] = clip_lo;
    c[3] = clip_hi;
    // eps = e_s * sample + e_m * model_output (+ e_x * x0 with use_clipped_model_output only:
    // x0 is +-inf at zero SNR without clipping, and 0 * inf must not turn the epsilon
    // prediction's eps = model_output into NaN).
    if (use_clipped) {
      c[4] = 1.0 / sb; c[5] = 0.0; c[6] = -sa / sb;
    } else if (pred == kEpsilon) {
      c[4] = 0.0; c[5] = 1.0; c[6] = 0.0;
    } else if (pred == kVPrediction) {
      c[4] = sb; c[5] = sa; c[6] = 0.0;
    } else {
      c[4] = 1.0 / sb; c[5] = -sa / sb; c[6] = 0.0;
    }
    c[11] = use_clipped ? 1.0 : 0.0;
    const double variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
    const double std = eta * sqrt(variance);
    double dir = 1.0 - a_prev - std * std;
    dir = dir < 0.0 ? 0.0 : dir;
    c[7] = sqrt(a_prev);
    c[8] = sqrt(dir);
    c[9] = std;
  }
  template <typename T>
  PK_HD static void apply(const T* c, T mo, T s, T, T, T z, T& o0, T& o1) {
    const T raw = (c[0] * s + c[1] * mo) * c[10];
    const T x0 = clamp_(raw, c[2], c[3]);
    const T ex = c[11] != T(0) ? c[6] * x0 : T(0);
    const T eps = c[4] * s + c[5] * mo + ex;
    o0 = c[7] * x0 + c[8] * eps + c[9] * z;
    o1 = x0;
  }
};

// ---- Euler (Karras et al. 2022, Algorithm 2), as diffusers' EulerDiscreteScheduler.step ----
// x0 = cs * sample + cm * model_output on the Karras sigma scale (x_t = x0 + sigma eps), as the
// Euler and Heun steps of diffusers compute it: epsilon x0 = s - sigma_eps mo; v x0 =
// s / (sigma_v^2 + 1) - sigma_v / sqrt(sigma_v^2 + 1) mo; sample x0 = mo. Euler's epsilon uses
// sigma_hat (with churn) where its v uses sigma, hence two sigmas.
PK_HD void karras_x0_coef(int pred, double sigma_eps, double sigma_v, double* cs, double* cm) {
  if (pred == kEpsilon) {
    *cs = 1.0;
    *cm = -sigma_eps;
  } else if (pred == kVPrediction) {
    *cs = 1.0 / (sigma_v * sigma_v + 1.0);
    *cm = -sigma_v / sqrt(sigma_v * sigma_v + 1.0);
  } else {
    *cs = 0.0;
    *cm = 1.0;
  }
}

struct Euler {
  PerSample sigma, sigma_next;
  int pred;
  double churn_gamma, s_tmin, s_tmax, s_noise;
  PK_HD void coef(int64_t b, double* c) const {
    const double sg = sigma.get(b), sn = sigma_next.get(b);
    const double gamma = (s_tmin <= sg && sg <= s_tmax) ? churn_gamma : 0.0;
    const double sh = sg * (gamma + 1.0);
    c[0] = gamma > 0.0 ? s_noise * sqrt(sh * sh - sg * sg) : 0.0;  // churn noise scale
    karras_x0_coef(pred, sh, sg, &c[1], &c[2]);
    c[3] = (sn - sh) / sh;  // dt / sigma_hat
  }
  template <typename T>
  PK_HD static void apply(const T* c, T mo, T s, T, T, T z, T& o0, T& o1) {
    const T sc = s + c[0] * z;
    const T x0 = c[1] * sc + c[2] * mo;
    o0 = sc + (sc - x0) * c[3];
    o1 = x0;
  }
};

// ---- Heun (Karras et al. 2022, Algorithm 1 without churn), as HeunDiscreteScheduler.step ----
// First stage (second = false): d = (s - x0(sigma)) / sigma, prev = s + d (sigma_next - sigma),
//   outputs (prev, d). Second stage: sample is the first stage's result, model_output was
//   evaluated at sigma_next: d2 = (s - x0(sigma_next)) / sigma_next,
//   prev = prev_sample + (prev_derivative + d2) / 2 * (sigma_next - sigma), outputs (prev, d2).
struct Heun {
  PerSample sigma, sigma_next;
  int pred;
  bool second;
  double clip_lo, clip_hi;
  PK_HD void coef(int64_t b, double* c) const {
    const double sg = sigma.get(b), sn = sigma_next.get(b);
    const double si = second ? sn : sg;  // the sigma the model was evaluated at
    karras_x0_coef(pred, si, si, &c[0], &c[1]);
    c[2] = clip_lo;
    c[3] = clip_hi;
    c[4] = 1.0 / si;
    c[5] = second ? 0.5 : 1.0;  // weight of the new derivative
    c[6] = second ? 0.5 : 0.0;  // weight of prev_derivative
    c[7] = second ? 0.0 : 1.0;  // base: sample ...
    c[8] = second ? 1.0 : 0.0;  // ... or prev_sample
    c[9] = sn - sg;             // dt
  }
  template <typename T>
  PK_HD static void apply(const T* c, T mo, T s, T dprev, T sprev, T, T& o0, T& o1) {
    const T x0 = clamp_(c[0] * s + c[1] * mo, c[2], c[3]);
    const T d = (s - x0) * c[4];
    const T dd = c[5] * d + c[6] * dprev;
    o0 = (c[7] * s + c[8] * sprev) + dd * c[9];
    o1 = d;
  }
};

// ---- DPM-Solver++ (Lu et al. 2022), 1st order and 2nd order multistep ---------------------
// As diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" or
// "sde-dpmsolver++", solver_type "midpoint" or "heun". Sigmas are the Karras-style
// sigma = sqrt((1 - a) / a) (alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha_t), or flow
// sigmas (alpha_t = 1 - sigma, sigma_t = sigma). o0 = x_{t}, o1 = the data prediction x0 of
// this step, to be passed as prev_x0 to the next one.
//
// Flow sigmas must lie in [0, 1]. The host checks the values it can read (Python numbers, CPU
// tensors) and raises; sigmas in device memory cannot be checked without a sync, so both
// kernels apply one rule: a sample whose sigma, sigma_next or (second order) sigma_prev is
// outside [0, 1] or NaN gets NaN in both outputs; the other samples are unaffected.
struct DpmSolver {
  PerSample sigma_prev, sigma, sigma_next;
  int pred;
  bool sde, heun, flow_sigmas;
  int order;
  PK_HD void alpha_sigma(double s, double* a, double* st) const {
    if (flow_sigmas) {
      *a = 1.0 - s;
      *st = s;
    } else {
      *a = 1.0 / sqrt(s * s + 1.0);
      *st = s * *a;
    }
  }
  PK_HD static bool in_unit(double s) { return s >= 0.0 && s <= 1.0; }
  PK_HD void coef(int64_t b, double* c) const {
    if (flow_sigmas && !(in_unit(sigma.get(b)) && in_unit(sigma_next.get(b)) &&
                         (order != 2 || in_unit(sigma_prev.get(b))))) {
      for (int k = 0; k < kNumCoef; ++k) c[k] = nan_d();
      return;
    }
    double a_t, s_t, a_0, s_0;
    alpha_sigma(sigma_next.get(b), &a_t, &s_t);
    const double sg = sigma.get(b);
    alpha_sigma(sg, &a_0, &s_0);
    if (pred == kEpsilon) {
      c[0] = 1.0 / a_0; c[1] = -s_0 / a_0;
    } else if (pred == kVPrediction) {
      c[0] = a_0; c[1] = -s_0;
    } else if (pred == kFlowPrediction) {
      c[0] = 1.0; c[1] = -sg;
    } else {
      c[0] = 0.0; c[1] = 1.0;
    }
    const double lam_t = log(a_t) - log(s_t), lam_0 = log(a_0) - log(s_0);
    const double h = lam_t - lam_0;
    double cs, c0, cz = 0.0;
    if (!sde) {
      cs = s_t / s_0;
      c0 = -a_t * (exp(-h) - 1.0);
    } else {
      cs = s_t / s_0 * exp(-h);
      c0 = a_t * (1.0 - exp(-2.0 * h));
      cz = s_t * sqrt(1.0 - exp(-2.0 * h));
    }
    double c1 = 0.0;  // coefficient of D1 = (m0 - m1) / r0
    if (order == 2) {
      double a_1, s_1;
      alpha_sigma(sigma_prev.get(b), &a_1, &s_1);
      const double lam_1 = log(a_1) - log(s_1);
      const double r0 = (lam_0 - lam_1) / h;
      if (!sde) {
        c1 = heun ? a_t * ((exp(-h) - 1.0) / h + 1.0) : -0.5 * a_t * (exp(-h) - 1.0);
      } else {
        c1 = heun ? a_t * ((1.0 - exp(-2.0 * h)) / (-2.0 * h) + 1.0) : 0.5 * a_t * (1.0 - exp(-2.0 * h));
      }
      c1 /= r0;
    }
    c[2] = cs;
    c[3] = c0 + c1;  // times m0
    c[4] = -c1;      // times m1 (prev_x0)
    c[5] = cz;
  }
  template <typename T>
  PK_HD static void apply(const T* c, T mo, T s, T m1, T, T z, T& o0, T& o1) {
    const T x0 = c[0] * s + c[1] * mo;
    o0 = c[2] * s + c[3] * x0 + c[4] * m1 + c[5] * z;
    o1 = x0;
  }
};

// ---- Flow matching Euler (rectified flow), as FlowMatchEulerDiscreteScheduler.step ---------
// x0 = s - sigma v. Deterministic: prev = s + (sigma_next - sigma) v. Stochastic:
// prev = (1 - sigma_next) x0 + sigma_next z.
struct FlowMatch {
  PerSample sigma, sigma_next;
  bool stochastic;
  PK_HD void coef(int64_t b, double* c) const {
    const double sg = sigma.get(b), sn = sigma_next.get(b);
    c[0] = -sg;
    if (stochastic) {
      c[1] = 0.0; c[2] = 0.0; c[3] = 1.0 - sn; c[4] = sn;
    } else {
      c[1] = 1.0; c[2] = sn - sg; c[3] = 0.0; c[4] = 0.0;
    }
  }
  template <typename T>
  PK_HD static void apply(const T* c, T v, T s, T, T, T z, T& o0, T& o1) {
    const T x0 = s + c[0] * v;
    o0 = c[1] * s + c[2] * v + c[3] * x0 + c[4] * z;
    o1 = x0;
  }
};

// ---- standard normals ----------------------------------------------------------------------
// Box-Muller on Philox words with our own float log and sincos (pure arithmetic, accurate to
// a few ulp): the CPU loop vectorises them (libm calls would not) and both backends do the
// same float operations. One Philox block (4 words) gives 4 normals: element i uses block
// i / 4, words (2p, 2p+1) with p = (i / 2) % 2, and the cosine (i even) or sine (i odd) half.



// log(x) for normal positive floats: x = m 2^e with m in [0.75, 1.5), log m = 2 atanh(s),
// s = (m - 1) / (m + 1) in [-1/7, 1/5], by its odd series up to s^11 (truncation < 1e-10).
PK_HD float log_pos(float x) {
  // Integer-only range reduction (vectorises): e = floor(log2(x / 0.75)), m = x / 2^e.
  const uint32_t bits = float_bits(x);
  const int32_t e = static_cast<int32_t>(bits - 0x3f400000u) >> 23;
  const float m = bits_float(bits - (static_cast<uint32_t>(e) << 23));
  const float sv = (m - 1.0f) / (m + 1.0f);
  const float s2 = sv * sv;
  const float poly =
      1.0f + s2 * (0.33333333f + s2 * (0.2f + s2 * (0.14285714f + s2 * (0.11111111f + s2 * 0.09090909f))));
  return 2.0f * sv * poly + static_cast<float>(e) * 0.69314718f;
}

// sin and cos of 2 pi u for u in [0, 1): nearest quarter turn k, remainder f = u - k/4 in
// [-1/8, 1/8] (exact), Taylor polynomials on |x| = |2 pi f| <= pi/4, then a quarter-turn rotation.
PK_HD void sincos_turns(float u, float* sn, float* cs) {
  const int k = static_cast<int>(u * 4.0f + 0.5f);
  const float f = u - 0.25f * static_cast<float>(k);
  const float x = 6.28318531f * f;
  const float x2 = x * x;
  const float sx = x * (1.0f + x2 * (-1.6666667e-1f + x2 * (8.3333333e-3f + x2 * (-1.9841270e-4f + x2 * 2.7557319e-6f))));
  const float cx = 1.0f + x2 * (-0.5f + x2 * (4.1666667e-2f + x2 * (-1.3888889e-3f + x2 * (2.4801587e-5f +
                                                                                            x2 * -2.7557319e-7f))));
  const int q = k & 3;
  const float a = (q & 1) ? cx : sx;  // sin after rotating by q quarter turns
  const float b = (q & 1) ? sx : cx;
  *sn = (q == 2 || q == 3) ? -a : a;
  *cs = (q == 1 || q == 2) ? -b : b;
}

// sqrt(y) for y >= 0 as y / sqrt(y) with three Newton steps on the reciprocal square root
// from the classic bit-level estimate (relative error ~1e-7; exactly 0 for y = 0). Written
// out because a libm sqrtf call (errno) keeps the CPU loop from vectorising.
PK_HD float sqrt_nonneg(float y) {
  float r = bits_float(0x5f3759dfu - (float_bits(y) >> 1));
  const float h = 0.5f * y;
  r = r * (1.5f - h * r * r);
  r = r * (1.5f - h * r * r);
  r = r * (1.5f - h * r * r);
  return y * r;
}

PK_HD void normal_pair_fast(uint32_t w0, uint32_t w1, float* z0, float* z1) {
  const float r = sqrt_nonneg(-2.0f * log_pos(uniform_float_open0(w0)));
  float sn, cs;
  sincos_turns(uniform_float(w1), &sn, &cs);
  *z0 = r * cs;
  *z1 = r * sn;
}

// The 4 normals of Philox block `blk` (elements 4 blk .. 4 blk + 3).
PK_HD void normal_block(uint64_t seed, uint64_t blk, uint32_t offset, float* z) {
  const Philox4x32 w = philox_draw(seed, blk, offset);
  normal_pair_fast(w.v[0], w.v[1], &z[0], &z[1]);
  normal_pair_fast(w.v[2], w.v[3], &z[2], &z[3]);
}

// The normal of element i alone (what normal_block gives for it).
PK_HD float philox_normal(uint64_t seed, uint64_t i, uint32_t offset) {
  const Philox4x32 w = philox_draw(seed, i >> 2, offset);
  const int p = static_cast<int>((i >> 1) & 1u);
  float z0, z1;
  normal_pair_fast(p ? w.v[2] : w.v[0], p ? w.v[3] : w.v[1], &z0, &z1);
  return (i & 1u) ? z1 : z0;
}

}  // namespace diffusion
}  // namespace pk
