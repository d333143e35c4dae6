// CUDA kernels of the decoder-layer ops pk.rms_norm, pk.swiglu and pk.gelu (math, layouts and checks in
// csrc/common/layers.h, shared with the CPU kernels of csrc/cpu/layers.cpp).
//
// rms_norm forward: one block of kThreads per row (a grid-stride loop over rows past the grid),
// each thread summing the squares of the features j = tid, tid + kThreads, ... (coalesced), one
// cub::BlockReduce, then the same threads write their outputs; thread 0 writes rstd.
// rms_norm backward: a fixed grid of blocks (kWgradBlocks at most, never more than the rows),
// block b taking the rows of its block of csrc/common/layers.h (wgrad_rows_per_block) in order;
// per row one block reduction for sum(dn * n), then dx, and each thread adds dy * n into its own
// columns of the block's row of a [blocks, D] float partial buffer (no atomics). A second
// kernel sums that buffer over the blocks in order, one thread per column, so dw is the same
// bits run to run. swiglu and gelu: elementwise, grid-stride, the activation recomputed from
// the input in the backward.
// Nothing syncs with the host, so a training step stays capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#endif

#include <algorithm>

#include "cuda_seams.cuh"

#include "../common/layers_ops.h"

namespace pk {
namespace layers {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxRowBlocks = 65535;
constexpr int64_t kWgradBlocks = 256;
constexpr int kElemThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rms_norm_fwd_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ scale,
                        scalar_t* __restrict__ y, at::opmath_type<scalar_t>* __restrict__ rstd_out, NormParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ acc_t s_rstd;
  const int64_t D = p.D;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const scalar_t* xr = x + r * D;
    acc_t s = 0;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      const acc_t v = static_cast<acc_t>(xr[j]);
      s += v * v;
    }
    const acc_t total = BlockReduce(tmp).Sum(s);
    if (threadIdx.x == 0) {
      s_rstd = rms_rstd<acc_t>(total, D, static_cast<acc_t>(p.eps));
      rstd_out[r] = s_rstd;
    }
    __syncthreads();
    const acc_t rstd = s_rstd;
    scalar_t* yr = y + r * D;
    for (int64_t j = threadIdx.x; j < D; j += kThreads)
      yr[j] = rms_out<scalar_t, acc_t>(static_cast<acc_t>(xr[j]), rstd, scale[j], p.round_before_weight);
    __syncthreads();  // tmp and s_rstd are reused by the next row
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rms_norm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                        const at::opmath_type<scalar_t>* __restrict__ scale,
                        const at::opmath_type<scalar_t>* __restrict__ rstd_in, scalar_t* __restrict__ dx,
                        at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows_per_block, NormParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ acc_t s_dot;
  const int64_t D = p.D;
  acc_t* pw = partial != nullptr ? partial + static_cast<int64_t>(blockIdx.x) * D : nullptr;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = begin + rows_per_block < p.rows ? begin + rows_per_block : p.rows;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* g = dy + r * D;
    const scalar_t* xr = x + r * D;
    const acc_t rstd = rstd_in[r];
    acc_t s = 0;
    for (int64_t j = threadIdx.x; j < D; j += kThreads)
      s += static_cast<acc_t>(g[j]) * scale[j] * static_cast<acc_t>(xr[j]);
    const acc_t total = BlockReduce(tmp).Sum(s);
    if (threadIdx.x == 0) s_dot = total * rstd / static_cast<acc_t>(D);
    __syncthreads();
    const acc_t dot_over_d = s_dot;
    scalar_t* dxr = dx + r * D;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      const acc_t gj = static_cast<acc_t>(g[j]);
      const acc_t n = static_cast<acc_t>(xr[j]) * rstd;
      dxr[j] = static_cast<scalar_t>(rms_dx<acc_t>(gj * scale[j], n, rstd, dot_over_d));
      if (pw != nullptr) pw[j] += gj * rms_wgrad_factor<scalar_t, acc_t>(n, p.round_before_weight);
    }
    __syncthreads();
  }
}

template <typename acc_t, typename w_t>
__global__ void sum_blocks_kernel(const acc_t* __restrict__ partial, int64_t blocks, int64_t D, w_t* __restrict__ dw) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; j < D; j += stride) {
    acc_t s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * D + j];
    dw[j] = static_cast<w_t>(s);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kElemThreads)
    swiglu_fwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ u, scalar_t* __restrict__ out,
                      int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; i < n; i += stride)
    out[i] = swiglu_out<scalar_t, acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(u[i]));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kElemThreads)
    swiglu_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ g, const scalar_t* __restrict__ u,
                      scalar_t* __restrict__ dg, scalar_t* __restrict__ du, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; i < n; i += stride) {
    acc_t a, b;
    swiglu_grad<scalar_t, acc_t>(static_cast<acc_t>(dy[i]), static_cast<acc_t>(g[i]), static_cast<acc_t>(u[i]), a, b);
    dg[i] = static_cast<scalar_t>(a);
    du[i] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kElemThreads)
    gelu_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, GeluApprox approx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; i < n; i += stride)
    out[i] = gelu_out<scalar_t, acc_t>(static_cast<acc_t>(x[i]), approx);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kElemThreads)
    gelu_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                    int64_t n, GeluApprox approx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElemThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kElemThreads + threadIdx.x; i < n; i += stride)
    dx[i] = gelu_grad<scalar_t, acc_t>(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), approx);
}

