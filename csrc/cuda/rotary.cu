// CUDA kernel of the rotary position embedding (pk.rotary_embedding; layouts, math and checks in
// csrc/common/rotary.h, shared with the CPU kernel). One thread per work item of a head row:
// items 0 .. rd/2 - 1 rotate one pair (two loads, two stores), the items after them copy one
// feature past rotary_dim, so a row of D features is D - rd/2 items. Consecutive threads take
// consecutive items of a row, then the next row: loads and stores stay coalesced for the
// rotate-half layout and within a pair's 8 bytes for the interleaved one. A grid-stride loop
// covers any size with a bounded grid; nothing syncs with the host, so a training step stays
// capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>

#include "cuda_seams.cuh"

#include "../common/rotary.h"

namespace pk {
namespace rotary {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ cos,
                  const at::opmath_type<scalar_t>* __restrict__ sin, scalar_t* __restrict__ out, Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t items = p.D - p.half;  // per head row
  const int64_t total = p.B * p.T * p.H * items;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t row = e / items, k = e % items;
    const int64_t h = row % p.H, n = row / p.H;
    const int64_t b = n / p.T, t = n % p.T;
    const scalar_t* xr = x + b * p.sxb + t * p.sxt + h * p.sxh;
    scalar_t* orow = out + row * p.D;
    if (k < p.half) {
      const int64_t tab = (b * p.cos_sb + t) * p.half + k;
      const acc_t c = cos[tab];
      const acc_t s = p.conjugate ? -sin[tab] : sin[tab];
      int64_t i0, i1;
      pair_offsets(k, p.half, p.interleaved, i0, i1);
      acc_t a, bb;
      rotate(static_cast<acc_t>(xr[i0]), static_cast<acc_t>(xr[i1]), c, s, a, bb);
      orow[i0] = static_cast<scalar_t>(a);
      orow[i1] = static_cast<scalar_t>(bb);
    } else {
      const int64_t j = p.half + k;  // 2 * half + (k - half)
      orow[j] = xr[j];
    }
  }
}

at::Tensor rotary_embedding_cuda(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                 bool interleaved, bool conjugate) {
  TORCH_CHECK(on_kernel_device(x_in), "x: expected a CUDA tensor, got one on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_feature_stride(x_in);
  const Params p = check_args(x, cos_in, sin_in, interleaved, conjugate);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor cos = table(cos_in, x), sin = table(sin_in, x);
  const int64_t total = p.B * p.T * p.H * (p.D - p.half);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65536));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_rotary_embedding_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PK_LAUNCH(blocks, kThreads, 0, stream, rotary_kernel<scalar_t>)(
        x.data_ptr<scalar_t>(), cos.data_ptr<acc_t>(), sin.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace rotary

PK_CUDA_LIBRARY_IMPL(m) { m.impl("rotary_embedding", &rotary::rotary_embedding_cuda); }

}  // namespace pk
