// Host side of the denoising ops, shared by the CPU and CUDA entry points: argument checks
// (every message names the argument), parsing of the string options, construction of the
// per-sample coefficient structs of csrc/common/diffusion.h, output allocation. The
// backends only supply Backend::run(step, io) (the elementwise pass) and
// Backend::loss(weights, pred, target, out) (the per-sample weighted MSE).
//
// Nothing here reads device memory: per-sample tensors on the GPU are read by the kernels,
// range checks of timesteps happen here only when the values live on the CPU (on the GPU a
// device-side assert catches an index outside alphas_cumprod).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "diffusion.h"

namespace pk {
namespace diffusion {

// What one elementwise pass reads and writes.
struct StepIO {
  int64_t B = 0, inner = 0;
  at::Tensor in[4];  // contiguous, dtype of the sample; undefined = zeros
  at::Tensor noise;  // contiguous or undefined
  bool draw_noise = false;
  uint64_t seed = 0;
  const int64_t* seed_dev = nullptr;  // seed read by the kernel (seed tensor on the GPU)
  uint32_t offset = 0;
  at::Tensor out[2];  // out[1] may be undefined
};

inline int parse_prediction(c10::string_view s, bool allow_flow = false) {
  if (s == "epsilon") return kEpsilon;
  if (s == "v_prediction") return kVPrediction;
  if (s == "sample") return kSample;
  if (allow_flow && s == "flow_prediction") return kFlowPrediction;
  TORCH_CHECK(false, "prediction_type: expected 'epsilon', 'v_prediction', 'sample'",
              allow_flow ? " or 'flow_prediction'" : "", ", got '", std::string(s), "'");
  return 0;
}

inline int parse_target(c10::string_view s) {
  if (s == "epsilon") return kTargetEpsilon;
  if (s == "v_prediction") return kTargetV;
  if (s == "sample") return kTargetSample;
  if (s == "flow") return kTargetFlow;
  TORCH_CHECK(false, "target: expected 'epsilon', 'v_prediction', 'sample' or 'flow', got '", std::string(s), "'");
  return 0;
}

inline int parse_variance(c10::string_view s) {
  if (s == "fixed_small") return kFixedSmall;
  if (s == "fixed_small_log") return kFixedSmallLog;
  if (s == "fixed_large") return kFixedLarge;
  TORCH_CHECK(false, "variance_type: expected 'fixed_small', 'fixed_small_log' or 'fixed_large', got '",
              std::string(s), "'");
  return 0;
}

inline int parse_weighting(c10::string_view s) {
  if (s == "none") return kWeightNone;
  if (s == "min_snr") return kWeightMinSnr;
  TORCH_CHECK(false, "weighting: expected 'none' or 'min_snr', got '", std::string(s), "'");
  return 0;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks a sample-shaped tensor against the reference one (same shape, dtype, device).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ",
              ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name, "), got ",
              t.device());
}
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_like(t, ref, name, ref_name);
  return t.contiguous();
}

