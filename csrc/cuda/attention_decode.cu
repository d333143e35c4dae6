// CUDA kv-cache attention (flash_attn_kvcache): decode and chunked prefill against a cache
// (batch, max_seqlen, kv_heads, head_dim) with per-row lengths in an int32 device tensor.
//
//  1. append_kernel writes k_new / v_new into the caches in place at each row's
//     cache_seqlens[b] (read on the device; a row whose position would run past the cache is
//     left untouched, since the op cannot raise without a host sync);
//  2. the forward launcher of attention_fwd.cu runs with per-row key counts
//     cache_seqlens[b] + seqlen_new (clamped to the cache), causal aligned bottom-right.
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
    if (pos < 0 || pos + S_new > Smax) continue;
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
                                   const std::optional<at::Tensor>& v_new, double scale, bool causal) {
  TORCH_CHECK(on_kernel_device(q_in), "q: expected a CUDA tensor, got one on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Device dev = q_in.device();
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "k_new, v_new: pass both or neither");
  TORCH_CHECK(q_in.dim() == 4, "q: expected 4 dims (batch, seqlen, heads, head_dim), got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "k_cache, v_cache: expected 4 dims (batch, max_seqlen, kv_heads, head_dim), got shapes ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q_in.size(0), Smax = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) == B && v_cache.size(0) == B, "k_cache, v_cache: expected batch ", B, ", got ",
              k_cache.size(0), " and ", v_cache.size(0));
  TORCH_CHECK(v_cache.size(1) == Smax, "v_cache: expected max_seqlen ", Smax, " (that of k_cache), got ",
              v_cache.size(1));
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
              "k_cache, v_cache: expected a contiguous last dimension (they are written in place)");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens: expected an int32 tensor, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == dev, "cache_seqlens: expected a tensor on ", dev, " (the device of q), got ",
              cache_seqlens.device());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens: expected shape [", B, "], got ",
              cache_seqlens.sizes());
  const int64_t s_new = attention::check_kv_new(k_new, v_new, k_cache, v_cache, B);
  if (k_new.has_value())
    TORCH_CHECK(k_new->device() == dev && v_new->device() == dev, "k_new, v_new: expected tensors on ", dev);
  TORCH_CHECK(s_new <= Smax, "k_new: ", s_new, " new tokens do not fit a cache of ", Smax);
  // Checks q against the caches (dtypes, heads, head dims) before anything is written.
  at::Tensor q = q_in, k = k_cache, v = v_cache;
  std::optional<at::Tensor> none_q, none_k, none_mask;
  Params p = make_params(q, k, v, none_q, none_k, none_mask, scale, -1, causal ? 0 : -1, true);
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
