// Decoder-layer ops (pk.rms_norm, pk.swiglu, pk.gelu), shared by the CPU and CUDA kernels: the
// parameter structs, the argument checks (one place, RuntimeError naming the argument) and the
// per-element / per-row math.
//
// rms_norm over the last dim D of x, rows = numel / D:
//   rstd = 1 / sqrt(sum(x^2) / D + eps)          (float32; float64 for float64 x)
//   n    = x * rstd
//   y    = round(round(n) * (offset + w))        round_before_weight (Llama, Mistral, Qwen2:
//                                                transformers' LlamaRMSNorm casts the normalised
//                                                value back to x's dtype, then multiplies by w)
//   y    = round(n * (offset + w))               otherwise (Gemma: (n * (1 + w)).type_as(x))
// round() is the cast to x's dtype (a no-op for float32 / float64 math); the products are float32.
// Without a weight, w = 1 - offset (y = n, rounded). The forward also returns rstd per row, the
// only thing the backward needs besides x and w:
//   dn = dy * (offset + w),  dot = sum(dn * n),  dx = rstd * (dn - n * dot / D),
//   dw = sum over rows of dy * round(n) (round only when round_before_weight).
// swiglu(gate, up) = round(silu(gate)) * up, silu(g) = g / (1 + exp(-g)), rounded like torch's
// eager act_fn(gate) * up (silu in x's dtype, then the product); the backward recomputes silu:
//   dup = dy * round(silu(g)),  dgate = dy * up * s * (1 + g * (1 - s)),  s = 1 / (1 + exp(-g)).
// gelu(x, approximate) as torch's F.gelu, computed in float32 (float64 for float64) and rounded
// once to x's dtype:
//   "none"  gelu(x) = x * Phi(x) = 0.5 x erfc(-x / sqrt(2))
//           dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   "tanh"  gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2 / pi) (x + 0.044715 x^3)
//                   = x * s,  s = 1 / (1 + exp(-2u))      (1 + tanh(u) = 2 s: no cancellation
//                                                          where tanh(u) is near -1)
//           dx = dy * (s + x * s * (1 - s) * 2 sqrt(2 / pi) (1 + 3 * 0.044715 x^2)),
//           1 - s taken as exp(-2u) * s where u >= 0 (s near 1), else as 1 - s.
// Phi is written with erfc so that the lower tail keeps its relative accuracy (1 + erf(x)
// cancels there); erfc(-z) = 2 - erfc(z) for the upper half.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace pk {
namespace layers {

struct NormParams {
  int64_t rows = 0, D = 0;
  double eps = 1e-6, offset = 0.0;
  bool has_weight = false;
  bool round_before_weight = true;
};

PK_HD float layers_exp(float x) { return expf(x); }
PK_HD double layers_exp(double x) { return exp(x); }
PK_HD float layers_sqrt(float x) { return sqrtf(x); }
PK_HD double layers_sqrt(double x) { return sqrt(x); }
PK_HD float layers_erfc(float x) { return erfcf(x); }
PK_HD double layers_erfc(double x) { return erfc(x); }

// 1 / sqrt(mean of squares + eps), as torch.rsqrt(variance + eps) (a correctly rounded sqrt
// and a division, never an approximate reciprocal square root).
template <typename acc_t>
PK_HD acc_t rms_rstd(acc_t sum_sq, int64_t D, acc_t eps) {
  const acc_t mean = D > 0 ? sum_sq / static_cast<acc_t>(D) : acc_t(0);
  return acc_t(1) / layers_sqrt(mean + eps);
}

// One output element: n = x * rstd, optionally rounded to x's dtype, times the scale offset + w.
template <typename scalar_t, typename acc_t>
PK_HD scalar_t rms_out(acc_t x, acc_t rstd, acc_t scale, bool round_before_weight) {
  acc_t n = x * rstd;
  if (round_before_weight) n = static_cast<acc_t>(static_cast<scalar_t>(n));
  return static_cast<scalar_t>(n * scale);
}

// The gradient of one input element from the row's dot = sum(dn * n) / D.
template <typename acc_t>
PK_HD acc_t rms_dx(acc_t dn, acc_t n, acc_t rstd, acc_t dot_over_d) {
  return rstd * (dn - n * dot_over_d);
}

// The value the weight gradient multiplies dy by: round(n) (round_before_weight) or n.
template <typename scalar_t, typename acc_t>
PK_HD acc_t rms_wgrad_factor(acc_t n, bool round_before_weight) {
  return round_before_weight ? static_cast<acc_t>(static_cast<scalar_t>(n)) : n;
}

template <typename acc_t>
PK_HD acc_t silu(acc_t g) {
  return g / (acc_t(1) + layers_exp(-g));
}

template <typename scalar_t, typename acc_t>
PK_HD scalar_t swiglu_out(acc_t g, acc_t u) {
  const acc_t a = static_cast<acc_t>(static_cast<scalar_t>(silu(g)));
  return static_cast<scalar_t>(a * u);
}

template <typename scalar_t, typename acc_t>
PK_HD void swiglu_grad(acc_t dy, acc_t g, acc_t u, acc_t& dg, acc_t& du) {
  const acc_t s = acc_t(1) / (acc_t(1) + layers_exp(-g));
  const acc_t a = static_cast<acc_t>(static_cast<scalar_t>(g / (acc_t(1) + layers_exp(-g))));
  du = dy * a;
  dg = dy * u * (s * (acc_t(1) + g * (acc_t(1) - s)));
}

// The approximations of gelu, as torch names them ("none": the exact erf form).
enum class GeluApprox : int { kNone = 0, kTanh = 1 };

constexpr double kGeluSqrt1_2 = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kGeluInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kGeluBeta = 0.79788456080286535588;        // sqrt(2 / pi)
constexpr double kGeluKappa = 0.044715;
// x^2 in the tanh form's derivative factor 1 + 3 kappa x^2 is capped here: beyond |x| = 1000 the
// factor multiplies x s (1 - s) = 0 (s is 0 or 1 to far below the dtype), and an infinite factor
// would make that 0 a NaN.
constexpr double kGeluX2Cap = 1e6;

template <typename acc_t>
PK_HD acc_t gelu_value(acc_t x, GeluApprox approx) {
  if (approx == GeluApprox::kTanh) {
    const acc_t m2u = x * (acc_t(1) + acc_t(kGeluKappa) * x * x) * acc_t(-2 * kGeluBeta);  // -2u
    return x / (acc_t(1) + layers_exp(m2u));
  }
  return acc_t(0.5) * x * layers_erfc(-x * acc_t(kGeluSqrt1_2));
}

// d gelu / dx (times dy by the caller).
template <typename acc_t>
PK_HD acc_t gelu_derivative(acc_t x, GeluApprox approx) {
  const acc_t x2 = x * x;
  if (approx == GeluApprox::kTanh) {
    const acc_t m2u = x * (acc_t(1) + acc_t(kGeluKappa) * x2) * acc_t(-2 * kGeluBeta);
    const acc_t e = layers_exp(m2u);
    const acc_t s = acc_t(1) / (acc_t(1) + e);
    const acc_t one_minus_s = m2u <= acc_t(0) ? e * s : acc_t(1) - s;
    const acc_t x2c = x2 < acc_t(kGeluX2Cap) ? x2 : acc_t(kGeluX2Cap);
    return s + x * s * one_minus_s * (acc_t(2 * kGeluBeta) * (acc_t(1) + acc_t(3 * kGeluKappa) * x2c));
  }
  const acc_t cdf = acc_t(0.5) * layers_erfc(-x * acc_t(kGeluSqrt1_2));
  return cdf + x * acc_t(kGeluInvSqrt2Pi) * layers_exp(acc_t(-0.5) * x2);
}

template <typename scalar_t, typename acc_t>
PK_HD scalar_t gelu_out(acc_t x, GeluApprox approx) {
  return static_cast<scalar_t>(gelu_value<acc_t>(x, approx));
}

template <typename scalar_t, typename acc_t>
PK_HD scalar_t gelu_grad(acc_t dy, acc_t x, GeluApprox approx) {
  return static_cast<scalar_t>(dy * gelu_derivative<acc_t>(x, approx));
}

// Rows of the weight-gradient partial sums: the rows are cut into blocks of a size fixed by the
// row count alone (never by the thread count or the launch shape), each block sums its rows in
// order and the blocks are then summed in order, so dw is the same for any thread count.
PK_HD int64_t wgrad_rows_per_block(int64_t rows, int64_t max_blocks) {
  const int64_t per = (rows + max_blocks - 1) / max_blocks;
  return per < 1 ? 1 : per;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The math dtype of a kernel over x.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks of rms_norm (both backends); x is contiguous here.
inline NormParams check_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps, double offset,
                             bool round_before_weight) {
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor with at least one dim (the normalised last dim), got a 0-d tensor");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x: expected float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(offset), "offset: expected a finite value, got ", offset);
  NormParams p;
  p.D = x.size(-1);
  p.rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) p.rows *= x.size(d);
  p.eps = eps;
  p.offset = offset;
  p.round_before_weight = round_before_weight;
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.device() == x.device(), "weight: expected a tensor on ", x.device(), " (that of x), got ",
                w.device());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat,
                "weight: expected the dtype of x (", x.scalar_type(), ") or float32, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == p.D, "weight: expected shape [", p.D,
                "] (the last dim of x), got ", w.sizes());
    p.has_weight = true;
  }
  return p;
}