inline void check_main(const at::Tensor& x, const char* name) {
  TORCH_CHECK(is_float_dtype(x.scalar_type()), name, ": expected float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, name, ": expected a batch dimension, got a 0-d tensor");
}

// Element i of a CPU tensor of int32/int64/float32/float64 (in its storage order, which is
// the logical order for the 0-d and 1-d tensors it is used on), as a double.
inline double host_value(const at::Tensor& t, int64_t i) {
  const int64_t off = i * (t.dim() == 0 ? 0 : t.stride(0));
  switch (t.scalar_type()) {
    case at::kInt: return static_cast<double>(t.data_ptr<int32_t>()[off]);
    case at::kLong: return static_cast<double>(t.data_ptr<int64_t>()[off]);
    case at::kFloat: return static_cast<double>(t.data_ptr<float>()[off]);
    case at::kDouble: return t.data_ptr<double>()[off];
    default: TORCH_CHECK(false, "expected an int32, int64, float32 or float64 tensor, got ", t.scalar_type());
  }
  return 0.0;
}

// A per-sample parameter: one value (any device if it is a CPU tensor) or one per sample.
inline PerSample per_sample(const at::Tensor& t, const char* name, int64_t B, const at::Device& dev, bool integral,
                            std::vector<at::Tensor>& keep) {
  const auto st = t.scalar_type();
  if (integral) {
    TORCH_CHECK(st == at::kInt || st == at::kLong, name, ": expected an int32 or int64 tensor, got ", st);
  } else {
    TORCH_CHECK(st == at::kInt || st == at::kLong || st == at::kFloat || st == at::kDouble, name,
                ": expected a float32, float64 or integer tensor, got ", st);
  }
  TORCH_CHECK(t.dim() <= 1 && (t.numel() == 1 || t.numel() == B), name, ": expected one value or one per sample (",
              B, "), got shape ", t.sizes());
  PerSample p;
  if (t.numel() == 1 && t.is_cpu()) {
    p.kind = PerSample::kConst;
    p.value = host_value(t, 0);  // host memory: no device sync, no ATen op
    return p;
  }
  TORCH_CHECK(t.device() == dev, name, ": expected a tensor on ", dev, " (or a one-element CPU tensor), got ",
              t.device());
  at::Tensor c = t.contiguous();
  keep.push_back(c);
  p.ptr = c.data_ptr();
  p.stride = c.numel() == 1 ? 0 : 1;
  p.kind = st == at::kInt ? PerSample::kInt32
           : st == at::kLong ? PerSample::kInt64
           : st == at::kFloat ? PerSample::kFloat32
                              : PerSample::kFloat64;
  return p;
}

// Element i of a CPU tensor of int32/int64 (storage order, as host_value), exactly.
inline int64_t host_int(const at::Tensor& t, int64_t i) {
  const int64_t off = i * (t.dim() == 0 ? 0 : t.stride(0));
  if (t.scalar_type() == at::kInt) return t.data_ptr<int32_t>()[off];
  return t.data_ptr<int64_t>()[off];
}

// Checks the values of a host-readable timestep tensor (int32/int64, see per_sample):
// 0 <= t < n (or t < n and any negative value when allow_negative, meaning "past the last
// step"). Device tensors are not read (no host sync): there an index at or above n is a
// device-side assert (Table::at).
inline void check_timestep_range(const at::Tensor& t, const char* name, int64_t n, bool allow_negative) {
  if (!t.is_cpu()) return;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t v = host_int(t, i);
    TORCH_CHECK(v < n, name, ": expected values below ", n, " (the length of alphas_cumprod), got ", v,
                t.numel() > 1 ? " at sample " : "", t.numel() > 1 ? std::to_string(i) : std::string());
    TORCH_CHECK(allow_negative || v >= 0, name, ": expected non-negative values, got ", v,
                t.numel() > 1 ? " at sample " : "", t.numel() > 1 ? std::to_string(i) : std::string());
  }
}

// Checks the values of a host-readable per-sample float parameter (a CPU tensor, or a Python
// number turned into one): ok(v) for each, else "<name>: expected <expect>, got v [at sample i]".
// Values in device memory are not read (no host sync); the kernels compute with them as given.
template <class Ok>
inline void check_host_values(const at::Tensor& t, const char* name, const char* expect, Ok ok) {
  if (!t.is_cpu()) return;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = host_value(t, i);
    TORCH_CHECK(ok(v), name, ": expected ", expect, ", got ", v, t.numel() > 1 ? " at sample " : "",
                t.numel() > 1 ? std::to_string(i) : std::string());
  }
}
inline void check_sigma_positive(const at::Tensor& t, const char* name) {
  check_host_values(t, name, "finite values > 0", [](double v) { return std::isfinite(v) && v > 0.0; });
}
inline void check_sigma_nonneg(const at::Tensor& t, const char* name) {
  check_host_values(t, name, "finite values >= 0", [](double v) { return std::isfinite(v) && v >= 0.0; });
}
inline void check_sigma_unit(const at::Tensor& t, const char* name) {  // flow matching: s in [0, 1]
  check_host_values(t, name, "values in [0, 1]", [](double v) { return v >= 0.0 && v <= 1.0; });
}

