// CUDA kernels of the denoising family: add_noise, diffusion_loss (+ backward) and the solver
// steps. Same math as csrc/cpu/diffusion.cpp: both call the per-sample coef() and the
// elementwise apply() of csrc/common/diffusion.h, and draw noise from Philox with the
// element index as counter, so a seed gives the same noise on both backends.
//
//  * Steps: a 2-D grid, blockIdx.y = sample (grid-stride over the batch), blockIdx.x walks
//    the sample's elements with 4 elements per thread in flight. Thread 0 computes the
//    sample's coefficients in double into shared memory once per block; every thread then
//    does one load per input, the fused body in float (double for fp64) and one store per
//    output: the step costs exactly one read of each input and one write of each output.
//    Per-sample parameters are read by the kernel (GPU tensors) or passed by value (CPU
//    scalars), the seed too: nothing syncs with the host, every launch can be captured in
//    a CUDA graph.
//  * diffusion_loss: per-sample sums of (pred - target)^2 in two passes without atomics
//    (block partials, then one thread per sample adds its partials in order), so the
//    result is deterministic; the backward is an elementwise step like the others.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#endif

#include "cuda_seams.cuh"

#include <algorithm>

#include "../common/diffusion.h"
#include "../common/diffusion_ops.h"

namespace pk {
namespace diffusion {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename scalar_t>
struct Ptrs {
  const scalar_t* in[4];
  const scalar_t* noise;
  scalar_t* out0;
  scalar_t* out1;
};

template <typename scalar_t, class Step>
__global__ void __launch_bounds__(kThreads)
    step_kernel(Step st, Ptrs<scalar_t> p, int64_t B, int64_t inner, bool draw, uint64_t seed,
                const int64_t* __restrict__ seed_dev, uint32_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s_coef[kNumCoef];
  const uint64_t sd = seed_dev != nullptr ? static_cast<uint64_t>(*seed_dev) : seed;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    __syncthreads();
    if (threadIdx.x == 0) {
      double cd[kNumCoef];
#pragma unroll
      for (int k = 0; k < kNumCoef; ++k) cd[k] = 0.0;
      st.coef(b, cd);
#pragma unroll
      for (int k = 0; k < kNumCoef; ++k) s_coef[k] = static_cast<acc_t>(cd[k]);
    }
    __syncthreads();
    acc_t c[kNumCoef];
#pragma unroll
    for (int k = 0; k < kNumCoef; ++k) c[k] = s_coef[k];
    const int64_t base = b * inner;
    for (int64_t j0 = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll; j0 < inner;
         j0 += static_cast<int64_t>(gridDim.x) * kThreads * kUnroll) {
      acc_t v[kUnroll][5];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kThreads + threadIdx.x;
        const bool ok = j < inner;
        const int64_t i = base + j;
#pragma unroll
        for (int k = 0; k < 4; ++k)
          v[u][k] = (ok && p.in[k] != nullptr) ? static_cast<acc_t>(p.in[k][i]) : acc_t(0);
        v[u][4] = (ok && p.noise != nullptr) ? static_cast<acc_t>(p.noise[i]) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kThreads + threadIdx.x;
        if (j >= inner) continue;
        const int64_t i = base + j;
        acc_t z = v[u][4];
        if (draw) z = static_cast<acc_t>(philox_normal(sd, static_cast<uint64_t>(i), offset));
        acc_t r0, r1;
        Step::template apply<acc_t>(c, v[u][0], v[u][1], v[u][2], v[u][3], z, r0, r1);
        p.out0[i] = static_cast<scalar_t>(r0);
        if (p.out1 != nullptr) p.out1[i] = static_cast<scalar_t>(r1);
      }
    }
  }
}

dim3 step_grid(int64_t B, int64_t inner) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t y = std::min<int64_t>(B, 65535);
  // Enough blocks to fill the GPU a few times over; the x loop covers the rest.
  const int64_t want = std::max<int64_t>(1, 8192 / std::max<int64_t>(y, 1));
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>((inner + per_block - 1) / per_block, want));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    loss_partial_kernel_t(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target, int64_t inner,
                          double* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const int64_t b = blockIdx.y;
  const scalar_t* p = pred + b * inner;
  const scalar_t* y = target + b * inner;
  acc_t s = 0;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < inner;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t d = static_cast<acc_t>(p[j]) - static_cast<acc_t>(y[j]);
    s += d * d;
  }
  const acc_t total = BlockReduce(tmp).Sum(s);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = static_cast<double>(total);
}

template <typename out_t>
__global__ void loss_finish_kernel(LossWeights w, const double* __restrict__ partial, int64_t B, int64_t nchunks,
                                   int64_t inner, out_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double s = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) s += partial[b * nchunks + c];
  out[b] = static_cast<out_t>(w.weight(b) * s / static_cast<double>(inner));
}

struct CudaBackend {
  template <class Step>
  static void run(const Step& st, StepIO& io) {
    const c10::cuda::CUDAGuard guard(io.out[0].device());
    auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid = step_grid(io.B, io.inner);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.out[0].scalar_type(), "pk_diffusion_step_cuda", [&] {
      Ptrs<scalar_t> p;
      for (int k = 0; k < 4; ++k) p.in[k] = io.in[k].defined() ? io.in[k].data_ptr<scalar_t>() : nullptr;
      p.noise = io.noise.defined() ? io.noise.data_ptr<scalar_t>() : nullptr;
      p.out0 = io.out[0].data_ptr<scalar_t>();
      p.out1 = io.out[1].defined() ? io.out[1].data_ptr<scalar_t>() : nullptr;
      PK_LAUNCH(grid, kThreads, 0, stream, step_kernel<scalar_t, Step>)(st, p, io.B, io.inner, io.draw_noise, io.seed,
                                                                   io.seed_dev, io.offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void loss(const LossWeights& w, const at::Tensor& pred, const at::Tensor& target, int64_t B, int64_t inner,
                   at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(pred.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    TORCH_CHECK(B <= 65535, "pred: at most 65535 samples per call on CUDA, got ", B);
    const int64_t nchunks = std::max<int64_t>(
        1, std::min<int64_t>((inner + kThreads * 8 - 1) / (kThreads * 8), std::max<int64_t>(1, 4096 / B)));
    at::Tensor partial = at::empty({B * nchunks}, pred.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pk_diffusion_loss_cuda", [&] {
      PK_LAUNCH(dim3(static_cast<unsigned>(nchunks), static_cast<unsigned>(B)), kThreads, 0, stream, loss_partial_kernel_t<scalar_t>)(pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), inner,
                                                  partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const unsigned blocks = static_cast<unsigned>((B + 127) / 128);
    if (out.scalar_type() == at::kDouble) {
      PK_LAUNCH(blocks, 128, 0, stream, loss_finish_kernel<double>)(w, partial.data_ptr<double>(), B, nchunks, inner,
                                                             out.data_ptr<double>());
    } else {
      PK_LAUNCH(blocks, 128, 0, stream, loss_finish_kernel<float>)(w, partial.data_ptr<double>(), B, nchunks, inner,
                                                            out.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace diffusion

PK_CUDA_LIBRARY_IMPL(m) { PK_REGISTER_DIFFUSION_OPS(m, ::pk::diffusion::CudaBackend); }

}  // namespace pk
