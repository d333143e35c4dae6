// Host-side argument checks shared by the CPU and CUDA entry points of the attention ops
// (device placement and dtype support differ per backend and stay at the call sites).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace pk {
namespace attention {

// q, k, v: one dtype, 4-D (batch, seqlen, heads, head_dim) or 3-D packed when varlen;
// a valid window and a finite scale. Returns whether the call is varlen.
inline bool check_qkv_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                             double scale, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q, cu_seqlens_k: pass both or neither");
  const bool varlen = cu_q.has_value();
  const int64_t nd = varlen ? 3 : 4;
  const char* layout = varlen ? "(total_tokens, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK(q.dim() == nd, "q: expected ", nd, " dims ", layout, ", got shape ", q.sizes());
  TORCH_CHECK(k.dim() == nd, "k: expected ", nd, " dims ", layout, ", got shape ", k.sizes());
  TORCH_CHECK(v.dim() == nd, "v: expected ", nd, " dims ", layout, ", got shape ", v.sizes());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window: expected values >= -1 (-1: unbounded), got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  return varlen;
}

// k_new / v_new against the caches (shapes and dtypes). Returns the number of new tokens.
inline int64_t check_kv_new(const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t B) {
  if (!k_new.has_value()) return 0;
  TORCH_CHECK(k_new->dim() == 4 && v_new->dim() == 4,
              "k_new, v_new: expected 4 dims (batch, seqlen_new, kv_heads, head_dim), got shapes ", k_new->sizes(),
              " and ", v_new->sizes());
  TORCH_CHECK(k_new->size(0) == B && v_new->size(0) == B && v_new->size(1) == k_new->size(1),
              "k_new, v_new: expected batch ", B, " and one length, got shapes ", k_new->sizes(), " and ",
              v_new->sizes());
  TORCH_CHECK(k_new->size(2) == k_cache.size(2) && k_new->size(3) == k_cache.size(3),
              "k_new: expected (heads, head_dim) of k_cache ", k_cache.sizes().slice(2), ", got ",
              k_new->sizes().slice(2));
  TORCH_CHECK(v_new->size(2) == v_cache.size(2) && v_new->size(3) == v_cache.size(3),
              "v_new: expected (heads, head_dim) of v_cache ", v_cache.sizes().slice(2), ", got ",
              v_new->sizes().slice(2));
  TORCH_CHECK(k_new->scalar_type() == k_cache.scalar_type() && v_new->scalar_type() == v_cache.scalar_type(),
              "k_new, v_new: expected the dtype of the cache ", k_cache.scalar_type(), ", got ",
              k_new->scalar_type(), " and ", v_new->scalar_type());
  return k_new->size(1);
}

// attn_mask: bool (true = attend) or float32 (added), shaped (batch, heads, Sq, Sk) (broadcasts
// arrive expanded, with zero strides). The device is checked at the call sites.
inline void check_attn_mask(const at::Tensor& mk, int64_t batch, int64_t heads, int64_t sq, int64_t sk) {
  TORCH_CHECK(mk.scalar_type() == at::kBool || mk.scalar_type() == at::kFloat,
              "attn_mask: expected bool or float32 (convert float masks first), got ", mk.scalar_type());
  TORCH_CHECK(mk.dim() == 4 && mk.size(0) == batch && mk.size(1) == heads && mk.size(2) == sq && mk.size(3) == sk,
              "attn_mask: expected shape [", batch, ", ", heads, ", ", sq, ", ", sk, "] (expand it), got ",
              mk.sizes());
}

// Checks attn_mask (check_attn_mask) and points the kernel parameters at it: mask_bool or
// mask_float, and its four strides m_sb, m_sh, m_si, m_sj (the CPU and CUDA Params share
// these names).
template <typename Params>
void set_attn_mask(Params& p, const at::Tensor& mk, int64_t heads) {
  check_attn_mask(mk, p.batch, heads, p.sq, p.sk);
  if (mk.scalar_type() == at::kBool)
    p.mask_bool = mk.data_ptr<bool>();
  else
    p.mask_float = mk.data_ptr<float>();
  p.m_sb = mk.stride(0);
  p.m_sh = mk.stride(1);
  p.m_si = mk.stride(2);
  p.m_sj = mk.stride(3);
}

}  // namespace attention
}  // namespace pk
