// Host side of the fused linear cross-entropy, shared by the CPU and CUDA entry points: the
// argument checks (every message names the argument) and the chunk loop. The backends supply
// only Backend::rows(io), the fused row pass of csrc/common/loss.h over one chunk of logits.
//
// The loop, for each chunk of `rows` tokens (hidden_c = hidden[r0 : r0 + rows]):
//   logits_c = hidden_c @ weight^T (+ bias)        into one reused [rows, V] buffer, input dtype
//   rows pass: lse, the row losses and, when gradients are asked for, d loss / d logits_c
//              written over logits_c (input dtype, as torch's own backward would hold it)
//   grad_hidden_c  = dlogits_c @ weight            (into grad_hidden's rows)
//   grad_weight   += dlogits_c^T @ hidden_c        (float32 accumulator for fp16/bf16)
//   grad_bias     += column sums of dlogits_c      (float32)
// so [tokens, vocab] logits never exist: the peak is the weight, its gradient, hidden, its
// gradient and one chunk. Matmuls run in the input dtype through ATen (MKL / cuBLAS, float32
// accumulation as torch's F.linear); the row math in float32 (float64 for float64 inputs).
//
// Two ops use the loop: linear_cross_entropy (the loss; with compute_grad, for "mean"/"sum",
// also the gradients for grad_output = 1, which the autograd backward scales: Liger-Kernel's
// approach, one pass over the vocabulary instead of two) and linear_cross_entropy_backward
// (recomputes the chunks with a given grad_output: reduction "none", or a forward that ran
// without gradients). Both take `grads`, the gradients wanted (bits 1 hidden, 2 weight, 4 bias):
// a frozen LM head skips the weight-sized product dlogits^T @ hidden, a frozen trunk the
// hidden-sized one. Nothing reads device memory on the host: the "mean" count is a device
// tensor, and target values are checked only when they are CPU tensors of a backend that
// reads host memory (see csrc/common/loss.h for the rule on device tensors).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "loss.h"

namespace pk {
namespace loss {

enum Reduction : int { kMean = 0, kSum = 1, kNone = 2 };

inline int parse_reduction(c10::string_view s) {
  if (s == "mean") return kMean;
  if (s == "sum") return kSum;
  if (s == "none") return kNone;
  TORCH_CHECK(false, "reduction: expected 'mean', 'sum' or 'none', got '", std::string(s), "'");
  return kMean;
}

// What one rows pass reads and writes (pointers already offset to the chunk's first row).
struct RowIO {
  at::Tensor logits;               // [m, V], contiguous, input dtype; d loss / d logits on return if scale
  const void* targets = nullptr;   // int32 or int64
  bool targets_int64 = true;
  void* row_loss = nullptr;        // acc dtype [m], or nullptr
  const void* scale = nullptr;     // acc dtype, the rows' factors; nullptr: no gradient
  int64_t scale_stride = 0;        // 0: one factor for every row
  int64_t m = 0, V = 0;
  double softcap = 0.0, label_smoothing = 0.0;
  int64_t ignore_index = -100;
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The checks of both ops (RuntimeError naming the argument).
inline void check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                       const c10::optional<at::Tensor>& bias, double label_smoothing, double softcap,
                       int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, "hidden: expected a 2-D tensor [tokens, hidden], got shape ", hidden.sizes());
  TORCH_CHECK(is_float_dtype(hidden.scalar_type()),
              "hidden: expected float32, float16, bfloat16 or float64, got ", hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-D tensor [vocab, hidden], got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight: expected dtype ", hidden.scalar_type(),
              " (that of hidden), got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight: expected [vocab, ", hidden.size(1),
              "] (hidden size of hidden), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "weight: expected at least one vocabulary row, got shape ", weight.sizes());
  TORCH_CHECK(weight.device() == hidden.device(), "weight: expected a tensor on ", hidden.device(),
              " (that of hidden), got ", weight.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "targets: expected an int64 or int32 tensor, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets: expected shape [", hidden.size(0),
              "] (one per row of hidden), got ", targets.sizes());
  TORCH_CHECK(targets.device() == hidden.device(), "targets: expected a tensor on ", hidden.device(),
              " (that of hidden), got ", targets.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape [", weight.size(0),
                "] (vocab of weight), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias: expected dtype ", weight.scalar_type(),
                " (that of weight), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), "bias: expected a tensor on ", hidden.device(),
                " (that of hidden), got ", bias->device());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "softcap: expected a finite value > 0 (0: off), got ",
              softcap);
  TORCH_CHECK(chunk_size >= 0, "chunk_size: expected >= 0 (0: chosen from the sizes), got ", chunk_size);
}

// Target values, where they are host memory: each in [0, V) or ignore_index.
inline void check_target_values(const at::Tensor& targets, int64_t V, int64_t ignore_index) {
  const at::Tensor t = targets.contiguous();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t.scalar_type() == at::kLong ? t.data_ptr<int64_t>()[i] : t.data_ptr<int32_t>()[i];
    TORCH_CHECK(target_kind(v, V, ignore_index) != kInvalid, "targets: expected values in [0, ", V,
                ") or ignore_index (", ignore_index, "), got ", v, " at position ", i);
  }
}

// Which gradients a call computes (bits of its `grads` argument); the others come back empty.
enum GradBits : int64_t { kGradHidden = 1, kGradWeight = 2, kGradBias = 4 };

inline void check_grads(int64_t grads) {
  TORCH_CHECK(grads >= 0 && grads <= 7, "grads: expected a bit set in [0, 7] (1 hidden, 2 weight, 4 bias), got ",
              grads);
}

inline int64_t chunk_rows(int64_t chunk_size, int64_t N, int64_t V) {
  if (chunk_size > 0) return std::max<int64_t>(1, std::min<int64_t>(chunk_size, N));
  return auto_chunk_rows(N, V);
}

template <class Backend>
struct Ops {
  using T = at::Tensor;
  using OT = c10::optional<at::Tensor>;

