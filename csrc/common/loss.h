// The row math of the fused linear cross-entropy (pk.linear_cross_entropy), shared by the CPU
// and CUDA kernels (csrc/cpu/loss.cpp, csrc/cuda/loss.cu) so both make the same decisions.
//
// One row holds the logits x_j (j < V) of one token, as the LM-head matmul left them (input
// dtype, bias added). The row pass works in float (double for float64 inputs):
//   z_j   = softcap * tanh(x_j / softcap)        (softcap > 0; else z_j = x_j)
//   lse   = m + log(sum_j exp(z_j - m)),  m = max_j z_j
//   loss  = (1 - eps) (lse - z_t) + eps (lse - sum_j z_j / V)     (eps: label smoothing)
//         = torch's cross_entropy(label_smoothing=eps) for target t
//   dz_j  = scale (p_j - eps / V - (1 - eps) [j == t]),   p_j = exp(z_j - lse)
//   dx_j  = dz_j (1 - (z_j / softcap)^2)                (the derivative of the cap)
// with scale the row's factor (grad_output, / the number of counted rows for "mean").
//
// Targets: a row whose target equals ignore_index counts for nothing (loss 0, gradient 0,
// not in the "mean" count). A target outside [0, V) that is not ignore_index raises where the
// targets are host memory (CPU tensors, checked before any kernel); in device memory the
// kernels cannot raise without a host sync, and the rule on both backends is: that row's loss
// and gradient are NaN (so is a "mean"/"sum" over it).
#pragma once
#include <math.h>

#include <cstdint>

#include "host_device.h"

namespace pk {
namespace loss {

PK_HD float lce_exp(float x) { return expf(x); }
PK_HD double lce_exp(double x) { return exp(x); }
PK_HD float lce_log(float x) { return logf(x); }
PK_HD double lce_log(double x) { return log(x); }
PK_HD float lce_tanh(float x) { return tanhf(x); }
PK_HD double lce_tanh(double x) { return tanh(x); }

template <typename acc_t>
PK_HD acc_t nan_value() {
  return static_cast<acc_t>(bits_float(0x7fc00000u));  // quiet NaN
}

// What a row's target means.
enum TargetKind : int { kCounted = 0, kIgnored = 1, kInvalid = 2 };

PK_HD int target_kind(int64_t t, int64_t V, int64_t ignore_index) {
  if (t == ignore_index) return kIgnored;
  return (t >= 0 && t < V) ? kCounted : kInvalid;
}

// The row's scalars, fixed for the whole call.
template <typename acc_t>
struct RowParams {
  acc_t softcap = 0;     // > 0: on
  acc_t eps = 0;         // label smoothing in [0, 1]
  acc_t eps_over_v = 0;  // eps / V
  int64_t V = 0;
  int64_t ignore_index = -100;
};

template <typename acc_t>
PK_HD RowParams<acc_t> make_row_params(double softcap, double eps, int64_t V, int64_t ignore_index) {
  RowParams<acc_t> p;
  p.softcap = static_cast<acc_t>(softcap);
  p.eps = static_cast<acc_t>(eps);
  p.eps_over_v = static_cast<acc_t>(eps / static_cast<double>(V > 0 ? V : 1));
  p.V = V;
  p.ignore_index = ignore_index;
  return p;
}

// z = the capped logit.
template <typename acc_t>
PK_HD acc_t capped_logit(acc_t x, acc_t softcap) {
  return softcap > acc_t(0) ? softcap * lce_tanh(x / softcap) : x;
}

// d z / d x at the capped logit z: 1 - (z / softcap)^2 (1 without cap).
template <typename acc_t>
PK_HD acc_t cap_derivative(acc_t z, acc_t softcap) {
  if (softcap > acc_t(0)) {
    const acc_t t = z / softcap;
    return acc_t(1) - t * t;
  }
  return acc_t(1);
}

// The loss of a row from its lse, target logit and logit sum (see the top); NaN for an
// invalid target, 0 for an ignored one.
template <typename acc_t>
PK_HD acc_t row_loss(int kind, acc_t lse, acc_t z_t, acc_t sum_z, const RowParams<acc_t>& p) {
  if (kind == kIgnored) return acc_t(0);
  if (kind == kInvalid) return nan_value<acc_t>();
  const acc_t smooth = p.eps > acc_t(0) ? p.eps * (lse - sum_z / static_cast<acc_t>(p.V)) : acc_t(0);
  return (acc_t(1) - p.eps) * (lse - z_t) + smooth;
}

// d loss / d x_j for the row's logit x_j with capped value z and probability prob = exp(z - lse);
// is_target: j == t. scale: the row's factor. Zero for an ignored row, NaN for an invalid one
// (the caller passes kind).
template <typename acc_t>
PK_HD acc_t logit_grad(int kind, acc_t prob, acc_t z, bool is_target, acc_t scale, const RowParams<acc_t>& p) {
  if (kind == kIgnored) return acc_t(0);
  acc_t d = prob - p.eps_over_v - (is_target ? acc_t(1) - p.eps : acc_t(0));
  if (kind == kInvalid) d = nan_value<acc_t>();
  return d * scale * cap_derivative(z, p.softcap);
}

// lse from the max and the sum of exp(z - max).
template <typename acc_t>
PK_HD acc_t lse_of(acc_t m, acc_t s) {
  return m + lce_log(s);
}

// Rows per chunk when the caller leaves it to the op (chunk_size 0): about 2^24 logits
// (64 MB in float32) per chunk, a power of two in [256, 4096], at most the number of rows.
// Fewer rows make the grad_weight update (K = rows) a thin matmul that rereads all of
// grad_weight per chunk: 256 rows keep that under ~10% of the time on a 2-core CPU at a 128k
// vocabulary, where [tokens, vocab] logits would be gigabytes.
// A function of (N, V) only, so the numerics (the order in which grad_weight adds the
// chunks) are fixed by the arguments. csrc/common/loss_ops.h and the Python wrapper use it.
PK_HD int64_t auto_chunk_rows(int64_t N, int64_t V) {
  const int64_t target = int64_t(1) << 24;
  int64_t rows = 256;
  while (rows < 4096 && rows * 2 * (V > 0 ? V : 1) <= target) rows *= 2;
  if (rows > N) rows = N > 0 ? N : 1;
  return rows;
}

}  // namespace loss
}  // namespace pk