unsigned elem_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kElemThreads - 1) / kElemThreads, 65536)));
}

// The CUDA backend of csrc/common/layers_ops.h (the entry points below hold the device guard).
struct CudaBackend {
  static constexpr int64_t kWgradBlocks = ::pk::layers::kWgradBlocks;

  static void norm_forward(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out, at::Tensor& rstd,
                           const NormParams& p) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxRowBlocks));
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_rms_norm_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      PK_LAUNCH(blocks, kThreads, 0, stream, rms_norm_fwd_kernel<scalar_t>)(
          x.data_ptr<scalar_t>(), scale.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& rstd, at::Tensor& dx, const at::Tensor& partial, const NormParams& p,
                            int64_t rows_per_block) {
    const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_rms_norm_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      PK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, rms_norm_bwd_kernel<scalar_t>)(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
          dx.data_ptr<scalar_t>(), partial.defined() ? partial.data_ptr<acc_t>() : nullptr, rows_per_block, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void sum_blocks(const at::Tensor& partial, at::Tensor& dw) {
    const int64_t blocks = partial.size(0), D = partial.size(1);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "pk_rms_norm_sum_blocks_cuda", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dw.scalar_type(), "pk_rms_norm_dw_cuda", [&] {
        PK_LAUNCH(elem_blocks(D), kElemThreads, 0, stream, sum_blocks_kernel<acc_t, scalar_t>)(
            partial.data_ptr<acc_t>(), blocks, D, dw.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void swiglu_forward(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
    const int64_t n = g.numel();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pk_swiglu_cuda", [&] {
      PK_LAUNCH(elem_blocks(n), kElemThreads, 0, stream, swiglu_fwd_kernel<scalar_t>)(
          g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void swiglu_backward(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& dg,
                              at::Tensor& du) {
    const int64_t n = g.numel();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pk_swiglu_backward_cuda", [&] {
      PK_LAUNCH(elem_blocks(n), kElemThreads, 0, stream, swiglu_bwd_kernel<scalar_t>)(
          dy.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(),
          du.data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gelu_forward(const at::Tensor& x, at::Tensor& out, GeluApprox approx) {
    const int64_t n = x.numel();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_gelu_cuda", [&] {
      PK_LAUNCH(elem_blocks(n), kElemThreads, 0, stream, gelu_fwd_kernel<scalar_t>)(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, approx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gelu_backward(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, GeluApprox approx) {
    const int64_t n = x.numel();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_gelu_backward_cuda", [&] {
      PK_LAUNCH(elem_blocks(n), kElemThreads, 0, stream, gelu_bwd_kernel<scalar_t>)(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), n, approx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                 double eps, double offset, bool round_before_weight) {
  TORCH_CHECK(on_kernel_device(x), "x: expected a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return rms_norm_host<CudaBackend>(x, weight, eps, offset, round_before_weight);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const c10::optional<at::Tensor>& weight,
                                                          const at::Tensor& rstd, double offset,
                                                          bool round_before_weight, bool weight_grad) {
  TORCH_CHECK(on_kernel_device(x), "x: expected a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return rms_norm_backward_host<CudaBackend>(grad, x, weight, rstd, offset, round_before_weight, weight_grad);
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(on_kernel_device(gate), "gate: expected a CUDA tensor, got one on ", gate.device());
  const c10::cuda::CUDAGuard guard(gate.device());
  return swiglu_host<CudaBackend>(gate, up);
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  TORCH_CHECK(on_kernel_device(gate), "gate: expected a CUDA tensor, got one on ", gate.device());
  const c10::cuda::CUDAGuard guard(gate.device());
  return swiglu_backward_host<CudaBackend>(grad, gate, up);
}

at::Tensor gelu_cuda(const at::Tensor& x, c10::string_view approximate) {
  TORCH_CHECK(on_kernel_device(x), "x: expected a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return gelu_host<CudaBackend>(x, approximate);
}

at::Tensor gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, c10::string_view approximate) {
  TORCH_CHECK(on_kernel_device(x), "x: expected a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return gelu_backward_host<CudaBackend>(grad, x, approximate);
}

}  // namespace
}  // namespace layers

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("rms_norm", &layers::rms_norm_cuda);
  m.impl("rms_norm_backward", &layers::rms_norm_backward_cuda);
  m.impl("swiglu", &layers::swiglu_cuda);
  m.impl("swiglu_backward", &layers::swiglu_backward_cuda);
  m.impl("gelu", &layers::gelu_cuda);
  m.impl("gelu_backward", &layers::gelu_backward_cuda);
}

}  // namespace pk
