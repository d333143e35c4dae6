// Host side of pk.rms_norm, pk.swiglu and pk.gelu, shared by the CPU and CUDA entry points: contiguity,
// the checks of layers.h, the output allocations, the empty cases and the weight table, so both
// backends return the same shapes and dtypes and reject the same inputs. A backend supplies only
// its kernels (each called with non-empty inputs):
//   Backend::kWgradBlocks                     the most rows of the weight-gradient partial buffer
//   Backend::norm_forward(x, scale, out, rstd, p)
//   Backend::norm_backward(dy, x, scale, rstd, dx, partial, p, rows_per_block)
//                                             partial: [blocks, D] float, undefined without dw
//   Backend::sum_blocks(partial, dw)          dw = partial summed over the blocks, in order
//   Backend::swiglu_forward(g, u, out)
//   Backend::swiglu_backward(dy, g, u, dg, du)
//   Backend::gelu_forward(x, out, approx)
//   Backend::gelu_backward(dy, x, dx, approx)
// The entry points check the device (and on CUDA hold the device guard) before calling these.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "layers.h"

namespace pk {
namespace layers {

// offset + w (or 1 without a weight) as a float table of D values.
inline at::Tensor scale_table(const c10::optional<at::Tensor>& weight, const at::Tensor& x, const NormParams& p) {
  const at::Tensor w = weight_table(weight, x);
  if (!w.defined()) return at::ones({p.D}, x.options().dtype(acc_dtype(x)));
  return (w + p.offset).contiguous();
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> rms_norm_host(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                 double eps, double offset, bool round_before_weight) {
  const at::Tensor x = x_in.contiguous();
  const NormParams p = check_norm(x, weight, eps, offset, round_before_weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
  if (p.rows == 0) return {out, rstd};
  if (p.D == 0) {
    rstd.fill_(1.0 / std::sqrt(eps));
    return {out, rstd};
  }
  Backend::norm_forward(x, scale_table(weight, x, p), out, rstd, p);
  return {out, rstd};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_host(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                          const c10::optional<at::Tensor>& weight,
                                                          const at::Tensor& rstd_in, double offset,
                                                          bool round_before_weight, bool weight_grad) {
  const at::Tensor x = x_in.contiguous();
  const NormParams p = check_norm_backward(grad_in, x, weight, rstd_in, offset, round_before_weight);
  const at::Tensor dy = grad_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const bool want_dw = weight_grad && p.has_weight;
  at::Tensor dw = want_dw ? at::zeros({p.D}, weight->options()) : at::empty({0}, x.options());
  if (p.rows == 0 || p.D == 0) return {dx, dw};
  const int64_t per = wgrad_rows_per_block(p.rows, Backend::kWgradBlocks);
  const int64_t blocks = (p.rows + per - 1) / per;
  at::Tensor partial = want_dw ? at::zeros({blocks, p.D}, x.options().dtype(acc_dtype(x))) : at::Tensor();
  Backend::norm_backward(dy, x, scale_table(weight, x, p), rstd, dx, partial, p, per);
  if (want_dw) Backend::sum_blocks(partial, dw);
  return {dx, dw};
}

template <class Backend>
at::Tensor swiglu_host(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu(gate_in, up_in);
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  if (g.numel() > 0) Backend::swiglu_forward(g, u, out);
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> swiglu_backward_host(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                        const at::Tensor& up_in) {
  check_swiglu_backward(grad_in, gate_in, up_in);
  const at::Tensor dy = grad_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  if (g.numel() > 0) Backend::swiglu_backward(dy, g, u, dg, du);
  return {dg, du};
}

template <class Backend>
at::Tensor gelu_host(const at::Tensor& x_in, c10::string_view approximate) {
  const GeluApprox approx = check_gelu(x_in, approximate);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) Backend::gelu_forward(x, out, approx);
  return out;
}

template <class Backend>
at::Tensor gelu_backward_host(const at::Tensor& grad_in, const at::Tensor& x_in, c10::string_view approximate) {
  const GeluApprox approx = check_gelu_backward(grad_in, x_in, approximate);
  const at::Tensor dy = grad_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) Backend::gelu_backward(dy, x, dx, approx);
  return dx;
}

}  // namespace layers
}  // namespace pk
