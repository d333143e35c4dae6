// CUDA kv-cache attention (flash_attn_kvcache): decode and chunked prefill against a cache
// (batch, max_seqlen, kv_heads, head_dim), or a paged cache (num_blocks, page_size, kv_heads,
// head_dim) with an int32 block_table [batch, max_blocks], with per-row lengths in an int32
// device tensor.
//
//  0. paged: paged_row_keys_kernel reads each row's block ids on the device; a row that uses
//     one outside [0, num_blocks) is treated as a row that does not fit (below);
//  1. append_kernel writes k_new / v_new into the caches in place at each row's
//     cache_seqlens[b] (read on the device), through the page table when paged;
//  2. the forward launcher of attention_fwd.cu runs with per-row key counts
//     cache_seqlens[b] + seqlen_new, causal and the window aligned bottom-right; its K/V tile
//     loads go through the page table (kv_row_offset, load_kv_tile) when paged.
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

// Paged caches: the key count of every row (cache_row_keys, csrc/common/attention.h), -1 for a
// row that does not fit or uses a block id outside [0, num_blocks); one thread per row.
__global__ void paged_row_keys_kernel(int32_t* __restrict__ keys, const int32_t* __restrict__ lens,
                                      const int32_t* __restrict__ table, int64_t bt_sb, int64_t B, int64_t S_new,
                                      int64_t capacity, int64_t page_size, int64_t num_blocks) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)
    keys[b] = static_cast<int32_t>(cache_row_keys(lens[b], S_new, capacity, table + b * bt_sb, page_size, num_blocks));
}

// One element per thread (grid stride): cache[b, keys[b] + extra - S_new + t, h, d] =
// src[b, t, h, d] for the rows that fit (keys[b] + extra tokens in a row of `capacity`); the
// position goes through the page table when `table` is given.
template <typename E>
__global__ void append_kernel(E* __restrict__ cache, int64_t c_sb, int64_t c_ss, int64_t c_sh,
                              const E* __restrict__ src, int64_t s_sb, int64_t s_ss, int64_t s_sh, int64_t s_sd,
                              const int32_t* __restrict__ keys, int64_t extra, const int32_t* __restrict__ table,
                              int64_t bt_sb, int64_t page_size, int64_t B, int64_t S_new, int64_t Hk, int64_t Dd,
                              int64_t capacity) {
  const int64_t n = B * S_new * Hk * Dd;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % Dd, hk = (idx / Dd) % Hk, t = (idx / (Dd * Hk)) % S_new, b = idx / (Dd * Hk * S_new);
    const int64_t k = keys[b];
    if (!cache_rows_fit(k, extra, capacity)) continue;  // the row takes nothing (csrc/common/attention.h)
    const int64_t pos = k + extra - S_new + t;
    const int64_t row = table != nullptr ? paged_offset(table + b * bt_sb, page_size, pos, c_sb, c_ss)
                                         : b * c_sb + pos * c_ss;
    cache[row + hk * c_sh + d] = src[b * s_sb + t * s_ss + hk * s_sh + d * s_sd];
  }
}

// keys / extra: each row's key count is keys[b] + extra (cache_seqlens and seqlen_new, or the
// paged rows' counts and 0).
void append(at::Tensor& cache, const at::Tensor& src, const int32_t* keys, int64_t extra, const AttnParams& p,
            int64_t capacity, cudaStream_t stream) {
  const int64_t B = src.size(0), S_new = src.size(1), Hk = src.size(2), Dd = src.size(3);
  const int64_t n = B * S_new * Hk * Dd;
  if (n == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, threads), 1 << 20));
  const auto launch = [&](auto tag) {
    using E = decltype(tag);
    PK_LAUNCH(blocks, threads, 0, stream, append_kernel<E>)(
        static_cast<E*>(cache.data_ptr()), cache.stride(0), cache.stride(1), cache.stride(2),
        static_cast<const E*>(src.data_ptr()), src.stride(0), src.stride(1), src.stride(2), src.stride(3), keys,
        extra, p.block_table, p.bt_sb, p.page_size, B, S_new, Hk, Dd, capacity);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (cache.element_size() == 2)
    launch(uint16_t{});
  else
    launch(uint32_t{});
}

