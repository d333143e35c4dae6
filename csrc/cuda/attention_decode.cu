// CUDA kv-cache attention (flash_attn_kvcache): decode and chunked prefill against a cache
// (batch, max_seqlen, kv_heads, head_dim) with per-row lengths in an int32 device tensor.
//
//  1. append_kernel writes k_new / v_new into the caches in place at each row's
//     cache_seqlens[b] (read on the device);
//  2. the forward launcher of attention_fwd.cu runs with per-row key counts
//     cache_seqlens[b] + seqlen_new, causal aligned bottom-right.
//  A row whose tokens do not fit the cache follows the rule of cache_rows_fit
//  (csrc/common/attention.h), as on the CPU: nothing is written, its outputs are NaN.
//     When batch x heads x query blocks is too small to fill the GPU, which is the common
//     decode case, it splits every row's keys into pieces processed by separate blocks
//     (flash decoding) and merges the pieces with their lse (combine_kernel), so a batch of
//     one with a long cache still reads the cache with the whole GPU.
#include <torch/library.h>

#include "attention_host.cuh"

#include "attention_common.cuh"

namespace pk {
namespace attention {
namespace cuda {

namespace {

// One element per thread (grid stride): cache[b, lens[b] + t, h, d] = src[b, t, h, d].
template <typename E>
__global__ void append_kernel(E* __restrict__ cache, int64_t c_sb, int64_t c_ss, int64_t c_sh,
                              const E* __restrict__ src, int64_t s_sb, int64_t s_ss, int64_t s_sh, int64_t s_sd,
                              const int32_t* __restrict__ lens, int64_t B, int64_t S_new, int64_t Hk, int64_t Dd,
                              int64_t Smax) {
  const int64_t n = B * S_new * Hk * Dd;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % Dd, hk = (idx / Dd) % Hk, t = (idx / (Dd * Hk)) % S_new, b = idx / (Dd * Hk * S_new);
    const int64_t pos = lens[b];
    if (!cache_rows_fit(pos, S_new, Smax)) continue;  // the row takes nothing (csrc/common/attention.h)
    cache[b * c_sb + (pos + t) * c_ss + hk * c_sh + d] = src[b * s_sb + t * s_ss + hk * s_sh + d * s_sd];
  }
}

void append(at::Tensor& cache, const at::Tensor& src, const at::Tensor& lens, cudaStream_t stream) {
  const int64_t B = src.size(0), S_new = src.size(1), Hk = src.size(2), Dd = src.size(3), Smax = cache.size(1);
  const int64_t n = B * S_new * Hk * Dd;
  if (n == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, threads), 1 << 20));
  const auto launch = [&](auto tag) {
    using E = decltype(tag);
    PK_LAUNCH(blocks, threads, 0, stream, append_kernel<E>)(
        static_cast<E*>(cache.data_ptr()), cache.stride(0), cache.stride(1), cache.stride(2),
        static_cast<const E*>(src.data_ptr()), src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        lens.data_ptr<int32_t>(), B, S_new, Hk, Dd, Smax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (cache.element_size() == 2)
    launch(uint16_t{});
  else
    launch(uint32_t{});
}

at::Tensor flash_attn_kvcache_cuda(const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache,
                                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                   const std::optional<at::Tensor>& v_new, double scale, bool causal, double softcap,
                                   const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(on_kernel_device(q_in), "q: expected a CUDA tensor, got one on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t s_new = check_kvcache(q_in, k_cache, v_cache, cache_seqlens, k_new, v_new, q_in.device());
  const int64_t Smax = k_cache.size(1);
  // Checks q against the caches (dtypes, heads, head dims) before anything is written.
  at::Tensor q = q_in, k = k_cache, v = v_cache;
  std::optional<at::Tensor> none_q, none_k, none_mask, none_prefix;
  AttnParams p = make_params(q, k, v, none_q, none_k, none_mask, scale, -1, causal ? 0 : -1, true, softcap,
                             alibi_slopes, none_prefix, 0.0, std::nullopt);
  TORCH_CHECK(k.data_ptr() == k_cache.data_ptr() && v.data_ptr() == v_cache.data_ptr(),
              "k_cache, v_cache: expected to be used in place");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor lens = cache_seqlens.contiguous();
  if (s_new > 0) {
    append(k_cache, *k_new, lens, stream);
    append(v_cache, *v_new, lens, stream);
  }
  p.seqlens_k = lens.data_ptr<int32_t>();
  p.seqlens_k_extra = s_new;
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.Dv;
  at::Tensor out = at::empty(out_shape, q.options());
  if (out.numel() == 0) return out;
  at::Tensor lse = at::empty({p.batch, p.H, p.sq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_forward(p, q.scalar_type(), p.sq, Smax, q);
  return out;
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) { m.impl("flash_attn_kvcache", &flash_attn_kvcache_cuda); }

}  // namespace cuda
}  // namespace attention
}  // namespace pk
