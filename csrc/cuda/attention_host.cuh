// Host side of the CUDA attention ops (attention_fwd.cu, attention_bwd.cu, attention_decode.cu):
// argument checks that fill AttnParams, the choice between tensor-core and SIMT kernels, and the
// split-KV decision. Kernel-only files include attention_common.cuh instead.
#pragma once
#include <ATen/ATen.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../common/attention_checks.h"
#include "../common/env_knobs.h"
#include "attention_common.cuh"

namespace pk {
namespace attention {
namespace cuda {

// at::Half / at::BFloat16 -> the CUDA types the kernels use (same bits).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// ---- host side ------------------------------------------------------------------------------

inline bool vec_ok(const at::Tensor& t, int64_t dim_len, bool varlen) {
  // 16-byte chunks of 8 half-precision elements: base, every row stride and the head dim
  // must be multiples of 8 elements.
  if (t.element_size() != 2) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  if (dim_len % 8 != 0) return false;
  const int nd = varlen ? 2 : 3;
  for (int d = 0; d < nd; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Checks the arguments of a forward/backward call (check_layout, set_score_mods,
// set_prefix_lens and set_dropout, csrc/common/attention_checks.h) and fills AttnParams (tensors, shapes,
// strides, mask, window, score modifiers, prefix_lens). q/k/v may be replaced by copies with a
// contiguous last dimension and the cu_seqlens and prefix_lens by contiguous ones; the caller
// keeps them alive. `layout`, when given, receives the checked shapes.
inline AttnParams make_params(at::Tensor& q, at::Tensor& k, at::Tensor& v, std::optional<at::Tensor>& cu_q,
                          std::optional<at::Tensor>& cu_k, std::optional<at::Tensor>& mask, double scale,
                          int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                          const std::optional<at::Tensor>& alibi_slopes, std::optional<at::Tensor>& prefix_lens,
                          double dropout_p, const std::optional<at::Tensor>& dropout_seed, Layout* layout = nullptr) {
  TORCH_CHECK(on_kernel_device(q), "q: expected a CUDA tensor, got one on ", q.device());
  const Layout l = check_layout(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, q.device(), false);
  if (layout != nullptr) *layout = l;
  AttnParams p;
  p.batch = static_cast<int>(l.batch);
  p.H = static_cast<int>(l.H);
  p.Hk = static_cast<int>(l.Hk);
  p.D = static_cast<int>(l.D);
  p.Dv = static_cast<int>(l.Dv);
  p.sq = l.sq;
  p.sk = l.sk;
  p.total_q = l.total_q;
  p.total_k = l.total_k;
  if (l.varlen) {
    *cu_q = cu_q->contiguous();
    *cu_k = cu_k->contiguous();
    p.cu_q = cu_q->data_ptr<int32_t>();
    p.cu_k = cu_k->data_ptr<int32_t>();
  }
  q = last_dim_contiguous(q);
  k = last_dim_contiguous(k);
  v = last_dim_contiguous(v);
  const auto strides = [&](const at::Tensor& t, int64_t& sb, int64_t& ss, int64_t& sh) {
    sb = l.varlen ? 0 : t.stride(0);
    ss = t.stride(l.varlen ? 0 : 1);
    sh = t.stride(l.varlen ? 1 : 2);
  };
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides(q, p.q_sb, p.q_ss, p.q_sh);
  strides(k, p.k_sb, p.k_ss, p.k_sh);
  strides(v, p.v_sb, p.v_ss, p.v_sh);
  p.q_vec = vec_ok(q, l.D, l.varlen);
  p.k_vec = vec_ok(k, l.D, l.varlen);
  p.v_vec = vec_ok(v, l.Dv, l.varlen);
  if (mask.has_value()) set_attn_mask(p, *mask);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.window_left = l.window_left;
  p.window_right = l.window_right;
  p.bottom_right = bottom_right;
  set_score_mods(p, softcap, alibi_slopes, q.scalar_type(), q.device(), false);
  // values are not read on the host (no sync): the kernels clamp them (make_window)
  set_prefix_lens(p, prefix_lens, l.batch, q.device());
  // a seed on the GPU is read by the kernels (resolve_dropout), one on the CPU here
  set_dropout(p, dropout_p, dropout_seed, q.device(), false);
  return p;
}

// Upper bound of the query length of any sequence (the launch grid's extent): the dense
// length, max_seqlen_q when the caller gives it, else the token count. Kernels loop over
// query blocks with a grid stride, so a bound that is too small costs time, never results.
inline int64_t query_bound(const AttnParams& p, int64_t max_seqlen_q) {
  if (p.cu_q == nullptr) return p.sq;
  return max_seqlen_q > 0 ? std::min(max_seqlen_q, p.total_q) : p.total_q;
}

inline int64_t key_bound(const AttnParams& p, int64_t max_seqlen_k) {
  if (p.cu_k == nullptr) return p.sk;
  return max_seqlen_k > 0 ? std::min(max_seqlen_k, p.total_k) : p.total_k;
}

// Launchers (attention_fwd.cu). run_forward: out and lse (or the split partials and then
// the combine pass) for any dtype; q_bound / k_bound: upper bounds of the per-sequence
// lengths (grid extent and split choice).
void run_forward(AttnParams& p, at::ScalarType dtype, int64_t q_bound, int64_t k_bound, const at::Tensor& like);

// Whether float16 / bfloat16 may use the tensor-core kernels: sm_80 or newer, unless
// PK_ATTENTION_CUDA_PATH=simt (csrc/common/env_knobs.h) sends every dtype to the SIMT kernels.
inline bool use_tensor_cores() {
  if (knobs::attention_cuda_simt()) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// Whether the tensor-core forward may use its 128-row blocks (attention_fwd_mma.cuh, FwdTile):
// PK_ATTENTION_FWD_BLOCK_M=64 (csrc/common/env_knobs.h) keeps every launch on 64-row blocks,
// to compare the two shapes on a new GPU.
inline bool fwd_tall_blocks_allowed() { return !knobs::attention_fwd_block_m_64(); }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Split-KV factor: cut each query's key range when the grid has too few blocks to fill the
// GPU (decode, batch 1 with long keys). Keys per split are a multiple of `key_block`.
inline void choose_splits(AttnParams& p, int64_t blocks, int64_t max_keys, int64_t key_block) {
  p.n_splits = 1;
  p.split_keys = 0;
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  if (blocks >= target || max_keys <= 2 * key_block) return;
  int64_t s = std::min<int64_t>(ceil_div(target, std::max<int64_t>(blocks, 1)), ceil_div(max_keys, 2 * key_block));
  s = std::min<int64_t>(s, kMaxSplits);
  if (s <= 1) return;
  const int64_t per = ceil_div(ceil_div(max_keys, s), key_block) * key_block;
  s = ceil_div(max_keys, per);
  if (s <= 1) return;
  p.n_splits = static_cast<int>(s);
  p.split_keys = per;
}

}  // namespace cuda
}  // namespace attention
}  // namespace pk