// Checks of rms_norm_backward: grad_out and rstd must fit x (as the forward returned them).
inline NormParams check_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& rstd, double offset,
                                      bool round_before_weight) {
  NormParams p = check_norm(x, weight, 0.0, offset, round_before_weight);
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad_out: expected the shape of x ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad_out: expected the dtype of x (", x.scalar_type(),
              "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "grad_out: expected a tensor on ", x.device(), ", got ", grad.device());
  TORCH_CHECK(rstd.device() == x.device(), "rstd: expected a tensor on ", x.device(), ", got ", rstd.device());
  TORCH_CHECK(rstd.scalar_type() == acc_dtype(x), "rstd: expected ", acc_dtype(x), ", got ", rstd.scalar_type());
  TORCH_CHECK(rstd.numel() == p.rows, "rstd: expected one value per row of x (", p.rows, "), got ", rstd.numel());
  return p;
}

// Checks of swiglu / swiglu_backward: gate and up (and grad_out) of one shape, dtype, device.
inline void check_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(is_float_dtype(gate.scalar_type()), "gate: expected float32, float16, bfloat16 or float64, got ",
              gate.scalar_type());
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), "up: expected the dtype of gate (", gate.scalar_type(),
              "), got ", up.scalar_type());
  TORCH_CHECK(up.device() == gate.device(), "up: expected a tensor on ", gate.device(), " (that of gate), got ",
              up.device());
  TORCH_CHECK(up.sizes() == gate.sizes(), "up: expected the shape of gate ", gate.sizes(), ", got ", up.sizes());
}

