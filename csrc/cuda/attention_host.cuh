// Host side of the CUDA attention ops (attention_fwd.cu, attention_bwd.cu, attention_decode.cu):
// argument checks that fill Params, the choice between tensor-core and SIMT kernels, and the
// split-KV decision. Kernel-only files include attention_common.cuh instead.
#pragma once
#include <ATen/ATen.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../common/attention_checks.h"
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

inline void check_cuda_float(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(on_kernel_device(t), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == dev, name, ": expected a tensor on ", dev, " (the device of q), got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt != at::kDouble, name,
              ": float64 attention runs on the CPU only (use float32, float16 or bfloat16 on CUDA)");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              ": expected float32, float16 or bfloat16, got ", dt);
}

inline void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch, const at::Device& dev) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, ": expected an int32 tensor, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == dev, name, ": expected a tensor on ", dev, " (the device of q), got ", cu.device());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == batch + 1, name, ": expected shape [", batch + 1, "], got ",
              cu.sizes());
}

// Checks the arguments of a forward/backward call and fills Params (tensors, shapes,
// strides, mask, window). q/k/v may be replaced by copies with a contiguous last dimension
// and the cu_seqlens/mask by contiguous ones; the caller keeps them alive.
inline Params make_params(at::Tensor& q, at::Tensor& k, at::Tensor& v, std::optional<at::Tensor>& cu_q,
                          std::optional<at::Tensor>& cu_k, std::optional<at::Tensor>& mask, double scale,
                          int64_t window_left, int64_t window_right, bool bottom_right) {
  TORCH_CHECK(on_kernel_device(q), "q: expected a CUDA tensor, got one on ", q.device());
  const at::Device dev = q.device();
  check_cuda_float(q, "q", dev);
  check_cuda_float(k, "k", dev);
  check_cuda_float(v, "v", dev);
  const bool varlen = attention::check_qkv_layout(q, k, v, cu_q, cu_k, scale, window_left, window_right);
  Params p;
  const int64_t H = q.size(-2), Hk = k.size(-2), D = q.size(-1), Dv = v.size(-1);
  TORCH_CHECK(v.size(-2) == Hk, "k, v: expected the same number of heads, got ", Hk, " and ", v.size(-2));
  TORCH_CHECK(Hk >= 1 && H % Hk == 0, "heads: the query heads (", H, ") must be a multiple of the key/value heads (",
              Hk, ")");
  TORCH_CHECK(k.size(-1) == D, "head_dim: q and k must match, got ", D, " and ", k.size(-1));
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "head_dim: expected 1 to ", kMaxHeadDim, ", got ", D);
  TORCH_CHECK(Dv >= 1 && Dv <= kMaxHeadDim, "head_dim of v: expected 1 to ", kMaxHeadDim, ", got ", Dv);
  TORCH_CHECK(H <= (1 << 20), "heads: at most ", (1 << 20), " supported, got ", H);
  p.H = static_cast<int>(H);
  p.Hk = static_cast<int>(Hk);
  p.D = static_cast<int>(D);
  p.Dv = static_cast<int>(Dv);
  if (varlen) {
    TORCH_CHECK(!mask.has_value(), "attn_mask: not supported with cu_seqlens (varlen)");
    const int64_t batch = cu_q->numel() - 1;
    TORCH_CHECK(batch >= 0, "cu_seqlens_q: expected at least one element");
    check_cu_seqlens(*cu_q, "cu_seqlens_q", batch, dev);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", batch, dev);
    TORCH_CHECK(v.size(0) == k.size(0), "k, v: expected the same token count, got ", k.size(0), " and ", v.size(0));
    TORCH_CHECK(batch < (int64_t(1) << 31), "cu_seqlens_q: too many sequences");
    *cu_q = cu_q->contiguous();
    *cu_k = cu_k->contiguous();
    p.batch = static_cast<int>(batch);
    p.cu_q = cu_q->data_ptr<int32_t>();
    p.cu_k = cu_k->data_ptr<int32_t>();
    p.total_q = q.size(0);
    p.total_k = k.size(0);
  } else {
    const int64_t batch = q.size(0);
    TORCH_CHECK(k.size(0) == batch && v.size(0) == batch, "batch: q, k, v must match, got ", batch, ", ", k.size(0),
                ", ", v.size(0));
    TORCH_CHECK(v.size(1) == k.size(1), "k, v: expected the same sequence length, got ", k.size(1), " and ",
                v.size(1));
    TORCH_CHECK(batch < (int64_t(1) << 31), "batch: too large");
    p.batch = static_cast<int>(batch);
    p.sq = q.size(1);
    p.sk = k.size(1);
    p.total_q = batch * p.sq;
    p.total_k = batch * p.sk;
  }
  q = last_dim_contiguous(q);
  k = last_dim_contiguous(k);
  v = last_dim_contiguous(v);
  const auto strides = [&](const at::Tensor& t, int64_t& sb, int64_t& ss, int64_t& sh) {
    if (varlen) {
      sb = 0;
      ss = t.stride(0);
      sh = t.stride(1);
    } else {
      sb = t.stride(0);
      ss = t.stride(1);
      sh = t.stride(2);
    }
  };
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides(q, p.q_sb, p.q_ss, p.q_sh);
  strides(k, p.k_sb, p.k_ss, p.k_sh);
  strides(v, p.v_sb, p.v_ss, p.v_sh);
  p.q_vec = vec_ok(q, D, varlen);
  p.k_vec = vec_ok(k, D, varlen);
  p.v_vec = vec_ok(v, Dv, varlen);
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.device() == dev, "attn_mask: expected a tensor on ", dev, ", got one on ", mk.device());
    attention::set_attn_mask(p, mk, H);
  }
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  return p;
}