  struct Out {
    T loss, grad_hidden, grad_weight, grad_bias;
  };

  // The chunk loop. grad: undefined (gradients for grad_output 1) or the upstream gradient.
  static Out run(const T& hidden, const T& weight, const T& targets_in, const OT& bias, const T& grad,
                 int64_t ignore_index, double label_smoothing, double softcap, int red, bool want_loss,
                 bool want_grad, int64_t chunk_size, int64_t grads) {
    const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
    const auto dt = hidden.scalar_type();
    const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
    const auto acc_opts = hidden.options().dtype(acc);
    const T targets = targets_in.contiguous();
    if (Backend::kReadsHostMemory && targets.is_cpu()) check_target_values(targets, V, ignore_index);

    T count;  // rows counted by "mean", on the device
    if (red == kMean) count = targets.ne(ignore_index).sum().to(acc);
    Out o;
    // which gradients the caller asked for (a frozen LM head skips the weight-sized product)
    const bool want_h = want_grad && (grads & kGradHidden);
    const bool want_w = want_grad && (grads & kGradWeight);
    const bool want_b = want_grad && (grads & kGradBias) && bias.has_value();
    T row_loss = want_loss ? at::empty({N}, acc_opts) : T();
    T scale;
    if (want_grad) {
      if (grad.defined()) {
        const T g = grad.to(acc);
        scale = red == kNone ? g.contiguous() : red == kMean ? (g.reshape({1}) / count) : g.reshape({1}).contiguous();
      } else {
        scale = red == kMean ? count.reciprocal().reshape({1}) : at::ones({1}, acc_opts);
      }
    }
    o.grad_hidden = want_h ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
    o.grad_weight = want_w ? at::zeros({V, H}, weight.options().dtype(acc)) : at::empty({0}, weight.options());
    o.grad_bias = want_b ? at::zeros({V}, acc_opts) : at::empty({0}, weight.options());

    if (N > 0) {
      const int64_t rows = chunk_rows(chunk_size, N, V);
      T buf = at::empty({rows, V}, hidden.options());
      const T wt = weight.t();
      const int64_t tsize = targets.element_size();
      for (int64_t r0 = 0; r0 < N; r0 += rows) {
        const int64_t m = std::min(rows, N - r0);
        const T hc = hidden.narrow(0, r0, m);
        T lc = buf.narrow(0, 0, m);
        if (bias.has_value()) {
          at::addmm_out(lc, *bias, hc, wt);
        } else {
          at::mm_out(lc, hc, wt);
        }
        RowIO io;
        io.logits = lc;
        io.targets = static_cast<const char*>(targets.data_ptr()) + r0 * tsize;
        io.targets_int64 = targets.scalar_type() == at::kLong;
        io.row_loss = want_loss ? static_cast<char*>(row_loss.data_ptr()) + r0 * row_loss.element_size() : nullptr;
        if (want_grad) {
          io.scale_stride = scale.numel() == 1 ? 0 : 1;
          io.scale = static_cast<const char*>(scale.data_ptr()) + r0 * io.scale_stride * scale.element_size();
        }
        io.m = m;
        io.V = V;
        io.softcap = softcap;
        io.label_smoothing = label_smoothing;
        io.ignore_index = ignore_index;
        Backend::rows(io);
        if (want_h) {
          T gh = o.grad_hidden.narrow(0, r0, m);
          at::mm_out(gh, lc, weight);
        }
        if (want_w) {
          if (o.grad_weight.scalar_type() == dt) {
            o.grad_weight.addmm_(lc.t(), hc);
          } else {
            o.grad_weight.add_(at::mm(lc.t(), hc));  // fp16/bf16 product, float32 sum over chunks
          }
        }
        if (want_b) o.grad_bias.add_(at::sum(lc, at::IntArrayRef{0}, /*keepdim=*/false, acc));
      }
    }
    if (want_w) o.grad_weight = o.grad_weight.to(weight.scalar_type());
    if (want_b) o.grad_bias = o.grad_bias.to(weight.scalar_type());
    if (want_loss) {
      o.loss = red == kNone ? row_loss : red == kSum ? row_loss.sum() : row_loss.sum() / count;
    }
    return o;
  }