// Host-readable per-sample values a and b (one value or one per sample each) differ sample by sample.
inline void check_distinct(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  if (!a.is_cpu() || !b.is_cpu()) return;
  const int64_t n = std::max(a.numel(), b.numel());
  for (int64_t i = 0; i < n; ++i) {
    const double va = host_value(a, a.numel() == 1 ? 0 : i), vb = host_value(b, b.numel() == 1 ? 0 : i);
    TORCH_CHECK(va != vb, name_a, ": expected a value other than ", name_b, " (", vb, ")",
                n > 1 ? " at sample " : "", n > 1 ? std::to_string(i) : std::string());
  }
}

inline Table table(const at::Tensor& acp, const at::Device& dev, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(acp.dim() == 1 && acp.numel() >= 1, "alphas_cumprod: expected a non-empty 1-D table, got shape ",
              acp.sizes());
  TORCH_CHECK(acp.scalar_type() == at::kDouble || acp.scalar_type() == at::kFloat,
              "alphas_cumprod: expected float64 (or float32), got ", acp.scalar_type());
  TORCH_CHECK(acp.device() == dev, "alphas_cumprod: expected a tensor on ", dev, ", got ", acp.device());
  at::Tensor c = acp.to(at::kDouble).contiguous();
  keep.push_back(c);
  if (c.is_cpu()) {  // host memory: checked here; a table in device memory is used as given
    const double* v = c.data_ptr<double>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK(v[i] >= 0.0 && v[i] <= 1.0, "alphas_cumprod: expected values in [0, 1], got ", v[i],
                  " at index ", i);
    }
  }
  Table tb;
  tb.ptr = c.data_ptr<double>();
  tb.n = c.numel();
  return tb;
}

inline void set_seed(StepIO& io, const c10::optional<at::Tensor>& seed, const at::Device& dev) {
  TORCH_CHECK(seed.has_value(), "seed: this step draws noise; pass a noise tensor or a seed");
  const auto& s = *seed;
  TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kLong, "seed: expected a one-element int64 tensor, got ",
              s.scalar_type(), " of shape ", s.sizes());
  if (s.is_cpu()) {
    io.seed = static_cast<uint64_t>(s.item<int64_t>());
  } else {
    TORCH_CHECK(s.device() == dev, "seed: expected a CPU tensor or one on ", dev, ", got ", s.device());
    io.seed_dev = s.data_ptr<int64_t>();
  }
}

// Fills the common parts of a sampler step: model_output/sample checks, outputs, noise.
inline StepIO step_io(const at::Tensor& model_output, const at::Tensor& sample,
                      const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& seed, bool needs_noise,
                      uint32_t offset) {
  check_main(sample, "sample");
  StepIO io;
  io.in[0] = like(model_output, sample, "model_output", "sample");
  io.in[1] = sample.contiguous();
  io.B = sample.size(0);
  io.inner = io.B == 0 ? 0 : sample.numel() / io.B;
  io.out[0] = at::empty_like(io.in[1]);
  io.out[1] = at::empty_like(io.in[1]);
  // A noise tensor is checked whenever it is given, also where this step does not use it.
  if (noise.has_value()) {
    check_like(*noise, sample, "noise", "sample");
    if (needs_noise) io.noise = noise->contiguous();
  } else if (needs_noise) {
    io.draw_noise = true;
    io.offset = offset;
    set_seed(io, seed, sample.device());
  }
  return io;
}

// Scalar knobs: every message names the argument of the op and says what was expected.
inline void check_finite(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v), name, ": expected a finite value, got ", v);
}
inline void check_finite_nonneg(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v) && v >= 0.0, name, ": expected a finite value >= 0, got ", v);
}
inline void check_not_nan(double v, const char* name) {
  TORCH_CHECK(!std::isnan(v), name, ": expected a number (+-inf allowed), got NaN");
}