inline void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up);
  TORCH_CHECK(grad.scalar_type() == gate.scalar_type(), "grad_out: expected the dtype of gate (", gate.scalar_type(),
              "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == gate.device(), "grad_out: expected a tensor on ", gate.device(), ", got ",
              grad.device());
  TORCH_CHECK(grad.sizes() == gate.sizes(), "grad_out: expected the shape of gate ", gate.sizes(), ", got ",
              grad.sizes());
}

// Checks of gelu / gelu_backward; the approximation by torch's names.
inline GeluApprox check_gelu(const at::Tensor& x, c10::string_view approximate) {
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x: expected float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  if (approximate == "none") return GeluApprox::kNone;
  if (approximate == "tanh") return GeluApprox::kTanh;
  TORCH_CHECK(false, "approximate: expected 'none' or 'tanh', got '", approximate, "'");
  return GeluApprox::kNone;
}

inline GeluApprox check_gelu_backward(const at::Tensor& grad, const at::Tensor& x, c10::string_view approximate) {
  const GeluApprox a = check_gelu(x, approximate);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad_out: expected the dtype of x (", x.scalar_type(),
              "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "grad_out: expected a tensor on ", x.device(), ", got ", grad.device());
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad_out: expected the shape of x ", x.sizes(), ", got ", grad.sizes());
  return a;
}

// The weight as a contiguous float table (float64 for float64 x), or empty.
inline at::Tensor weight_table(const c10::optional<at::Tensor>& weight, const at::Tensor& x) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_dtype(x)).contiguous();
}

}  // namespace layers
}  // namespace pk
