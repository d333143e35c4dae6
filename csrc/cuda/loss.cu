// CUDA kernels of the fused linear cross-entropy (pk.linear_cross_entropy). The chunk loop is
// csrc/common/loss_ops.h, shared with the CPU: the three matmuls of a chunk go through ATen
// (cuBLAS, the input dtype with float32 accumulation, on the current stream); this file is
// the rows pass that sits between them, one block per row of the chunk's [rows, V] logits:
//   1. each thread walks the row with a stride of the block: capped logits, their max and
//      their sum; one block reduction (cub::BlockReduce of the pair);
//   2. the sum of exp(z - max) the same way; thread 0 forms lse, reads the target's logit and
//      writes the row loss;
//   3. when gradients are asked for, every thread rewrites its logits with d loss / d logits
//      (recomputing z and exp(z - lse) instead of keeping a copy of the row).
// The formulas (cap, loss, gradient, the rule for ignored and out-of-range targets) are the
// PK_HD functions of csrc/common/loss.h that the CPU kernel calls. Reads and writes are
// coalesced along the row; nothing syncs with the host, so a training step stays capturable
// in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#endif

#include "cuda_seams.cuh"

#include "../common/loss.h"
#include "../common/loss_ops.h"

namespace pk {
namespace loss {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
struct MaxSum {
  acc_t m, s;
};

template <typename acc_t>
struct MaxSumOp {
  PK_HD MaxSum<acc_t> operator()(const MaxSum<acc_t>& a, const MaxSum<acc_t>& b) const {
    return {a.m > b.m ? a.m : b.m, a.s + b.s};
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(scalar_t* __restrict__ logits, const void* __restrict__ targets, bool targets_int64,
                at::opmath_type<scalar_t>* __restrict__ row_loss, const at::opmath_type<scalar_t>* __restrict__ scale,
                int64_t scale_stride, RowParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using PairReduce = cub::BlockReduce<MaxSum<acc_t>, kThreads>;
  using SumReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename PairReduce::TempStorage tmp_pair;
  __shared__ typename SumReduce::TempStorage tmp_sum;
  __shared__ acc_t s_max, s_lse;
  const int64_t V = p.V;
  const int64_t i = blockIdx.x;
  scalar_t* x = logits + i * V;
  const int64_t t = targets_int64 ? static_cast<const int64_t*>(targets)[i]
                                  : static_cast<int64_t>(static_cast<const int32_t*>(targets)[i]);
  const int kind = target_kind(t, V, p.ignore_index);

  MaxSum<acc_t> ms{static_cast<acc_t>(-INFINITY), acc_t(0)};
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const acc_t z = capped_logit(static_cast<acc_t>(x[j]), p.softcap);
    ms.m = z > ms.m ? z : ms.m;
    ms.s += z;
  }
  const MaxSum<acc_t> row = PairReduce(tmp_pair).Reduce(ms, MaxSumOp<acc_t>());
  if (threadIdx.x == 0) s_max = row.m;
  __syncthreads();
  const acc_t m = s_max;
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) s += lce_exp(capped_logit(static_cast<acc_t>(x[j]), p.softcap) - m);
  const acc_t total = SumReduce(tmp_sum).Sum(s);
  if (threadIdx.x == 0) {
    const acc_t lse = lse_of(m, total);
    s_lse = lse;
    const acc_t z_t = kind == kCounted ? capped_logit(static_cast<acc_t>(x[t]), p.softcap) : acc_t(0);
    if (row_loss != nullptr) row_loss[i] = loss::row_loss(kind, lse, z_t, row.s, p);
  }
  __syncthreads();
  if (scale == nullptr) return;
  const acc_t lse = s_lse;
  const acc_t sc = scale[i * scale_stride];
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const acc_t z = capped_logit(static_cast<acc_t>(x[j]), p.softcap);
    x[j] = static_cast<scalar_t>(logit_grad(kind, lce_exp(z - lse), z, j == t, sc, p));
  }
}

struct CudaBackend {
  static constexpr bool kReadsHostMemory = false;
  static void rows(const RowIO& io) {
    if (io.m == 0) return;
    TORCH_CHECK(on_kernel_device(io.logits), "hidden: expected a CUDA tensor, got one on ", io.logits.device());
    const c10::cuda::CUDAGuard guard(io.logits.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.logits.scalar_type(), "pk_linear_cross_entropy_cuda",
                                    [&] {
                                      using acc_t = at::opmath_type<scalar_t>;
                                      const RowParams<acc_t> p =
                                          make_row_params<acc_t>(io.softcap, io.label_smoothing, io.V, io.ignore_index);
                                      PK_LAUNCH(static_cast<unsigned>(io.m), kThreads, 0, stream,
                                                rows_kernel<scalar_t>)(
                                          io.logits.data_ptr<scalar_t>(), io.targets, io.targets_int64,
                                          static_cast<acc_t*>(io.row_loss), static_cast<const acc_t*>(io.scale),
                                          io.scale_stride, p);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  }
};

}  // namespace
}  // namespace loss

PK_CUDA_LIBRARY_IMPL(m) { PK_REGISTER_LOSS_OPS(m, ::pk::loss::CudaBackend); }

}  // namespace pk