// Host-readable values (a CPU tensor, or a Python number turned into one) of a per-sample
// sigma of a flow-sigma DPM-Solver step: each in [0, 1]. Sigmas in device memory are not
// read here (no host sync); see DpmSolver in diffusion.h for the rule the kernels apply.
inline void check_flow_sigma_range(const at::Tensor& t, const char* name) {
  if (!t.is_cpu()) return;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = host_value(t, i);
    TORCH_CHECK(v >= 0.0 && v <= 1.0, name, ": expected values in [0, 1] with flow_sigmas=True, got ", v,
                t.numel() > 1 ? " at sample " : "", t.numel() > 1 ? std::to_string(i) : std::string());
  }
}

inline void clip_range(bool clip, double range, double* lo, double* hi) {
  TORCH_CHECK(!clip || (range > 0.0 && std::isfinite(range)),
              "clip_sample_range: expected a finite value > 0, got ", range);
  *lo = clip ? -range : -inf_d();
  *hi = clip ? range : inf_d();
}

template <class Backend>
struct Ops {
  using T = at::Tensor;
  using OT = c10::optional<at::Tensor>;

  static std::tuple<T, T> add_noise(const T& x0, const T& noise, const T& timesteps, const OT& alphas_cumprod,
                                    c10::string_view target) {
    check_main(x0, "x0");
    const int tgt = parse_target(target);
    StepIO io;
    io.in[0] = x0.contiguous();
    io.in[1] = like(noise, x0, "noise", "x0");
    io.B = x0.size(0);
    io.inner = io.B == 0 ? 0 : x0.numel() / io.B;
    io.out[0] = at::empty_like(io.in[0]);
    io.out[1] = at::empty_like(io.in[0]);
    std::vector<T> keep;
    AddNoise st;
    st.target = tgt;
    if (tgt == kTargetFlow) {
      st.t = per_sample(timesteps, "timesteps", io.B, x0.device(), false, keep);
      check_sigma_unit(timesteps, "timesteps");
    } else {
      TORCH_CHECK(alphas_cumprod.has_value(), "alphas_cumprod: required for target '", std::string(target), "'");
      st.t = per_sample(timesteps, "timesteps", io.B, x0.device(), true, keep);
      st.acp = table(*alphas_cumprod, x0.device(), keep);
      check_timestep_range(timesteps, "timesteps", st.acp.n, false);
    }
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], io.out[1]};
  }

  static LossWeights loss_weights(const OT& timesteps, const OT& alphas_cumprod, c10::string_view weighting,
                                   double gamma, c10::string_view prediction_type, int64_t B, const at::Device& dev,
                                   std::vector<T>& keep) {
    LossWeights w;
    w.weighting = parse_weighting(weighting);
    w.pred = parse_prediction(prediction_type);
    TORCH_CHECK(gamma > 0.0 && std::isfinite(gamma), "gamma: expected a finite value > 0, got ", gamma);
    w.gamma = gamma;
    if (w.weighting != kWeightNone) {
      TORCH_CHECK(timesteps.has_value(), "timesteps: required for weighting '", std::string(weighting), "'");
      TORCH_CHECK(alphas_cumprod.has_value(), "alphas_cumprod: required for weighting '", std::string(weighting), "'");
      w.t = per_sample(*timesteps, "timesteps", B, dev, true, keep);
      w.acp = table(*alphas_cumprod, dev, keep);
      check_timestep_range(*timesteps, "timesteps", w.acp.n, false);
    }
    return w;
  }

  // Per-sample weighted MSE: out[b] = w_b * mean_j (pred - target)^2, float32 (float64 for
  // float64 inputs).
  static T diffusion_loss(const T& pred, const T& target, const OT& timesteps, const OT& alphas_cumprod,
                          c10::string_view weighting, double gamma, c10::string_view prediction_type) {
    check_main(pred, "pred");
    const T p = pred.contiguous(), y = like(target, pred, "target", "pred");
    const int64_t B = p.size(0), inner = B == 0 ? 0 : p.numel() / B;
    std::vector<T> keep;
    LossWeights w = loss_weights(timesteps, alphas_cumprod, weighting, gamma, prediction_type, B, p.device(), keep);
    const auto out_type = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    T out = at::empty({B}, p.options().dtype(out_type));
    if (B == 0) return out;
    if (inner == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing, as torch
    Backend::loss(w, p, y, B, inner, out);
    return out;
  }

  static T diffusion_loss_backward(const T& grad, const T& pred, const T& target, const OT& timesteps,
                                   const OT& alphas_cumprod, c10::string_view weighting, double gamma,
                                   c10::string_view prediction_type) {
    check_main(pred, "pred");
    StepIO io;
    io.in[0] = pred.contiguous();
    io.in[1] = like(target, pred, "target", "pred");
    io.B = pred.size(0);
    io.inner = io.B == 0 ? 0 : pred.numel() / io.B;
    io.out[0] = at::empty_like(io.in[0]);
    std::vector<T> keep;
    LossWeights st = loss_weights(timesteps, alphas_cumprod, weighting, gamma, prediction_type, io.B, pred.device(),
                                   keep);
    TORCH_CHECK(grad.dim() == 1 && grad.numel() == io.B, "grad: expected shape [", io.B, "], got ", grad.sizes());
    st.grad = per_sample(grad, "grad", io.B, pred.device(), false, keep);
    st.inv_n = io.inner > 0 ? 1.0 / static_cast<double>(io.inner) : 0.0;
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return io.out[0];
  }

  static std::tuple<T, T> ddpm_step(const T& model_output, const T& sample, const T& timesteps,
                                    const T& prev_timesteps, const T& alphas_cumprod, const OT& noise, const OT& seed,
                                    c10::string_view prediction_type, c10::string_view variance_type, bool clip_sample,
                                    double clip_sample_range) {
    Ddpm st;
    st.pred = parse_prediction(prediction_type);
    st.variance = parse_variance(variance_type);
    clip_range(clip_sample, clip_sample_range, &st.clip_lo, &st.clip_hi);
    StepIO io = step_io(model_output, sample, noise, seed, true, kDdpmOffset);
    std::vector<T> keep;
    set_schedule_timesteps(st, timesteps, prev_timesteps, alphas_cumprod, sample, io.B, keep);
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], io.out[1]};
  }

  // The schedule table and the (t, prev_t) pair of a DDPM-type step, checked against the table.
  template <class Step>
  static void set_schedule_timesteps(Step& st, const T& timesteps, const T& prev_timesteps, const T& alphas_cumprod,
                                     const T& sample, int64_t B, std::vector<T>& keep) {
    st.acp = table(alphas_cumprod, sample.device(), keep);
    st.t = per_sample(timesteps, "timesteps", B, sample.device(), true, keep);
    st.prev_t = per_sample(prev_timesteps, "prev_timesteps", B, sample.device(), true, keep);
    check_timestep_range(timesteps, "timesteps", st.acp.n, false);
    check_timestep_range(prev_timesteps, "prev_timesteps", st.acp.n, true);
  }

  static std::tuple<T, T> ddim_step(const T& model_output, const T& sample, const T& timesteps,
                                    const T& prev_timesteps, const T& alphas_cumprod, const OT& noise, const OT& seed,
                                    double final_alpha_cumprod, double eta, c10::string_view prediction_type,
                                    bool clip_sample, double clip_sample_range, bool use_clipped_model_output) {
    Ddim st;
    st.pred = parse_prediction(prediction_type);
    check_finite_nonneg(eta, "eta");
    TORCH_CHECK(final_alpha_cumprod > 0.0 && final_alpha_cumprod <= 1.0,
                "final_alpha_cumprod: expected a value in (0, 1], got ", final_alpha_cumprod);
    st.eta = eta;
    st.final_alpha = final_alpha_cumprod;
    st.use_clipped = use_clipped_model_output;
    clip_range(clip_sample, clip_sample_range, &st.clip_lo, &st.clip_hi);
    StepIO io = step_io(model_output, sample, noise, seed, eta > 0.0, kDdimOffset);
    std::vector<T> keep;
    set_schedule_timesteps(st, timesteps, prev_timesteps, alphas_cumprod, sample, io.B, keep);
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], io.out[1]};
  }

  static std::tuple<T, T> euler_step(const T& model_output, const T& sample, const T& sigma, const T& sigma_next,
                                     const OT& noise, const OT& seed, c10::string_view prediction_type,
                                     double churn_gamma, double s_tmin, double s_tmax, double s_noise) {
    Euler st;
    st.pred = parse_prediction(prediction_type);
    check_finite_nonneg(churn_gamma, "churn_gamma");
    check_not_nan(s_tmin, "s_tmin");
    check_not_nan(s_tmax, "s_tmax");
    check_finite(s_noise, "s_noise");
    st.churn_gamma = churn_gamma;
    st.s_tmin = s_tmin;
    st.s_tmax = s_tmax;
    st.s_noise = s_noise;
    StepIO io = step_io(model_output, sample, noise, seed, churn_gamma > 0.0, kEulerOffset);
    std::vector<T> keep;
    st.sigma = per_sample(sigma, "sigma", io.B, sample.device(), false, keep);
    st.sigma_next = per_sample(sigma_next, "sigma_next", io.B, sample.device(), false, keep);
    check_sigma_positive(sigma, "sigma");  // divides by sigma
    check_sigma_nonneg(sigma_next, "sigma_next");
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], io.out[1]};
  }

  static std::tuple<T, T> heun_step(const T& model_output, const T& sample, const T& sigma, const T& sigma_next,
                                    const OT& prev_derivative, const OT& prev_sample,
                                    c10::string_view prediction_type, bool clip_sample, double clip_sample_range) {
    Heun st;
    st.pred = parse_prediction(prediction_type);
    clip_range(clip_sample, clip_sample_range, &st.clip_lo, &st.clip_hi);
    TORCH_CHECK(prev_derivative.has_value() == prev_sample.has_value(),
                "prev_derivative/prev_sample: pass both (second stage) or neither (first stage)");
    st.second = prev_derivative.has_value();
    StepIO io = step_io(model_output, sample, c10::nullopt, c10::nullopt, false, 0);
    if (st.second) {
      io.in[2] = like(*prev_derivative, sample, "prev_derivative", "sample");
      io.in[3] = like(*prev_sample, sample, "prev_sample", "sample");
    }
    std::vector<T> keep;
    st.sigma = per_sample(sigma, "sigma", io.B, sample.device(), false, keep);
    st.sigma_next = per_sample(sigma_next, "sigma_next", io.B, sample.device(), false, keep);
    // each stage divides by the sigma its model output was evaluated at
    if (st.second) {
      check_sigma_nonneg(sigma, "sigma");
      check_sigma_positive(sigma_next, "sigma_next");
    } else {
      check_sigma_positive(sigma, "sigma");
      check_sigma_nonneg(sigma_next, "sigma_next");
    }
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], io.out[1]};
  }

  static std::tuple<T, T> dpmpp_2m_step(const T& model_output, const T& sample, const OT& prev_x0,
                                        const OT& sigma_prev, const T& sigma, const T& sigma_next, const OT& noise,
                                        const OT& seed, c10::string_view prediction_type,
                                        c10::string_view algorithm_type, c10::string_view solver_type, int64_t order,
                                        bool flow_sigmas) {
    DpmSolver st;
    st.pred = parse_prediction(prediction_type, true);
    TORCH_CHECK(algorithm_type == "dpmsolver++" || algorithm_type == "sde-dpmsolver++",
                "algorithm_type: expected 'dpmsolver++' or 'sde-dpmsolver++', got '", std::string(algorithm_type), "'");
    TORCH_CHECK(solver_type == "midpoint" || solver_type == "heun",
                "solver_type: expected 'midpoint' or 'heun', got '", std::string(solver_type), "'");
    TORCH_CHECK(order == 1 || order == 2, "order: expected 1 or 2, got ", order);
    st.sde = algorithm_type == "sde-dpmsolver++";
    st.heun = solver_type == "heun";
    st.order = static_cast<int>(order);
    st.flow_sigmas = flow_sigmas;
    StepIO io = step_io(model_output, sample, noise, seed, st.sde, kDpmOffset);
    std::vector<T> keep;
    if (order == 2) {
      TORCH_CHECK(prev_x0.has_value(), "prev_x0: required for a second order step");
      TORCH_CHECK(sigma_prev.has_value(), "sigma_prev: required for a second order step");
      io.in[2] = like(*prev_x0, sample, "prev_x0", "sample");
      st.sigma_prev = per_sample(*sigma_prev, "sigma_prev", io.B, sample.device(), false, keep);
      if (flow_sigmas) check_flow_sigma_range(*sigma_prev, "sigma_prev");
    }
    st.sigma = per_sample(sigma, "sigma", io.B, sample.device(), false, keep);
    st.sigma_next = per_sample(sigma_next, "sigma_next", io.B, sample.device(), false, keep);
    if (flow_sigmas) {
      check_flow_sigma_range(sigma, "sigma");
      check_flow_sigma_range(sigma_next, "sigma_next");
    } else {  // Karras sigmas: log(sigma) and a division by sigma_t
      check_sigma_positive(sigma, "sigma");
      check_sigma_nonneg(sigma_next, "sigma_next");
      if (order == 2) check_sigma_positive(*sigma_prev, "sigma_prev");
    }
    if (order == 2) check_distinct(*sigma_prev, sigma, "sigma_prev", "sigma");  // r0 = 0: a division by zero
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], io.out[1]};
  }

  static std::tuple<T, T> flow_match_step(const T& model_output, const T& sample, const T& sigma,
                                          const T& sigma_next, const OT& noise, const OT& seed, bool stochastic,
                                          bool return_x0) {
    FlowMatch st;
    st.stochastic = stochastic;
    StepIO io = step_io(model_output, sample, noise, seed, stochastic, kFlowOffset);
    if (!return_x0) io.out[1] = at::empty({0}, sample.options());
    std::vector<T> keep;
    st.sigma = per_sample(sigma, "sigma", io.B, sample.device(), false, keep);
    st.sigma_next = per_sample(sigma_next, "sigma_next", io.B, sample.device(), false, keep);
    check_sigma_unit(sigma, "sigma");
    check_sigma_unit(sigma_next, "sigma_next");
    const T x0 = io.out[1];
    if (!return_x0) io.out[1] = T();  // the kernels skip an undefined second output
    if (io.B > 0 && io.inner > 0) Backend::run(st, io);
    return {io.out[0], x0};
  }
};

}  // namespace diffusion
}  // namespace pk

// Registers every op of the family for one dispatch key.
#define PK_REGISTER_DIFFUSION_OPS(m, Backend)                                         \
  do {                                                                                \
    using OpsT = ::pk::diffusion::Ops<Backend>;                                       \
    (m).impl("add_noise", &OpsT::add_noise);                                          \
    (m).impl("diffusion_loss", &OpsT::diffusion_loss);                                \
    (m).impl("diffusion_loss_backward", &OpsT::diffusion_loss_backward);              \
    (m).impl("ddpm_step", &OpsT::ddpm_step);                                          \
    (m).impl("ddim_step", &OpsT::ddim_step);                                          \
    (m).impl("euler_step", &OpsT::euler_step);                                        \
    (m).impl("heun_step", &OpsT::heun_step);                                          \
    (m).impl("dpmpp_2m_step", &OpsT::dpmpp_2m_step);                                  \
    (m).impl("flow_match_step", &OpsT::flow_match_step);                              \
  } while (0)