std::tuple<at::Tensor, at::Tensor> flash_attn_kvcache_cuda(const at::Tensor& q_in, at::Tensor& k_cache,
                                                           at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                           const std::optional<at::Tensor>& k_new,
                                                           const std::optional<at::Tensor>& v_new, double scale,
                                                           bool causal, int64_t window_left, int64_t window_right,
                                                           const std::optional<at::Tensor>& block_table,
                                                           double softcap,
                                                           const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(on_kernel_device(q_in), "q: expected a CUDA tensor, got one on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const KvCacheLayout c = check_kvcache(q_in, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, window_left,
                                        window_right, block_table, q_in.device());
  const int64_t B = q_in.size(0), s_new = c.s_new;
  // Checks q against the caches (dtypes, heads, head dims) before anything is written.
  at::Tensor q = q_in, k = kvcache_layout_view(k_cache, B, c.paged), v = kvcache_layout_view(v_cache, B, c.paged);
  std::optional<at::Tensor> none_q, none_k, none_mask, none_prefix;
  AttnParams p = make_params(q, k, v, none_q, none_k, none_mask, scale, c.window_left, c.window_right, true, softcap,
                             alibi_slopes, none_prefix, 0.0, std::nullopt);
  p.window_left = c.window_left;  // check_layout clamps against the view's length; the rows hold c.capacity
  p.window_right = c.window_right;
  p.sk = c.capacity;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor lens = cache_seqlens.contiguous();
  at::Tensor table, row_keys;
  if (c.paged) {
    // The kernels read the pages of each row through the table; the block ids are checked on
    // the device (paged_row_keys_kernel), under the rule of cache_rows_fit.
    table = block_table->contiguous();
    p.k = k_cache.data_ptr();
    p.v = v_cache.data_ptr();
    p.k_sb = k_cache.stride(0), p.k_ss = k_cache.stride(1), p.k_sh = k_cache.stride(2);
    p.v_sb = v_cache.stride(0), p.v_ss = v_cache.stride(1), p.v_sh = v_cache.stride(2);
    p.k_vec = vec_ok(k_cache, p.D, false);
    p.v_vec = vec_ok(v_cache, p.Dv, false);
    p.block_table = table.data_ptr<int32_t>();
    p.bt_sb = table.size(1);
    p.page_size = c.page_size;
    row_keys = at::empty({B}, lens.options());
    if (B > 0) {
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(B, 128), 1 << 16));
      PK_LAUNCH(blocks, 128, 0, stream, paged_row_keys_kernel)(row_keys.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
                                                               p.block_table, p.bt_sb, B, s_new, c.capacity,
                                                               c.page_size, c.num_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    p.seqlens_k = row_keys.data_ptr<int32_t>();
    p.seqlens_k_extra = 0;
  } else {
    TORCH_CHECK(k.data_ptr() == k_cache.data_ptr() && v.data_ptr() == v_cache.data_ptr(),
                "k_cache, v_cache: expected to be used in place");
    p.seqlens_k = lens.data_ptr<int32_t>();
    p.seqlens_k_extra = s_new;
  }
  if (s_new > 0) {
    append(k_cache, *k_new, p.seqlens_k, p.seqlens_k_extra, p, c.capacity, stream);
    append(v_cache, *v_new, p.seqlens_k, p.seqlens_k_extra, p, c.capacity, stream);
  }
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.Dv;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty({p.batch, p.H, p.sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_forward(p, q.scalar_type(), p.sq, c.capacity, q);
  return {out, lse};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) { m.impl("flash_attn_kvcache", &flash_attn_kvcache_cuda); }

}  // namespace cuda
}  // namespace attention
}  // namespace pk