// Upper bound of the query length of any sequence (the launch grid's extent): the dense
// length, max_seqlen_q when the caller gives it, else the token count. Kernels loop over
// query blocks with a grid stride, so a bound that is too small costs time, never results.
inline int64_t query_bound(const Params& p, int64_t max_seqlen_q) {
  if (p.cu_q == nullptr) return p.sq;
  return max_seqlen_q > 0 ? std::min(max_seqlen_q, p.total_q) : p.total_q;
}

inline int64_t key_bound(const Params& p, int64_t max_seqlen_k) {
  if (p.cu_k == nullptr) return p.sk;
  return max_seqlen_k > 0 ? std::min(max_seqlen_k, p.total_k) : p.total_k;
}

// Launchers (attention_fwd.cu). run_forward: out and lse (or the split partials and then
// the combine pass) for any dtype; q_bound / k_bound: upper bounds of the per-sequence
// lengths (grid extent and split choice).
void run_forward(Params& p, at::ScalarType dtype, int64_t q_bound, int64_t k_bound, const at::Tensor& like);

// Whether float16 / bfloat16 may use the tensor-core kernels: sm_80 or newer, unless the
// environment sets PK_ATTENTION_CUDA_PATH=simt (read on every call; a debugging aid that
// runs every dtype through the SIMT kernels).
inline bool use_tensor_cores() {
  const char* e = std::getenv("PK_ATTENTION_CUDA_PATH");
  if (e != nullptr && std::string(e) == "simt") return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// Whether the tensor-core forward may use its 128-row blocks (attention_fwd.cuh, FwdTile):
// PK_ATTENTION_FWD_BLOCK_M=64 in the environment (read on every call) keeps every launch on
// 64-row blocks, to compare the two shapes on a new GPU.
inline bool fwd_tall_blocks_allowed() {
  const char* e = std::getenv("PK_ATTENTION_FWD_BLOCK_M");
  return !(e != nullptr && std::string(e) == "64");
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Split-KV factor: cut each query's key range when the grid has too few blocks to fill the
// GPU (decode, batch 1 with long keys). Keys per split are a multiple of `key_block`.
inline void choose_splits(Params& p, int64_t blocks, int64_t max_keys, int64_t key_block) {
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