  static std::tuple<T, T, T, T> forward(const T& hidden, const T& weight, const T& targets, const OT& bias,
                                        int64_t ignore_index, double label_smoothing, double softcap,
                                        c10::string_view reduction, bool compute_grad, int64_t chunk_size,
                                        int64_t grads) {
    const int red = parse_reduction(reduction);
    check_args(hidden, weight, targets, bias, label_smoothing, softcap, chunk_size);
    check_grads(grads);
    TORCH_CHECK(!compute_grad || red != kNone,
                "compute_grad: the gradients come with the loss for reduction 'mean' or 'sum' only; "
                "reduction 'none' differentiates through linear_cross_entropy_backward");
    Out o = run(hidden, weight, targets, bias, T(), ignore_index, label_smoothing, softcap, red, true, compute_grad,
                chunk_size, grads);
    return {o.loss, o.grad_hidden, o.grad_weight, o.grad_bias};
  }

  static std::tuple<T, T, T> backward(const T& grad_loss, const T& hidden, const T& weight, const T& targets,
                                      const OT& bias, int64_t ignore_index, double label_smoothing, double softcap,
                                      c10::string_view reduction, int64_t chunk_size, int64_t grads) {
    const int red = parse_reduction(reduction);
    check_args(hidden, weight, targets, bias, label_smoothing, softcap, chunk_size);
    check_grads(grads);
    TORCH_CHECK(is_float_dtype(grad_loss.scalar_type()),
                "grad_loss: expected a float32, float16, bfloat16 or float64 tensor, got ", grad_loss.scalar_type());
    if (red == kNone) {
      TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == hidden.size(0), "grad_loss: expected shape [",
                  hidden.size(0), "] (reduction 'none'), got ", grad_loss.sizes());
    } else {
      TORCH_CHECK(grad_loss.dim() == 0, "grad_loss: expected a 0-d tensor (reduction '", std::string(reduction),
                  "'), got shape ", grad_loss.sizes());
    }
    TORCH_CHECK(grad_loss.device() == hidden.device(), "grad_loss: expected a tensor on ", hidden.device(),
                " (that of hidden), got ", grad_loss.device());
    Out o = run(hidden, weight, targets, bias, grad_loss, ignore_index, label_smoothing, softcap, red, false, true,
                chunk_size, grads);
    return {o.grad_hidden, o.grad_weight, o.grad_bias};
  }
};

}  // namespace loss
}  // namespace pk

// Registers both ops of the family for one dispatch key.
#define PK_REGISTER_LOSS_OPS(m, Backend)                                             \
  do {                                                                               \
    using OpsT = ::pk::loss::Ops<Backend>;                                           \
    (m).impl("linear_cross_entropy", &OpsT::forward);                                \
    (m).impl("linear_cross_entropy_backward", &OpsT::backward);                      \
  } while (0)
