// CPU kernels of the fused linear cross-entropy (pk.linear_cross_entropy). The chunk loop and
// its matmuls (MKL through ATen) are csrc/common/loss_ops.h; this file is the rows pass over
// one chunk of logits: at::parallel_for over the rows, each row in three sweeps over a float
// copy (double for float64):
//   1. z_j = capped logit, the row max and sum_j z_j;
//   2. e_j = exp(z_j - max) and their sum s, so lse = max + log s;
//   3. when gradients are asked for, p_j = e_j / s and d loss / d x_j written over the logits
//      (input dtype), with the formulas of csrc/common/loss.h.
// Every row is independent, so the thread count never changes a result.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common/loss.h"
#include "../common/loss_ops.h"

namespace pk {
namespace loss {
namespace {

template <typename scalar_t>
void rows_cpu(const RowIO& io) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t V = io.V;
  const RowParams<acc_t> p = make_row_params<acc_t>(io.softcap, io.label_smoothing, V, io.ignore_index);
  scalar_t* logits = io.logits.data_ptr<scalar_t>();
  const auto* t64 = static_cast<const int64_t*>(io.targets);
  const auto* t32 = static_cast<const int32_t*>(io.targets);
  auto* loss_out = static_cast<acc_t*>(io.row_loss);
  const auto* scale = static_cast<const acc_t*>(io.scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, io.m, grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> zbuf(V), ebuf(V);
    acc_t* z = zbuf.data();
    acc_t* e = ebuf.data();
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* x = logits + i * V;
      const int64_t t = io.targets_int64 ? t64[i] : static_cast<int64_t>(t32[i]);
      const int kind = target_kind(t, V, p.ignore_index);
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      acc_t sum_z = 0;
      for (int64_t j = 0; j < V; ++j) {
        const acc_t zj = capped_logit(static_cast<acc_t>(x[j]), p.softcap);
        z[j] = zj;
        m = zj > m ? zj : m;
        sum_z += zj;
      }
      acc_t s = 0;
      for (int64_t j = 0; j < V; ++j) {
        const acc_t ej = lce_exp(z[j] - m);
        e[j] = ej;
        s += ej;
      }
      const acc_t lse = lse_of(m, s);
      const acc_t z_t = kind == kCounted ? z[t] : acc_t(0);
      if (loss_out != nullptr) loss_out[i] = row_loss(kind, lse, z_t, sum_z, p);
      if (scale == nullptr) continue;
      const acc_t sc = scale[i * io.scale_stride];
      const acc_t inv_s = acc_t(1) / s;
      for (int64_t j = 0; j < V; ++j) {
        x[j] = static_cast<scalar_t>(logit_grad(kind, e[j] * inv_s, z[j], j == t, sc, p));
      }
    }
  });
}

struct CpuBackend {
  static constexpr bool kReadsHostMemory = true;
  static void rows(const RowIO& io) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.logits.scalar_type(), "pk_linear_cross_entropy_cpu",
                                    [&] { rows_cpu<scalar_t>(io); });
  }
};

}  // namespace
}  // namespace loss
}  // namespace pk

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) { PK_REGISTER_LOSS_OPS(m, ::pk::loss::CpuBackend); }
